"""How a model is built and loaded: :class:`ModelOptions`, the ``model:`` section of every run config.

Every builder takes one: :class:`~sftrl_jax.models.decoder.Decoder`,
:func:`~sftrl_jax.models.hf_io.abstract_model`, :func:`~sftrl_jax.models.hf_io.init_model`,
:func:`~sftrl_jax.models.hf_io.load_pretrained`, :func:`sftrl_jax.checkpointing.load_model` and
:func:`sftrl_jax.training.init_train_state`, so a new model knob is one field here (plus its use in
the decoder). :mod:`sftrl_jax.config` re-exports the class and checks ``_ranges`` when it reads a
config; this module imports nothing of the run-config machinery.

``path`` is where :func:`load_pretrained` / :func:`load_model` read from; the builders that start
from a :class:`~sftrl_jax.models.config.ModelConfig` (``Decoder``, ``abstract_model``,
``init_model``) do not read it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..layout import layout


@dataclasses.dataclass
class ModelOptions:
    path: str  # local Hugging Face directory (config.json + safetensors + tokenizer)
    dtype: Literal["float32", "bfloat16"] = "float32"  # parameters (optimizer state is always float32)
    compute_dtype: Literal["float32", "bfloat16"] | None = None  # matmuls; default: dtype
    remat: Literal["none", "full", "dots", "dots_no_batch"] = layout("none")
    # False: unroll the layer loop (faster steps for shallow models; compile time grows with depth)
    scan_layers: bool = layout(True)
    # attention kernel; auto: splash on TPU, cudnn on GPU (blockwise where cuDNN can't), dense on CPU
    attention: Literal["auto", "dense", "blockwise", "splash", "cudnn"] = layout("auto")
    attention_block_size: int = layout(512)  # query/key block of blockwise and splash attention
    # losses turn hidden states into float32 log-probs this many positions at a time, so [T, vocab]
    # logits never exist at once (0: all positions at once)
    logits_chunk_size: int = layout(1024)

    _ranges = {"attention_block_size": ">= 1", "logits_chunk_size": ">= 0"}


def options_or_defaults(options: ModelOptions | None) -> ModelOptions:
    """``options``, or the defaults (with an empty ``path``) where it is None: for the builders that
    start from a ModelConfig and never read ``path``."""
    return ModelOptions(path="") if options is None else options
