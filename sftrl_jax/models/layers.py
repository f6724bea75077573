"""Pure functions the decoder is built from: RMSNorm, matmuls, RoPE and positions.

Attention lives in :mod:`sftrl_jax.models.attention`.

Norms, softmax and RoPE tables are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``weight * x / rms(x)`` over the last axis, in float32, returned in ``x.dtype``."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * normed).astype(x.dtype)


def dense(x: jax.Array, w: jax.Array, *, n_in: int = 1, preferred_element_type=None) -> jax.Array:
    """Contract ``x``'s last ``n_in`` axes with ``w``'s first ``n_in`` axes, as one 2-D matmul.

    ``x [..., *in]``, ``w [*in, *out]`` -> ``[..., *out]``. The leading axes of ``x`` (batch, time)
    are flattened into the matmul's rows and the weight's axes into its columns, so the weight
    gradient is a single-contraction ``x^T @ dy``. The same product written as a 3-D einsum
    (``"bte,em->btm"``) makes XLA:CPU contract two axes in the backward pass, which it canonicalises
    by copying activations into transposed layouts (``docs/benchmarks.md``, SFT step); the 2-D form
    has no such copies and the same math.
    """
    lead, inner = x.shape[: x.ndim - n_in], x.shape[x.ndim - n_in:]
    if tuple(w.shape[:n_in]) != tuple(inner):
        raise ValueError(f"dense: x {x.shape} and w {w.shape} disagree on the contracted axes")
    out = w.shape[n_in:]
    rows = x.reshape(math.prod(lead), math.prod(inner))
    y = jnp.dot(rows, w.reshape(math.prod(inner), math.prod(out)), preferred_element_type=preferred_element_type)
    return y.reshape(*lead, *out)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` (float32), with linear or llama3 scaling applied.

    Computed in float32 like ``transformers`` does, so the tables match it bit for bit.
    """
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponent)).astype(np.float32)
    if config.rope_scaling is None:
        return inv_freq
    kind, factor, *rest = config.rope_scaling
    if kind == "linear":
        return (inv_freq / np.float32(factor)).astype(np.float32)
    # llama3: keep high frequencies, divide low ones by ``factor``, interpolate in between.
    low_freq_factor, high_freq_factor, original_max_pos = rest
    low_freq_wavelen = original_max_pos / low_freq_factor
    high_freq_wavelen = original_max_pos / high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq)
    smooth = (original_max_pos / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables ``[batch, seq, head_dim]`` (float32) for integer ``positions [batch, seq]``."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *, heads_axis: int = 2) -> jax.Array:
    """Rotate ``x [batch, seq, heads, head_dim]`` (or ``[batch, heads, seq, head_dim]`` with
    ``heads_axis=1`` and tables already expanded there) by the half-split convention of HF Llama/Qwen."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    if heads_axis == 2:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def default_positions(attention_mask: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """Positions for left-padded rows (count of real tokens before) or packed rows (restart per segment)."""
    if segment_ids is not None:
        seq = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
        starts = segment_ids != jnp.pad(segment_ids, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
        start_index = jax.lax.cummax(jnp.where(starts, seq, 0), axis=1)
        return seq - start_index
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
