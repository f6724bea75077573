"""Data front end: row sources (local files, hub ids, TFDS) and SFT tokenisation."""

from .sft import SFTDataOptions, SFTDataStats, SFTExample, build_prompt_text, tokenize_sft
from .sources import load_rows

__all__ = ["SFTDataOptions", "SFTDataStats", "SFTExample", "build_prompt_text", "load_rows", "tokenize_sft"]
