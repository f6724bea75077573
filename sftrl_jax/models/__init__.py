"""Flax decoder for Qwen2/2.5, Llama-3.x and Qwen3, and Hugging Face import/export.

The names below load their module on first use, so that :mod:`sftrl_jax.models.options` (the ``model:``
section of a run config) imports without JAX: reading a config, as the launch scripts do, needs no JAX.
"""

from __future__ import annotations

import importlib

from .options import ModelOptions

# name -> (module, attribute in it)
_EXPORTS = {
    "ATTENTION_IMPLEMENTATIONS": ("attention", "IMPLEMENTATIONS"), "resolve_attention": ("attention", None),
    "SUPPORTED_MODEL_TYPES": ("config", None), "ModelConfig": ("config", None),
    "Decoder": ("decoder", None), "KVCache": ("decoder", None), "init_cache": ("decoder", None),
    **{name: ("hf_io", None) for name in ("abstract_model", "init_model", "load_pretrained", "load_tokenizer",
                                          "param_items", "param_shardings", "read_config", "save_pretrained")},
}

__all__ = ["ModelOptions", "count_params", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attribute or name)
    globals()[name] = value
    return value


def count_params(model) -> int:
    """Number of parameters (tied embeddings counted once)."""
    import math

    from .hf_io import param_items

    return sum(math.prod(var.shape) for _, var in param_items(model))
