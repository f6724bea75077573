"""Flax decoder for Qwen2/2.5, Llama-3.x and Qwen3, and Hugging Face import/export."""

from .attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS, resolve_attention
from .config import SUPPORTED_MODEL_TYPES, ModelConfig
from .decoder import Decoder, KVCache, init_cache
from .hf_io import (
    abstract_model,
    init_model,
    load_pretrained,
    load_tokenizer,
    param_items,
    param_shardings,
    read_config,
    save_pretrained,
)
from .options import ModelOptions

__all__ = [
    "SUPPORTED_MODEL_TYPES", "ModelConfig", "ModelOptions", "Decoder", "KVCache", "init_cache", "abstract_model",
    "init_model", "load_pretrained", "load_tokenizer", "param_items", "param_shardings", "read_config",
    "save_pretrained", "count_params",
    "ATTENTION_IMPLEMENTATIONS", "resolve_attention",
]


def count_params(model) -> int:
    """Number of parameters (tied embeddings counted once)."""
    import math

    return sum(math.prod(var.shape) for _, var in param_items(model))
