"""Per-token log-probabilities (whole or chunked), entropy, and the one loss-aggregation function (SFT and RL).

Aggregation is expressed as per-token *weights* computed over the whole global batch before it is
split into micro-steps: the step loss is ``sum(weights * per_token_loss)`` over every micro-step,
so gradient accumulation is a plain sum and the result cannot depend on the split. Each mode:

``token-mean``               mask / (tokens in the global batch)
``seq-mean-token-mean``      mask / (tokens in the row * rows with tokens)
``seq-mean-token-sum``       mask / (rows with tokens)
``seq-mean-token-sum-norm``  mask / loss_scale_factor (default: the padded length; Dr.GRPO)

(The PyTorch-stack bugs' arithmetic is not a mode here: it follows a virtual DeepSpeed layout, so
its per-token weights are computed on the host, ``sftrl_jax.sft.step``.)

``mask`` is ``[..., rows, length]``; leading axes (micro-steps) are part of the global batch.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def token_logprobs(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """log p(label) per position, float32: ``logits [..., V]``, ``labels [...]``."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Per-position entropy (float32) of softmax(logits) over the last axis."""
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def chunked_logprobs(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array, labels: jax.Array, *,
                     chunk_size: int, with_entropy: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """log p(label) ``[B, T]`` (and the entropy ``[B, T]`` when asked) from final hidden states.

    ``logits_fn`` maps hidden states ``[B, c, E]`` to float32 logits ``[B, c, V]`` (the LM head, and a
    temperature if any). With ``chunk_size > 0`` and ``T > chunk_size`` the positions go through it
    ``chunk_size`` at a time in a ``lax.map`` whose body is rematerialised (``jax.checkpoint``): neither
    the forward nor the backward pass ever holds more than one chunk's ``[B, chunk, V]`` logits (and
    their gradient), instead of ``[B, T, V]`` float32 (10 GB for one 16k-token row of a 152k vocabulary).
    Values and gradients are the full path's; a sequence of at most ``chunk_size`` takes the full path.
    """

    def piece(h, y):
        logits = logits_fn(h)
        return token_logprobs(logits, y), (entropy_from_logits(logits) if with_entropy else None)

    batch, length = labels.shape
    if chunk_size <= 0 or length <= chunk_size:
        return piece(hidden, labels)
    chunks = -(-length // chunk_size)
    pad = chunks * chunk_size - length

    def split(x):  # [B, T, ...] -> [chunks, B, chunk_size, ...], the tail padded (and dropped below)
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(batch, chunks, chunk_size, *x.shape[2:]).swapaxes(0, 1)

    def join(x):
        return None if x is None else x.swapaxes(0, 1).reshape(batch, chunks * chunk_size)[:, :length]

    logp, entropy = jax.lax.map(jax.checkpoint(lambda xs: piece(*xs)), (split(hidden), split(labels)))
    return join(logp), join(entropy)


def _safe_div(x, y):
    return x / jnp.maximum(y, 1)


def agg_weights(mask: jax.Array, mode: str = "token-mean", *, loss_scale_factor: float | None = None) -> jax.Array:
    """Per-token weights (same shape as ``mask``) that implement aggregation ``mode``."""
    mask = mask.astype(jnp.float32)
    if mode == "token-mean":
        return _safe_div(mask, jnp.sum(mask))
    row_tokens = jnp.sum(mask, axis=-1, keepdims=True)
    rows_with_tokens = jnp.sum(row_tokens > 0)
    if mode == "seq-mean-token-mean":
        return _safe_div(_safe_div(mask, row_tokens), rows_with_tokens)
    if mode == "seq-mean-token-sum":
        return _safe_div(mask, rows_with_tokens)
    if mode == "seq-mean-token-sum-norm":
        return mask / (mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    raise ValueError(f"unknown loss aggregation mode {mode!r}; choose one of {AGG_MODES}")

