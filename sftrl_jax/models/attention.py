"""Grouped-query attention: one entry point, several implementations chosen by config.

Every implementation computes the same function (pad rows included):

* query ``i`` of row ``b`` sits at slot ``q_offset + i``, key ``j`` at slot ``j``;
* query ``i`` attends key ``j`` iff ``j <= q_offset + i`` (causal) and
  ``q_segment_ids[b, i] == kv_segment_ids[b, j]``.

Padding carries segment id 0 and real tokens ids >= 1 (packed rows 1, 2, 3, ...; unpacked rows 1),
which covers causal attention, packing, left padding (sampling prompts) and right padding (SFT).
A pad query therefore attends the pad keys before it (its output is finite and unused).

Layouts: q ``[B, T, H, D]``, k/v ``[B, KV, S, D]`` (heads before positions, the KV cache's
layout), ``H % KV == 0``; the output is ``[B, T, H, D]`` in ``v``'s dtype. Scores and softmax are
float32.

Implementations (:data:`IMPLEMENTATIONS`):

* ``dense``: scores ``[B, KV, G, T, S]`` materialised. Fine for short rows and the only one the
  KV-cache (prefill/decode) path uses.
* ``blockwise``: pure-JAX flash attention (online softmax over key blocks) with a custom VJP that
  saves only the output and the per-row logsumexp and recomputes blocks in the backward pass.
  Memory O(T x block); key blocks wholly above the causal diagonal are skipped. Runs anywhere.
* ``splash``: the Pallas TPU splash-attention kernel shipped with JAX (causal mask + segment ids,
  native GQA), run per device under ``shard_map`` (batch over the data axes, heads over
  ``tensor``). Off TPU it runs in Pallas interpret mode (slow; for tests).
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` where it applies (bf16/fp16,
  rows that are unpadded and unpacked, self-attention); elsewhere it falls back to ``blockwise``.
  The decision is static (dtypes, shapes and the ``unpadded`` flag). Its execution is untested
  in this repository's CPU test-suite (only tracing is).

``auto`` is resolved once, from the platform, by :func:`resolve_attention`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from ..sharding import DEFAULT_RULES, Rules, logical_to_pspec

IMPLEMENTATIONS = ("dense", "blockwise", "splash", "cudnn")
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_PLATFORM_DEFAULT = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "blockwise", "cpu": "dense"}


def resolve_attention(name: str, platform: str) -> str:
    """The concrete implementation for config value ``name`` on ``platform`` ("cpu", "gpu", "tpu").

    ``auto``: TPU -> ``splash``; GPU -> ``cudnn`` (which itself falls back to ``blockwise`` where
    cuDNN does not apply); CPU -> ``dense`` (CPU runs in this project are small: tests, demos,
    tiny models, where the materialised scores are cheap and the plain einsums fastest).
    Any other platform gets ``blockwise``. A concrete name is returned unchanged.
    """
    if name == "auto":
        return _PLATFORM_DEFAULT.get(platform, "blockwise")
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; choose 'auto' or one of {list(IMPLEMENTATIONS)}")
    return name


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
              q_offset: int | jax.Array = 0, implementation: str = "dense", mesh: Mesh | None = None,
              rules: Rules = DEFAULT_RULES, block_size: int = 512, platform: str = "cpu",
              unpadded: bool = False) -> jax.Array:
    """Grouped-query attention with causal + segment-id masking (see the module docstring).

    q ``[B, T, H, D]``; k, v ``[B, KV, S, D]``; ``q_segment_ids [B, T]``, ``kv_segment_ids [B, S]``
    (int); ``q_offset`` the slot of query 0 (a Python int, or a traced scalar for ``dense`` and
    ``blockwise``). ``mesh``/``rules``: where ``blockwise``, ``splash`` and ``cudnn`` run per
    device (batch over ``rules``' "batch" axes, heads over its "heads" axis); ``None`` or a
    one-device mesh runs them unsharded. ``block_size``: the query/key block of ``blockwise`` and
    ``splash``. ``platform``: the devices' platform ("cpu", "gpu", "tpu"); on CPU bf16/fp16 inputs
    are computed in float32 (XLA:CPU lacks bf16 x bf16 -> f32 dots), splash runs interpreted.
    ``unpadded``: static promise that every segment id is 1 (no padding, no packing), which
    lets ``cudnn`` run plain causal attention.
    """
    implementation = resolve_attention(implementation, platform)
    batch, q_len, num_heads, head_dim = q.shape
    if k.ndim != 4 or k.shape[0] != batch or k.shape[3] != head_dim or v.shape != k.shape:
        raise ValueError(f"attention: q {q.shape} needs k/v [B, KV, S, D]; got k {k.shape}, v {v.shape}")
    if num_heads % k.shape[1]:
        raise ValueError(f"attention: {num_heads} query heads are not a multiple of {k.shape[1]} kv heads")
    if q_segment_ids.shape != (batch, q_len) or kv_segment_ids.shape != (batch, k.shape[2]):
        raise ValueError(f"attention: segment ids {q_segment_ids.shape}/{kv_segment_ids.shape} do not match "
                         f"q {q.shape} / k {k.shape}")
    out_dtype = v.dtype
    if platform == "cpu" and v.dtype in (jnp.bfloat16, jnp.float16):
        # XLA:CPU has no bf16 x bf16 -> f32 kernel for a plain dot (it fails at run time when the
        # keys come from the KV cache); a CPU gains nothing from bf16 here, so compute in float32
        q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
    q_segment_ids = q_segment_ids.astype(jnp.int32)
    kv_segment_ids = kv_segment_ids.astype(jnp.int32)

    if implementation == "cudnn" and not _cudnn_applies(q, k, v, q_offset, unpadded):
        implementation = "blockwise"
    if implementation == "dense":
        out = _dense(q, k, v, q_segment_ids, kv_segment_ids, q_offset)
    elif implementation == "blockwise":
        out = _per_shard(functools.partial(_blockwise, block_size=block_size), mesh, rules,
                         q, k, v, q_segment_ids, kv_segment_ids, q_offset)
    elif implementation == "splash":
        if not (isinstance(q_offset, (int, np.integer)) and q_offset == 0 and q_len == k.shape[2]):
            raise ValueError("attention: splash serves self-attention only (q_offset a Python 0 and as many "
                             f"queries as keys); got q_offset={q_offset!r}, q {q_len}, kv {k.shape[2]}")
        fn = functools.partial(_splash, block_size=block_size, platform=platform)
        out = _per_shard(fn, mesh, rules, q, k, v, q_segment_ids, kv_segment_ids, 0)
    else:  # cudnn, where it applies
        out = _per_shard(_cudnn, mesh, rules, q, k, v, q_segment_ids, kv_segment_ids, 0)
    return out.astype(out_dtype)


# ---------------------------------------------------------------------------------------- sharding
def _per_shard(fn, mesh: Mesh | None, rules: Rules, q, k, v, q_seg, kv_seg, q_offset):
    """Run ``fn(q, k, v, q_seg, kv_seg, q_offset)`` on each device's batch rows and heads.

    Batch is split over the mesh axes ``rules`` give "batch" (where the batch divides), heads over
    those of "heads" when both the query and the key/value head counts divide (otherwise every
    device computes all heads of its rows). Attention needs no communication then.
    """
    if mesh is None or mesh.size == 1:
        return fn(q, k, v, q_seg, kv_seg, q_offset)
    batch_axes = logical_to_pspec(("batch",), mesh, rules, (q.shape[0],))[0]
    heads_axes = logical_to_pspec(("heads",), mesh, rules, (q.shape[2],))[0]
    kv_axes = logical_to_pspec(("kv_heads",), mesh, rules, (k.shape[1],))[0]
    if heads_axes != kv_axes:
        heads_axes = None
    if heads_axes is not None:  # batch and heads may not share a mesh axis
        b = set((batch_axes,) if isinstance(batch_axes, str) else batch_axes or ())
        h = set((heads_axes,) if isinstance(heads_axes, str) else heads_axes)
        if b & h:
            heads_axes = None
    q_spec = PartitionSpec(batch_axes, None, heads_axes, None)
    kv_spec = PartitionSpec(batch_axes, heads_axes, None, None)
    seg_spec = PartitionSpec(batch_axes, None)
    if isinstance(q_offset, (int, np.integer)):
        body = lambda q, k, v, qs, ks: fn(q, k, v, qs, ks, int(q_offset))  # noqa: E731
        args, specs = (q, k, v, q_seg, kv_seg), (q_spec, kv_spec, kv_spec, seg_spec, seg_spec)
    else:
        body = fn
        args = (q, k, v, q_seg, kv_seg, jnp.asarray(q_offset, jnp.int32))
        specs = (q_spec, kv_spec, kv_spec, seg_spec, seg_spec, PartitionSpec())
    mapped = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)
    return mapped(*args)


def _mask(q_seg, kv_seg, q_pos, kv_pos):
    """``[B, Tq, Tk]`` attend mask from segment ids ``[B, Tq]``/``[B, Tk]`` and slots ``[Tq]``/``[Tk]``."""
    causal = kv_pos[None, :] <= q_pos[:, None]
    return causal[None] & (q_seg[:, :, None] == kv_seg[:, None, :])


# ------------------------------------------------------------------------------------------ dense
def _dense(q, k, v, q_seg, kv_seg, q_offset):
    """Materialised scores. A query row with nothing to attend to returns a finite value."""
    batch, q_len, num_heads, head_dim = q.shape
    num_kv, kv_len = k.shape[1], k.shape[2]
    mask = _mask(q_seg, kv_seg, q_offset + jnp.arange(q_len), jnp.arange(kv_len))
    q = q.reshape(batch, q_len, num_kv, num_heads // num_kv, head_dim)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(head_dim))
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, num_heads, head_dim).astype(v.dtype)


# -------------------------------------------------------------------------------------- blockwise
def _blockwise(q, k, v, q_seg, kv_seg, q_offset, *, block_size: int):
    """Flash attention in plain JAX; lengths need not be multiples of the block (padded here)."""
    batch, q_len, num_heads, head_dim = q.shape
    num_kv, kv_len = k.shape[1], k.shape[2]
    bq, bk = min(block_size, q_len), min(block_size, kv_len)
    t_pad, s_pad = -q_len % bq, -kv_len % bk
    qh = q.reshape(batch, q_len, num_kv, num_heads // num_kv, head_dim).transpose(0, 2, 3, 1, 4)
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, 0), (0, t_pad), (0, 0)))
    kh = jnp.pad(k, ((0, 0), (0, 0), (0, s_pad), (0, 0)))
    vh = jnp.pad(v, ((0, 0), (0, 0), (0, s_pad), (0, 0)))
    # padded queries and keys get segment ids that match nothing real (and not each other)
    qs = jnp.pad(q_seg, ((0, 0), (0, t_pad)), constant_values=-1)
    ks = jnp.pad(kv_seg, ((0, 0), (0, s_pad)), constant_values=-2)
    out = _flash(qh, kh, vh, qs, ks, jnp.asarray(q_offset, jnp.int32), bq, bk)
    out = out[:, :, :, :q_len].transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, num_heads, head_dim)


def _block_scores(qi, kj, qsi, ksj, q_pos, k_pos, scale):
    """Masked float32 scores ``[B, KV, G, bq, bk]`` of one query block against one key block."""
    s = jnp.einsum("bkgqd,bksd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
    return jnp.where(_mask(qsi, ksj, q_pos, k_pos)[:, None, None], s, _MASK_VALUE)


def _kv_blocks_needed(i, q_offset, bq, bk, nk):
    """Key blocks ``[0, n)`` that query block ``i`` can see (the rest lie above the diagonal)."""
    last_slot = q_offset + (i + 1) * bq - 1
    return jnp.clip(last_slot // bk + 1, 0, nk)


def _first_q_block(slot, q_offset, bq, nq):
    """First query block whose last slot reaches key block ``j``'s first slot ``j * bk``."""
    return jnp.clip(jnp.floor_divide(slot - q_offset, bq), 0, nq)


def _flash_forward(qh, kh, vh, qs, ks, q_offset, bq, bk):
    batch, num_kv, groups, t_len, head_dim = qh.shape
    nq, nk = t_len // bq, kh.shape[2] // bk
    scale = 1.0 / math.sqrt(head_dim)

    def q_block(i):
        qi = jax.lax.dynamic_slice_in_dim(qh, i * bq, bq, axis=3)
        qsi = jax.lax.dynamic_slice_in_dim(qs, i * bq, bq, axis=1)
        q_pos = q_offset + i * bq + jnp.arange(bq)

        def kv_step(j, carry):
            m, denom, acc = carry
            kj = jax.lax.dynamic_slice_in_dim(kh, j * bk, bk, axis=2)
            vj = jax.lax.dynamic_slice_in_dim(vh, j * bk, bk, axis=2)
            ksj = jax.lax.dynamic_slice_in_dim(ks, j * bk, bk, axis=1)
            s = _block_scores(qi, kj, qsi, ksj, q_pos, j * bk + jnp.arange(bk), scale)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m - m_new)
            denom = denom * correction + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vh.dtype), vj, preferred_element_type=jnp.float32)
            return m_new, denom, acc * correction[..., None] + pv

        init = (jnp.full((batch, num_kv, groups, bq), _MASK_VALUE, jnp.float32),
                jnp.zeros((batch, num_kv, groups, bq), jnp.float32),
                jnp.zeros((batch, num_kv, groups, bq, head_dim), jnp.float32))
        m, denom, acc = jax.lax.fori_loop(0, _kv_blocks_needed(i, q_offset, bq, bk, nk), kv_step, init)
        return (acc / denom[..., None]).astype(vh.dtype), m + jnp.log(denom)

    out, lse = jax.lax.map(q_block, jnp.arange(nq))  # [nq, B, KV, G, bq, (D)]
    out = jnp.moveaxis(out, 0, 3).reshape(batch, num_kv, groups, t_len, head_dim)
    lse = jnp.moveaxis(lse, 0, 3).reshape(batch, num_kv, groups, t_len)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash(qh, kh, vh, qs, ks, q_offset, bq, bk):
    """``qh [B, KV, G, Tp, D]``, ``kh``/``vh [B, KV, Sp, D]`` (lengths multiples of ``bq``/``bk``)."""
    return _flash_forward(qh, kh, vh, qs, ks, q_offset, bq, bk)[0]


def _flash_fwd(qh, kh, vh, qs, ks, q_offset, bq, bk):
    out, lse = _flash_forward(qh, kh, vh, qs, ks, q_offset, bq, bk)
    return out, (qh, kh, vh, qs, ks, q_offset, out, lse)


def _flash_bwd(bq, bk, residuals, dout):
    qh, kh, vh, qs, ks, q_offset, out, lse = residuals
    batch, num_kv, groups, t_len, head_dim = qh.shape
    s_len = kh.shape[2]
    nq, nk = t_len // bq, s_len // bk
    scale = 1.0 / math.sqrt(head_dim)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, KV, G, Tp]
    dout = dout.astype(vh.dtype)

    def q_slices(i):
        sl = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, i * bq, bq, axis=axis)  # noqa: E731
        return sl(qh, 3), sl(qs, 1), sl(dout, 3), sl(lse, 3), sl(delta, 3), q_offset + i * bq + jnp.arange(bq)

    def kv_slices(j):
        sl = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, j * bk, bk, axis=axis)  # noqa: E731
        return sl(kh, 2), sl(vh, 2), sl(ks, 1), j * bk + jnp.arange(bk)

    def probs_and_dscores(i, j):
        qi, qsi, doi, lsei, deltai, q_pos = q_slices(i)
        kj, vj, ksj, k_pos = kv_slices(j)
        p = jnp.exp(_block_scores(qi, kj, qsi, ksj, q_pos, k_pos, scale) - lsei[..., None])
        dp = jnp.einsum("bkgqd,bksd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
        return p, p * (dp - deltai[..., None]), qi, doi, kj

    def dq_block(i):
        def step(j, dq):
            _, ds, _, _, kj = probs_and_dscores(i, j)
            return dq + jnp.einsum("bkgqs,bksd->bkgqd", ds.astype(kh.dtype), kj, preferred_element_type=jnp.float32)

        dq = jax.lax.fori_loop(0, _kv_blocks_needed(i, q_offset, bq, bk, nk), step,
                               jnp.zeros((batch, num_kv, groups, bq, head_dim), jnp.float32))
        return (dq * scale).astype(qh.dtype)

    def dkv_block(j):
        def step(i, carry):
            dk, dv = carry
            p, ds, qi, doi, _ = probs_and_dscores(i, j)
            dv = dv + jnp.einsum("bkgqs,bkgqd->bksd", p.astype(dout.dtype), doi, preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bkgqs,bkgqd->bksd", ds.astype(qh.dtype), qi, preferred_element_type=jnp.float32)
            return dk, dv

        zeros = jnp.zeros((batch, num_kv, bk, head_dim), jnp.float32)
        dk, dv = jax.lax.fori_loop(_first_q_block(j * bk, q_offset, bq, nq), nq, step, (zeros, zeros))
        return (dk * scale).astype(kh.dtype), dv.astype(vh.dtype)

    dq = jax.lax.map(dq_block, jnp.arange(nq))
    dq = jnp.moveaxis(dq, 0, 3).reshape(qh.shape)
    dk, dv = jax.lax.map(dkv_block, jnp.arange(nk))
    dk = jnp.moveaxis(dk, 0, 2).reshape(kh.shape)
    dv = jnp.moveaxis(dv, 0, 2).reshape(vh.shape)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------- splash
def _splash_kernel(num_heads: int, length: int, block: int, interpret: bool):
    # built per trace, not cached: the kernel holds its mask tables as arrays created in the trace
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    mask = sa.MultiHeadMask([sa.CausalMask((length, length))] * num_heads)
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # interpret=True (the plain Pallas interpreter): ``pltpu.InterpretParams()`` (the TPU-semantics
    # interpreter) fails under the vmap over batch rows in this JAX (grid/dimension-semantics mismatch)
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q, k, v, q_seg, kv_seg, q_offset, *, block_size: int, platform: str):
    """Splash attention on this device's rows: ``q [b, T, h, D]``, ``k``/``v [b, kv, T, D]``.

    The kernel wants block sizes that are multiples of 128 dividing the length, so the length is
    padded to a multiple of the block (padded positions get a segment id of their own; each
    attends at least itself, which the kernel requires). On TPU the head dimension is zero-padded
    to a multiple of 128 (the lane width); the softmax scale is applied to ``q`` beforehand, so
    padding changes nothing.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    del q_offset  # 0: checked by the caller
    batch, length, num_heads, head_dim = q.shape
    if block_size < 128 or block_size % 128:
        raise ValueError(f"attention: splash needs a block size that is a multiple of 128, got {block_size}")
    block = min(block_size, -(-length // 128) * 128)
    pad = -length % block
    d_pad = -head_dim % 128 if platform == "tpu" else 0
    qh = (q * jnp.asarray(1.0 / math.sqrt(head_dim), q.dtype)).transpose(0, 2, 1, 3)
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, pad), (0, d_pad)))
    kh = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, d_pad)))
    vh = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, d_pad)))
    qs = jnp.pad(q_seg, ((0, 0), (0, pad)), constant_values=-1)
    ks = jnp.pad(kv_seg, ((0, 0), (0, pad)), constant_values=-1)
    kernel = _splash_kernel(num_heads, length + pad, block, platform != "tpu")
    out = jax.vmap(lambda q1, k1, v1, s1, s2: kernel(q1, k1, v1, segment_ids=SegmentIds(q=s1, kv=s2)))(
        qh, kh, vh, qs, ks)
    return out[:, :, :length, :head_dim].transpose(0, 2, 1, 3).astype(v.dtype)


# ------------------------------------------------------------------------------------------ cudnn
def _cudnn_applies(q, k, v, q_offset, unpadded: bool) -> bool:
    """Whether cuDNN flash attention can compute this call (decided from static facts only).

    It needs bf16/fp16 inputs, self-attention (``q_offset`` a Python 0, as many queries as keys),
    a head dimension that is a multiple of 8 and at most 128 (cuDNN's flash attention limit for
    the backward pass) and rows it can mask without segment ids: the caller's ``unpadded``
    promise (no padding, no packing), so plain causal attention is exact.
    """
    return (unpadded and q.dtype == k.dtype == v.dtype and q.dtype in (jnp.bfloat16, jnp.float16)
            and isinstance(q_offset, (int, np.integer)) and q_offset == 0 and q.shape[1] == k.shape[2]
            and q.shape[3] % 8 == 0 and q.shape[3] <= 128)


def _cudnn(q, k, v, q_seg, kv_seg, q_offset):
    del q_seg, kv_seg, q_offset  # all ones / 0: checked by _cudnn_applies
    out = jax.nn.dot_product_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), is_causal=True,
                                       implementation="cudnn")
    return out.astype(v.dtype)
