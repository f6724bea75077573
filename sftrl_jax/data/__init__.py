"""Data front end: row sources (local files, hub ids, TFDS) and SFT tokenisation."""

from .prompts import PromptDataOptions, PromptItem, load_prompt_items
from .sft import SFTDataOptions, SFTDataStats, SFTExample, build_prompt_text, tokenize_sft
from .sources import load_rows

__all__ = ["PromptDataOptions", "PromptItem", "load_prompt_items", "SFTDataOptions", "SFTDataStats", "SFTExample",
           "build_prompt_text", "load_rows", "tokenize_sft"]
