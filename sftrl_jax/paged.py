"""The paged engine: continuous batching over a paged KV cache (``sampling.engine: paged``).

Keys and values live in a pool of fixed-size pages, one pool per layer (``[kv_heads, pages, page_size,
head_dim]``, the layout of JAX's TPU paged-attention kernel); each sequence reads them through its row of a
page table, its positions contiguous from 0. A prompt is prefilled once into pages of its own; its ``n``
samples share its full pages read-only, and each sample starts from a copy of the prompt's partly filled
last page (when there is one) and writes its generated tokens into pages it holds alone. Page 0 is a
scratch page: unused table entries point there and idle slots write there.

A host-side scheduler keeps ``max_slots`` decode slots busy: a sequence that ends (a stop id or its own
token limit) gives back its pages and its slot, which the next queued sample takes (its prompt prefilled
first if no sample of it has been admitted yet). The device work is two jitted functions of fixed shapes:
:func:`_prefill` (a bucketed batch of prompts into their pages, and the first token of each of their
samples) and :func:`_decode_chunk` (up to ``chunk`` decode steps of every slot, in a ``while_loop`` that
returns early once enough slots have ended to refill). A sequence takes a page of its own on the device
when its next token opens one (from a stack of free pages passed into the chunk), so it holds only the
pages it fills; when the free pages cannot cover the next step, the latest admitted sequence is
preempted: its pages go back and it starts again from the queue, which gives the same tokens (its
randomness is its own, :func:`sftrl_jax.sampling.pick`); before that, prompts whose queued samples are
not running yet give their pages back (they are prefilled again when admitted).

Each decode step attends over the slot's own tokens, chosen once from the platform like
``model.attention`` (``sampling.paged_attention``): on TPU ``pallas_tpu``, JAX's Pallas TPU paged-attention
kernel (keys and values in bfloat16, its compute dtype), on GPU ``pallas_gpu``, JAX's Pallas GPU (Triton)
paged-attention kernel, both reading each slot's live pages only; on CPU ``pool`` reads the whole pool
once, each page against the queries of the slots that read it, with no copy (:func:`pool_attention`);
``gather`` (where a kernel's shapes do not apply) gathers every slot's pages up to a bound on the live
lengths (a bucket of pages: powers of two and 1.5x those, so few shapes compile) and masks them to the
slot's length.

The model's own layers, RoPE and attention run every step (:meth:`Decoder.layer_fn`, with the page
pool as the layer's cache store), and tokens are drawn as the static engine draws them
(:func:`sftrl_jax.sampling.pick`, counter-based per sample and token), so both engines give the same samples.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from .data.batching import bucket_length
from .models.attention import attention
from .models.decoder import Decoder, init_cache
from .sampling import Sample, finish_sample, kv_bytes_per_token, memory_limit, pick, sample_keys, split_layer_weights
from .sharding import data_parallel_size, logical_to_pspec, place, rows_sharding, to_host

DEFAULT_PAGE_SIZE = 16
SCRATCH_PAGE = 0
DEFAULT_CHUNK = 32  # decode steps per device call at most
PAGED_ATTENTION = ("pool", "gather", "pallas_tpu", "pallas_gpu")
KERNEL_BLOCK_PAGES = 8  # pages per compute block of the Pallas kernels (128 tokens at the default page size)
KERNEL_PLATFORM = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}
# what each kernel's lowering for its platform needs of head_dim: whole 128-lane blocks on TPU, Triton dot
# operands of at least 16 on GPU
KERNEL_HEAD_DIM = {"pallas_tpu": 128, "pallas_gpu": 16}


def resolve_paged_attention(name: str, platform: str, head_dim: int) -> str:
    """The decode attention of the paged engine for ``sampling.paged_attention`` = ``name`` on ``platform``:
    ``auto`` is the platform's Pallas kernel (``pallas_tpu`` on TPU, ``pallas_gpu`` on GPU; each reads
    live pages only) where ``head_dim`` suits it, ``pool`` on CPU (XLA: one pass over the whole pool, no
    copy), and ``gather`` otherwise (XLA: gather pages up to a bound, mask). A kernel named off its
    platform runs in Pallas's interpret mode on CPU (slow; for tests), and is refused on the other
    accelerator."""
    if name == "auto":
        if platform == "cpu":
            return "pool"
        kernel = {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(platform)
        return kernel if kernel and head_dim % KERNEL_HEAD_DIM[kernel] == 0 else "gather"
    if name not in PAGED_ATTENTION:
        raise ValueError(f"sampling.paged_attention: expected auto | {' | '.join(PAGED_ATTENTION)}, got {name!r}")
    if name in KERNEL_PLATFORM and platform != "cpu":
        if platform != KERNEL_PLATFORM[name]:
            raise ValueError(f"sampling.paged_attention: {name} runs on {KERNEL_PLATFORM[name].upper()} (or "
                             f"interpreted on CPU), not on {platform.upper()}; use auto")
        if head_dim % KERNEL_HEAD_DIM[name]:
            raise ValueError(f"sampling.paged_attention: {name} needs a head_dim that is a multiple of "
                             f"{KERNEL_HEAD_DIM[name]}, the model's is {head_dim}; use gather or auto")
    return name


def check_paged_settings(max_slots: int, page_size: int, num_pages: int | None, *, pages_per_sequence: int,
                         shards: int = 1) -> None:
    """One-line errors naming the setting for engine settings that cannot work (``shards``: the data-parallel
    shards the pool's pages split over)."""
    if max_slots < 1:
        raise ValueError(f"sampling.max_slots must be >= 1, got {max_slots}")
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"sampling.page_size must be a power of two (it divides the padded prompt lengths), "
                         f"got {page_size}")
    if num_pages is not None and num_pages // shards - 1 < pages_per_sequence:
        where = f" on each of {shards} data-parallel shards" if shards > 1 else ""
        raise ValueError(f"sampling.num_pages ({num_pages}) cannot hold one sequence{where}: the longest prompt "
                         f"and its token limit take {pages_per_sequence} pages of {page_size} tokens, plus the "
                         "scratch page")


class PagePool:
    """The free pages, a stack (page 0, the scratch page, is never free). The host takes pages for prompts
    and gives pages back; a decode chunk takes sequences' pages from the top of the stack on the device
    (:meth:`stack`, then :meth:`taken_down_to`)."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self.free = list(range(num_pages - 1, SCRATCH_PAGE, -1))
        self.peak = 0

    @property
    def in_use(self) -> int:
        return self.num_pages - 1 - len(self.free)

    def take(self, count: int) -> list[int]:
        pages = [self.free.pop() for _ in range(count)]
        self.peak = max(self.peak, self.in_use)
        return pages

    def give_back(self, pages: Sequence[int]) -> None:
        self.free.extend(reversed(pages))

    def stack(self) -> np.ndarray:
        """The free pages as a ``[num_pages]`` array (the top last; the tail unused)."""
        out = np.zeros(self.num_pages, np.int32)
        out[:len(self.free)] = self.free
        return out

    def taken_down_to(self, count: int) -> None:
        """The device took the pages above the first ``count``."""
        del self.free[count:]
        self.peak = max(self.peak, self.in_use)


def _pages(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


def _axes(model: Decoder, slots: int, kv_heads: int):
    """The mesh axes slots (and a pool's pages) split over, and those kv heads split over."""
    batch = logical_to_pspec(("batch",), model.mesh, model.rules, (slots,))[0]
    heads = logical_to_pspec(("kv_heads",), model.mesh, model.rules, (kv_heads,))[0]
    return batch, heads


def pool_sharding(model: Decoder, slots: int, shape):
    """A layer's page pool ``[KV, pages, page_size, D]``: pages split over the data-parallel shards (each
    shard's slots use its own block of pages), kv heads over ``tensor`` as the model's are."""
    if model.mesh is None:
        return None
    batch, heads = _axes(model, slots, shape[0])
    return NamedSharding(model.mesh, PartitionSpec(heads, batch, None, None))


def per_layer_weights(model: Decoder, layer_weights):
    """Each layer's weights: the pre-split copies (CPU) or static slices of the stack."""
    if layer_weights is not None:
        return layer_weights
    arrays = model.layers.arrays()
    return [{name: value[i] for name, value in arrays.items()} for i in range(model.config.num_layers)]


@functools.partial(jax.jit, static_argnames=("graphdef", "n", "temperature", "top_k", "top_p"),
                   donate_argnames=("pool_k", "pool_v"))
def _prefill(graphdef, params, pool_k, pool_v, prompt_ids, prompt_mask, page_ids, key, first_sample, *, n,
             temperature, top_k, top_p):
    """Prefill right-padded prompts ``[rows, length]`` into their pages ``page_ids [rows, length / page_size]``
    (scratch for positions past a prompt) and draw token 0 of each prompt's ``n`` samples (sample ids
    ``first_sample[row] + j``). Returns the pools and ``[rows, n]`` tokens and log-probs."""
    model = nnx.merge(graphdef, params)
    rows, length = prompt_ids.shape
    page_size = pool_k[0].shape[2]
    cache = init_cache(model.config, rows, length, pool_k[0].dtype)
    hidden, cache = model.forward(prompt_ids, attention_mask=prompt_mask, cache=cache)
    last = jnp.sum(prompt_mask, axis=1) - 1
    logits = model.logits(jnp.take_along_axis(hidden, last[:, None, None], axis=1))[:, 0]

    def to_pages(layer_cache):  # [rows, KV, length, D] -> [KV, rows, length / page_size, page_size, D]
        kv, dim = layer_cache.shape[1], layer_cache.shape[3]
        paged = layer_cache.reshape(rows, kv, length // page_size, page_size, dim)
        return paged.transpose(1, 0, 2, 3, 4)

    pool_k = tuple(p.at[:, page_ids].set(to_pages(c)) for p, c in zip(pool_k, cache.k))
    pool_v = tuple(p.at[:, page_ids].set(to_pages(c)) for p, c in zip(pool_v, cache.v))
    keys = sample_keys(key, (first_sample[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]).reshape(-1))
    token, logprob = pick(jnp.repeat(logits, n, axis=0), keys, 0, temperature, top_k, top_p)
    return pool_k, pool_v, token.reshape(rows, n), logprob.reshape(rows, n)


POOL = ("heads", "batch", None, None)  # a layer's pool [KV, pages, page_size, D]
SLOTS = ("batch",)  # a value per slot [S]
TABLE = ("batch", None)  # the slots' page-table rows [S, pages]
SLOT_KV = ("batch", "heads", None, None)  # per-slot keys/values [S, KV, T, D]
SLOT_Q = ("batch", None, "heads", None)  # per-slot queries or attention outputs [S, T, H, D]


def _per_shard(model: Decoder, local, slots: int, kv_heads: int, in_roles, out_roles):
    """``local`` run on each data-parallel shard's slots and pages (and each ``tensor`` shard's heads), whose
    page ids are local to that shard (``shard_map``); unchanged without a mesh of several devices. Roles name
    each argument's axes: ``batch`` (slots, or a pool's pages), ``heads`` (kv heads, or the query heads in
    the same blocks), None."""
    if model.mesh is None or model.mesh.size == 1:
        return local
    batch, heads = _axes(model, slots, kv_heads)
    axis = {"batch": batch, "heads": heads, None: None}
    spec = lambda roles: PartitionSpec(*(axis[r] for r in roles))  # noqa: E731
    return jax.shard_map(local, mesh=model.mesh, in_specs=tuple(spec(r) for r in in_roles),
                         out_specs=tuple(spec(r) for r in out_roles), check_vma=False)


def copy_pages(model: Decoder, pool_k, pool_v, copy_from, copy_to):
    """Copy page ``copy_from[s]`` to page ``copy_to[s]`` in every layer's pools, for each slot ``s`` (page ids
    local to the slot's shard; scratch to scratch where a slot has nothing to copy)."""

    def local(pool_k, pool_v, source, target):
        def copy(pool):
            return pool.at[:, target].set(pool[:, source])

        return tuple(map(copy, pool_k)), tuple(map(copy, pool_v))

    run = _per_shard(model, local, copy_from.shape[0], pool_k[0].shape[0], (POOL, POOL, SLOTS, SLOTS), (POOL, POOL))
    return run(pool_k, pool_v, copy_from, copy_to)


def _write(pool, new, page, offset):
    """Each slot's new key or value ``[S, KV, 1, D]`` into the pool ``[KV, pages, page_size, D]`` at its
    ``(page, offset)``."""
    return pool.at[:, page, offset, :].set(new[:, :, 0, :].transpose(1, 0, 2).astype(pool.dtype))


def _gather(pool, pages, dtype):
    """Each slot's ``pages [S, bound]`` of the pool as contiguous keys or values ``[S, KV, bound x page_size, D]``."""
    kv, _, page_size, dim = pool.shape
    slots, bound = pages.shape
    return pool[:, pages].transpose(1, 0, 2, 3, 4).reshape(slots, kv, bound * page_size, dim).astype(dtype)


def paged_store(model: Decoder, pool_k, pool_v, write_page, write_offset, read_pages=None):
    """The KV-cache step of a decoder layer over one layer's page pool ``[KV, pages, page_size, D]``: write
    each slot's new key/value ``[S, KV, 1, D]`` at ``(write_page, write_offset)``, then gather each slot's
    ``read_pages [S, bound]`` as the keys/values to attend (``read_pages`` None: attention reads the updated
    pools themselves, the kernel path). Page ids are local to the slot's data-parallel shard, whose block of
    the pool it reads and writes on its own devices."""

    def written(pool_k, pool_v, k, v, page, offset):
        return _write(pool_k, k, page, offset), _write(pool_v, v, page, offset)

    def gathered(pool_k, pool_v, k, v, page, offset, pages):
        pool_k, pool_v = written(pool_k, pool_v, k, v, page, offset)
        return _gather(pool_k, pages, model.dtype), _gather(pool_v, pages, model.dtype), pool_k, pool_v

    def store(k, v):
        roles = (POOL, POOL, SLOT_KV, SLOT_KV, SLOTS, SLOTS)
        if read_pages is None:
            new_k, new_v = _per_shard(model, written, k.shape[0], k.shape[1], roles, (POOL, POOL))(
                pool_k, pool_v, k, v, write_page, write_offset)
            return new_k, new_v, (new_k, new_v)
        keys, values, new_k, new_v = _per_shard(model, gathered, k.shape[0], k.shape[1], roles + (TABLE,),
                                                (SLOT_KV, SLOT_KV, POOL, POOL))(
            pool_k, pool_v, k, v, write_page, write_offset, read_pages)
        return keys, values, (new_k, new_v)

    return store


def tpu_megacore_mode(cores: int, slots: int, kv_heads: int) -> str | None:
    """How JAX's TPU paged-attention kernel splits a decode step over a chip's TensorCores (its
    ``megacore_mode``), from a device's ``cores`` and the ``slots`` and ``kv_heads`` one device holds. A
    megacore chip (v4, v5p: two TensorCores as one JAX device) gives each core half of the kv heads where
    their number is even (equal work), else half of the slots where theirs is; a chip of one TensorCore
    (v5e, v6e), or neither even: None, the whole step on one core."""
    if cores < 2:
        return None
    if kv_heads % 2 == 0:
        return "kv_head"
    return "batch" if slots % 2 == 0 else None


def tensor_cores(model: Decoder) -> int:
    """TensorCores per JAX device of ``model``'s mesh (``num_cores`` of a TPU device, or of an abstract mesh's
    device; 1 elsewhere and without a mesh)."""
    mesh = model.mesh
    devices = getattr(mesh, "devices", None)
    device = devices.flat[0] if devices is not None else getattr(mesh, "abstract_device", None)
    return int(getattr(device, "num_cores", None) or 1)


def kernel_attention(model: Decoder, lengths, page_table, kernel: str):
    """``attend(q, pool_k, pool_v)`` for one decode step: JAX's Pallas paged-attention ``kernel`` (``pallas_tpu``
    or ``pallas_gpu``) over each slot's ``page_table [S, pages]`` row, its first ``lengths [S]`` tokens (the
    kernels read those pages only). q ``[S, 1, H, D]``. Off its platform the kernel runs interpreted. The TPU
    kernel loads keys and values as bfloat16 and computes in float32; the GPU kernel computes in the pool's
    dtype with float32 accumulation. On a megacore TPU the TPU kernel splits each step over the chip's two
    TensorCores (:func:`tpu_megacore_mode`)."""
    pages = page_table.shape[1]
    native = model.platform == KERNEL_PLATFORM[kernel]
    cores = tensor_cores(model)

    def tpu(q, pool_k, pool_v, lengths, table):
        from jax.experimental.pallas import tpu as pltpu
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

        megacore = tpu_megacore_mode(cores, q.shape[0], pool_k.shape[0])
        run = functools.partial(paged_attention, q, pool_k, pool_v, lengths, table,
                                pages_per_compute_block=int(np.gcd(pages, KERNEL_BLOCK_PAGES)),
                                megacore_mode=megacore)
        if native:
            return run()
        # the interpreter simulates the two cores a megacore split runs on (on one it waits forever on a copy
        # the other core's iteration starts)
        with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams(num_cores_or_threads=2 if megacore else 1)):
            return run()

    def gpu(q, pool_k, pool_v, lengths, table):
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

        splits = int(np.gcd(pages, 16))  # the sequence's pages split over this many partitions, in parallel
        return paged_attention(q.astype(pool_k.dtype), pool_k, pool_v, table, lengths,
                               pages_per_compute_block=int(np.gcd(pages // splits, KERNEL_BLOCK_PAGES)),
                               k_splits=splits, interpret=not native)

    def local(q, pool_k, pool_v, lengths, table):
        scaled = q[:, 0].astype(jnp.float32) * (1.0 / np.sqrt(q.shape[-1]))  # the scale dense attention applies
        out = (tpu if kernel == "pallas_tpu" else gpu)(scaled, pool_k, pool_v, lengths, table)
        return (out[:, None].astype(model.dtype),)

    def attend(q, pool_k, pool_v):
        return _per_shard(model, local, q.shape[0], pool_k.shape[0], (SLOT_Q, POOL, POOL, SLOTS, TABLE),
                          (SLOT_Q,))(q, pool_k, pool_v, lengths, page_table)[0]

    return attend


def pool_attention(model: Decoder, lengths, page_table, ranks, readers: int):
    """``attend(q, pool_k, pool_v)`` for one decode step in plain XLA, reading the pool once and copying
    nothing: each page's keys meet the queries of the slots that read it, masked to each reader's
    ``lengths``, and each slot's softmax is assembled from its pages' maxima, sums and weighted values
    (scatter-max and scatter-adds over the readers). Work and bytes are the pool's size whatever the
    slots' lengths: the choice on CPU, where a gather's copy costs more than reading free pages (a
    bfloat16 pool is still read as float32, as dense attention on CPU reads its cache).

    Slot ``s`` reads its first ``ceil(lengths[s] / page_size)`` pages of ``page_table [S, bound]``. A page
    is read by one sample alone, or (a prompt's full page) by that prompt's samples, all at the same
    column since positions run contiguous from 0; so a page has at most ``readers`` (the samples per
    prompt) and the slots' ``ranks [S]`` (sample index within the prompt) never collide on one. Idle
    slots read the scratch page, where colliding is harmless (their outputs are dropped). q
    ``[S, 1, H, D]``; computed in float32, as dense attention is on CPU, and scaled after the dot as it is."""

    def local(q, pool_k, pool_v, lengths, table, ranks):
        slots, _, heads, dim = q.shape
        kv, num_pages, page_size, _ = pool_k.shape
        bound = table.shape[1]
        # who reads each page, and its first position: [pages, readers] slot ids (-1 none), [pages] base
        column = jnp.arange(bound, dtype=jnp.int32)[None, :]
        read = column * page_size < lengths[:, None]  # [S, bound]
        page = jnp.where(read, table, num_pages)  # out of range: dropped
        slot = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32)[:, None], (slots, bound))
        who = jnp.full((num_pages, readers), -1, jnp.int32).at[page, ranks[:, None]].set(slot, mode="drop")
        base = jnp.zeros((num_pages,), jnp.int32).at[page].set(column * page_size, mode="drop")
        safe = jnp.maximum(who, 0)
        position = base[:, None, None] + jnp.arange(page_size, dtype=jnp.int32)[None, None, :]
        valid = (who >= 0)[:, :, None] & (position < lengths[safe][:, :, None])  # [pages, readers, page_size]

        qf = q[:, 0].astype(jnp.float32).reshape(slots, kv, heads // kv, dim)
        qp = qf[safe].transpose(2, 0, 1, 3, 4)  # [KV, pages, readers, G, D]
        k, v = pool_k.astype(jnp.float32), pool_v.astype(jnp.float32)
        scores = jnp.einsum("kprgd,kpid->kprgi", qp, k, preferred_element_type=jnp.float32) * (1.0 / np.sqrt(dim))
        mask = valid[None, :, :, None, :]
        scores = jnp.where(mask, scores, -jnp.inf)
        target = jnp.where(who >= 0, who, slots)  # nobody: dropped
        top = jnp.full((slots, kv, heads // kv), -jnp.inf).at[target].max(
            jnp.max(scores, axis=-1).transpose(1, 2, 0, 3), mode="drop")  # [S, KV, G]
        shift = jnp.where(jnp.isfinite(top), top, 0.0)[safe].transpose(2, 0, 1, 3)[..., None]
        weights = jnp.where(mask, jnp.exp(scores - shift), 0.0)
        total = jnp.zeros((slots, kv, heads // kv)).at[target].add(
            jnp.sum(weights, axis=-1).transpose(1, 2, 0, 3), mode="drop")
        summed = jnp.einsum("kprgi,kpid->prkgd", weights, v, preferred_element_type=jnp.float32)
        out = jnp.zeros((slots, kv, heads // kv, dim)).at[target].add(summed, mode="drop")
        out = out / jnp.where(total > 0, total, 1.0)[..., None]
        return (out.reshape(slots, 1, heads, dim).astype(model.dtype),)

    def attend(q, pool_k, pool_v):
        return _per_shard(model, local, q.shape[0], pool_k.shape[0], (SLOT_Q, POOL, POOL, SLOTS, TABLE, SLOTS),
                          (SLOT_Q,))(q, pool_k, pool_v, lengths, page_table, ranks)[0]

    return attend


def decode_step(model: Decoder, layer_weights, pool_k, pool_v, tokens, *, positions, write_page, write_offset,
                page_table, lengths, implementation: str = "gather", ranks=None, readers: int = 1):
    """One decode step of every slot: feed ``tokens [S]`` at RoPE ``positions [S]``, writing their keys/values
    at ``(write_page, write_offset)``; attention reads each slot's first ``lengths [S]`` tokens (this one
    included) through its row of ``page_table [S, bound]``, with ``implementation`` (``pool``, ``gather``,
    ``pallas_tpu`` or ``pallas_gpu``, :func:`resolve_paged_attention`; ``pool`` also takes each slot's
    sample index within its prompt, ``ranks [S]``, below ``readers``). Returns next-token logits ``[S, V]``
    and the pools."""
    slots = tokens.shape[0]
    if implementation in KERNEL_PLATFORM:
        attend, read_pages = kernel_attention(model, lengths, page_table, implementation), None
    elif implementation == "pool":
        attend, read_pages = pool_attention(model, lengths, page_table, ranks, readers), None
    else:
        valid = jnp.arange(page_table.shape[1] * pool_k[0].shape[2], dtype=jnp.int32)[None, :] < lengths[:, None]
        attend = functools.partial(attention, q_segment_ids=jnp.ones((slots, 1), jnp.int32),
                                   kv_segment_ids=valid.astype(jnp.int32), q_offset=valid.shape[1] - 1,
                                   implementation="dense", platform=model.platform)
        read_pages = page_table
    x = model.embed_tokens(tokens[:, None])
    layer = model.layer_fn(positions[:, None], attend)
    new_k, new_v = [], []
    for w, layer_k, layer_v in zip(layer_weights, pool_k, pool_v):
        store = paged_store(model, layer_k, layer_v, write_page, write_offset, read_pages)
        x, (layer_k, layer_v) = layer(x, w, cache_kv=store)
        x = model.constrain(x)
        new_k.append(layer_k)
        new_v.append(layer_v)
    return model.logits(model.final_hidden(x))[:, 0], tuple(new_k), tuple(new_v)


def _needs_page(active, prompt_len, count, page_size):
    """Slots whose pending token opens a page of their own (its cache index is at a page start)."""
    return active & ((prompt_len + count - 1) % page_size == 0)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "bound", "temperature", "top_k", "top_p",
                                             "eos_ids", "pad_id", "implementation", "readers"),
                   donate_argnames=("pool_k", "pool_v"))
def _decode_chunk(graphdef, params, layer_weights, pool_k, pool_v, page_table, free_pages, free_count, copy_from,
                  copy_to, prompt_len, count, tokens, limits, active, sample_ids, key, refill_at, *, chunk, bound,
                  temperature, top_k, top_p, eos_ids, pad_id, implementation, readers):
    """Up to ``chunk`` decode steps of every ``active`` slot; stops early once ``refill_at`` slots have ended,
    or before a step whose new pages the free pages cannot cover.

    First each slot's page ``copy_from`` is copied to ``copy_to`` (a newly admitted sample's copy of its
    prompt's partly filled last page). Per slot: ``tokens`` the pending token (generated, not yet in the
    cache), ``count`` the tokens generated so far (the pending one included), ``prompt_len`` (the cache
    index of its first generated token), ``limits`` its token limit, ``page_table [S, pages]`` its pages
    (the first ``bound`` are read; ids local to the slot's data-parallel shard). A slot takes a page when its
    pending token opens one, from the top of its shard's stack ``free_pages[shard, :free_count[shard]]``
    (slots split evenly over ``free_pages.shape[0]`` shards, in order). ``readers``: the samples per prompt
    (``sample_ids % readers`` is each slot's sample index within its prompt). Returns the pools, the page table, the
    free counts, the ``[S, chunk]`` tokens and log-probs drawn, the new ``count``/``tokens``/``active``, the
    steps run and the live pages the steps attended over.
    """
    model = nnx.merge(graphdef, params)
    weights = per_layer_weights(model, layer_weights)
    slots = tokens.shape[0]
    page_size = pool_k[0].shape[2]
    eos = jnp.asarray(eos_ids, jnp.int32)
    keys = sample_keys(key, sample_ids)
    pool_k, pool_v = copy_pages(model, pool_k, pool_v, copy_from, copy_to)

    shards = free_pages.shape[0]

    def per_shard(opens):
        return opens.reshape(shards, slots // shards).astype(jnp.int32)

    def cond(carry):
        step, ended, _, _, table, free_count, count, active, _, _, _, _ = carry
        needed = jnp.sum(per_shard(_needs_page(active, prompt_len, count, page_size)), axis=1)
        return (step < chunk) & jnp.any(active) & (ended < refill_at) & jnp.all(needed <= free_count)

    def body(carry):
        (step, ended, pool_k, pool_v, table, free_count, count, active, tokens, out_tokens, out_logprobs,
         live_pages) = carry
        slot = prompt_len + count - 1  # cache index of the pending token
        opens = _needs_page(active, prompt_len, count, page_size)
        rank = jnp.cumsum(per_shard(opens), axis=1) - 1  # [shards, slots per shard]
        top = jnp.clip(free_count[:, None] - 1 - rank, 0, free_pages.shape[1] - 1)
        taken = jnp.take_along_axis(free_pages, top, axis=1).reshape(slots)
        column = slot // page_size
        current = jnp.take_along_axis(table, column[:, None], axis=1)[:, 0]
        table = table.at[jnp.arange(slots), column].set(jnp.where(opens, taken, current))
        free_count = free_count - jnp.sum(per_shard(opens), axis=1)
        write_page = jnp.where(active, jnp.where(opens, taken, current), SCRATCH_PAGE)
        lengths = jnp.where(active, slot + 1, 1)  # an idle slot reads its scratch page
        logits, pool_k, pool_v = decode_step(model, weights, pool_k, pool_v, tokens,
                                             positions=prompt_len + count - 1, write_page=write_page,
                                             write_offset=jnp.where(active, slot % page_size, 0),
                                             page_table=table[:, :bound], lengths=lengths,
                                             implementation=implementation, ranks=sample_ids % readers,
                                             readers=readers)
        live_pages = live_pages + jnp.sum(jnp.where(active, (lengths + page_size - 1) // page_size, 0))
        token, logprob = pick(logits, keys, count, temperature, top_k, top_p)
        out_tokens = out_tokens.at[:, step].set(jnp.where(active, token, pad_id))
        out_logprobs = out_logprobs.at[:, step].set(jnp.where(active, logprob, 0.0))
        count = count + active.astype(jnp.int32)
        ends = active & (jnp.any(token[:, None] == eos[None, :], axis=-1) | (count >= limits))
        tokens = jnp.where(active, token, tokens)
        return (step + 1, ended + jnp.sum(ends, dtype=jnp.int32), pool_k, pool_v, table, free_count, count,
                active & ~ends, tokens, out_tokens, out_logprobs, live_pages)

    carry = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), pool_k, pool_v, page_table, free_count, count,
             active, tokens, jnp.full((slots, chunk), pad_id, jnp.int32), jnp.zeros((slots, chunk), jnp.float32),
             jnp.zeros((), jnp.int32))
    (steps, _, pool_k, pool_v, page_table, free_count, count, active, tokens, out_tokens, out_logprobs,
     live_pages) = jax.lax.while_loop(cond, body, carry)
    return (pool_k, pool_v, page_table, free_count, out_tokens, out_logprobs, count, tokens, active, steps,
            live_pages)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _split_weights(graphdef, params):
    return split_layer_weights(nnx.merge(graphdef, params))


class _Prompt:
    """A prompt's state in the engine: its pages on each data-parallel shard it was prefilled on, its
    samples' first tokens, and how many of its samples have not ended (its pages go back when none is left)."""

    def __init__(self, ids: Sequence[int], n: int):
        self.ids, self.remaining = list(ids), n
        self.pages: dict[int, list[int]] = {}  # shard -> its local page ids
        self.first_tokens = self.first_logprobs = None


def generate_paged(model: Decoder, prompt_ids: Sequence[Sequence[int]], *, limits: np.ndarray, temperature: float,
                   top_k: int, top_p: float, eos_ids: tuple[int, ...], seed: int, n: int, pad_id: int,
                   split_layers: bool, max_slots: int, page_size: int | None = None, num_pages: int | None = None,
                   attention: str = "auto", chunk: int = DEFAULT_CHUNK, progress: bool = False
                   ) -> tuple[list[Sample], dict]:
    """The paged engine behind :func:`sftrl_jax.sampling.generate` (``engine="paged"``): the prompt-major
    samples and the figures :func:`sftrl_jax.sampling.engine_stats` takes.

    With several data-parallel shards, the slots and the pool's pages split evenly over them: a slot
    reads and writes only its shard's pages, and a prompt is prefilled on each shard whose slots run
    one of its samples (a shard is chosen where the prompt already is when it has a free slot)."""
    page_size = DEFAULT_PAGE_SIZE if page_size is None else int(page_size)
    longest_prompt, longest_limit = max(map(len, prompt_ids)), int(limits.max())
    # a sample caches its prompt and all its tokens but the last (drawn, never fed back): the prompt's pages,
    # shared, and its own from the prompt's last full page on (a copy of the partly filled one, then new ones)
    per_sequence = max(_pages(length, page_size) + _pages(length + int(limit) - 1, page_size) - length // page_size
                       for length, limit in set(zip(map(len, prompt_ids), limits.tolist())))
    implementation = resolve_paged_attention(attention, model.platform, model.config.head_dim)
    mesh = model.mesh
    shards = data_parallel_size(mesh) if mesh is not None else 1
    check_paged_settings(max_slots, page_size, num_pages, pages_per_sequence=per_sequence, shards=shards)
    slots = -(-max_slots // shards) * shards  # slots split evenly over the data-parallel shards
    shard_slots = slots // shards
    shard_pages = 1 + shard_slots * per_sequence if num_pages is None else num_pages // shards
    num_pages = shard_pages * shards
    config = model.config
    page_bytes = page_size * kv_bytes_per_token(model)
    graphdef, params = nnx.split(model)
    pool_shape = (config.num_kv_heads, num_pages, page_size, config.head_dim)
    layer_pool = pool_sharding(model, slots, pool_shape)
    local = layer_pool.shard_shape(pool_shape) if layer_pool is not None else pool_shape
    per_device = local[1] * page_bytes * local[0] // config.num_kv_heads
    devices = list(mesh.devices.flat) if mesh is not None else jax.local_devices()[:1]
    limit_bytes, what = memory_limit(devices)
    if per_device * len(devices) > limit_bytes:
        raise ValueError(f"sampling.num_pages ({num_pages}): a pool of {num_pages} pages of {page_size} tokens needs "
                         f"{per_device / 2**30:.1f} GiB on each of {len(devices)} devices, more than {what} "
                         f"({limit_bytes / 2**30:.1f} GiB); lower sampling.num_pages or sampling.max_slots")
    layer_weights = _split_weights(graphdef, params) if split_layers else None

    # made on the devices (every process of a multi-host mesh runs the same program)
    zeros = jax.jit(lambda: tuple(jnp.zeros(pool_shape, model.dtype) for _ in range(config.num_layers)),
                    out_shardings=None if layer_pool is None else (layer_pool,) * config.num_layers)
    pool_k, pool_v = zeros(), zeros()
    pools = [PagePool(shard_pages) for _ in range(shards)]  # local page ids; 0 is each shard's scratch page
    peak = 0
    key = jax.random.key(seed)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)

    prompts = [_Prompt(p, n) for p in prompt_ids]
    queue = collections.deque(range(len(prompt_ids) * n))  # sample ids, prompt-major
    tokens_of: list[list[int]] = [[] for _ in range(len(prompt_ids) * n)]
    logprobs_of: list[list[float]] = [[] for _ in range(len(prompt_ids) * n)]
    max_pages = _pages(longest_prompt + longest_limit - 1, page_size)
    table = np.zeros((slots, max_pages), np.int32)
    slot_sample = np.full(slots, -1, np.int64)
    slot_shard = np.arange(slots) // shard_slots
    admitted = np.zeros(slots, np.int64)  # admission order (the latest is preempted first)
    prompt_len = np.zeros(slots, np.int32)
    copy_from = np.zeros(slots, np.int32)  # a newly admitted slot's copy of its prompt's partly filled page
    copy_to = np.zeros(slots, np.int32)
    count = np.zeros(slots, np.int32)
    pending = np.zeros(slots, np.int32)
    slot_limit = np.ones(slots, np.int32)
    decode_steps = admissions = preemptions = 0
    kv_bytes = 0.0
    bar = tqdm(total=len(queue), desc="generate", disable=not progress, dynamic_ncols=True)

    def note_peak() -> None:
        nonlocal peak
        peak = max(peak, sum(pool.in_use for pool in pools))

    def end_sample(sample: int) -> None:
        prompt = prompts[sample // n]
        prompt.remaining -= 1
        if prompt.remaining == 0:
            for shard, pages in prompt.pages.items():
                pools[shard].give_back(pages)
            prompt.pages = {}
        bar.update(1)

    def free_slot(slot: int) -> None:
        own = table[slot, prompt_len[slot] // page_size:]
        pools[slot_shard[slot]].give_back(own[own != SCRATCH_PAGE].tolist())
        table[slot] = SCRATCH_PAGE
        copy_from[slot] = copy_to[slot] = SCRATCH_PAGE
        slot_sample[slot] = -1

    def free_slots_of(shard: int) -> int:
        return int(np.sum((slot_sample < 0) & (slot_shard == shard)))

    def prefill(shard: int) -> None:
        """Prefill on ``shard`` the prompts not there yet of the queued samples that could take its free slots
        now, as many as its free pages hold with a first page for one sample of each."""
        chosen, pages_left = [], len(pools[shard].free)
        for sample in list(queue)[:max(free_slots_of(shard), 1)]:
            index = sample // n
            prompt = prompts[index]
            if shard in prompt.pages or index in chosen:
                continue
            need = _pages(len(prompt.ids), page_size)
            if need + 1 > pages_left:
                break
            chosen.append(index)
            pages_left -= need
        if not chosen:
            return
        rows = bucket_length(len(chosen), maximum=max(slots, 1), minimum=1)
        rows = -(-rows // shards) * shards
        length = -(-bucket_length(max(len(prompts[i].ids) for i in chosen), maximum=1 << 30, minimum=16)
                   // page_size) * page_size
        ids = np.full((rows, length), pad_id, np.int32)
        mask = np.zeros((rows, length), np.int32)
        mask[:, 0] = 1  # padding rows: one token, written to the scratch page
        page_ids = np.full((rows, length // page_size), shard * shard_pages + SCRATCH_PAGE, np.int32)
        first_sample = np.zeros(rows, np.int32)
        for row, index in enumerate(chosen):
            prompt = prompts[index]
            ids[row, :len(prompt.ids)] = prompt.ids
            mask[row, :len(prompt.ids)] = 1
            prompt.pages[shard] = pools[shard].take(_pages(len(prompt.ids), page_size))
            page_ids[row, :len(prompt.pages[shard])] = np.asarray(prompt.pages[shard]) + shard * shard_pages
            first_sample[row] = index * n
        note_peak()
        args = (ids, mask, page_ids, first_sample)
        if mesh is not None:
            args = tuple(place(a, rows_sharding(mesh, a.ndim)) for a in args)
        nonlocal pool_k, pool_v
        pool_k, pool_v, first_tokens, first_logprobs = _prefill(graphdef, params, pool_k, pool_v, *args[:3], key,
                                                                args[3], n=n, **sampling)
        first_tokens, first_logprobs = to_host(first_tokens), to_host(first_logprobs)
        for row, index in enumerate(chosen):
            prompts[index].first_tokens = first_tokens[row]
            prompts[index].first_logprobs = first_logprobs[row]

    def admit() -> None:
        """Fill free slots from the queue, in order, while a first page for each is free on the slot's shard
        (beyond a reserve of one page per two busy slots there, for the pages the busy slots will open)."""
        nonlocal admissions
        while queue and np.any(slot_sample < 0):
            sample = queue[0]
            index, j = divmod(sample, n)
            prompt = prompts[index]
            open_shards = [d for d in range(shards) if free_slots_of(d)]
            resident = [d for d in open_shards if d in prompt.pages]
            shard = resident[0] if resident else max(open_shards, key=lambda d: len(pools[d].free))
            if shard not in prompt.pages:
                prefill(shard)
                if shard not in prompt.pages:
                    return  # not enough free pages for the prompt yet
            token, logprob = int(prompt.first_tokens[j]), float(prompt.first_logprobs[j])
            if token in eos_ids or limits[index] == 1:  # ended at its first token: no slot needed
                queue.popleft()
                tokens_of[sample], logprobs_of[sample] = [token], [logprob]
                end_sample(sample)
                continue
            busy_here = int(np.sum((slot_sample >= 0) & (slot_shard == shard)))
            if len(pools[shard].free) < 1 + busy_here // 2:
                return
            queue.popleft()
            tokens_of[sample], logprobs_of[sample] = [token], [logprob]
            slot = int(np.flatnonzero((slot_sample < 0) & (slot_shard == shard))[0])
            slot_sample[slot] = sample
            admitted[slot] = admissions = admissions + 1
            table[slot] = SCRATCH_PAGE
            full = len(prompt.ids) // page_size
            table[slot, :full] = prompt.pages[shard][:full]
            if full < len(prompt.pages[shard]):  # its own copy of the prompt's partly filled last page
                copy_from[slot] = prompt.pages[shard][full]
                copy_to[slot] = table[slot, full] = pools[shard].take(1)[0]
            prompt_len[slot] = len(prompt.ids)
            count[slot] = 1
            pending[slot] = token
            slot_limit[slot] = limits[index]

    def evict_idle_prompt(shard: int) -> bool:
        """Give back a prompt's pages on ``shard`` where no running sequence reads them (it is prefilled again
        when one of its samples is admitted there); False when there is none."""
        here = (slot_sample >= 0) & (slot_shard == shard)
        running = {int(sample) // n for sample in slot_sample[here]}
        idle = [p for i, p in enumerate(prompts) if shard in p.pages and i not in running]
        if not idle:
            return False
        pools[shard].give_back(idle[-1].pages.pop(shard))
        return True

    def pages_wanted() -> np.ndarray:
        """Pages the busy slots' next step opens, per shard."""
        opens = (slot_sample >= 0) & ((prompt_len + count - 1) % page_size == 0)
        return np.bincount(slot_shard[opens], minlength=shards)

    while True:
        admit()
        if not np.any(slot_sample >= 0) and queue:  # nothing runs: the pages of idle prompts go back, then retry
            for shard in range(shards):
                while evict_idle_prompt(shard):
                    pass
            admit()
        for shard in range(shards):
            while pages_wanted()[shard] > len(pools[shard].free):
                busy = np.flatnonzero((slot_sample >= 0) & (slot_shard == shard))
                if evict_idle_prompt(shard):
                    continue
                if len(busy) > 1:  # preempt the latest admitted sequence; it starts again from the queue
                    slot = int(busy[np.argmax(admitted[busy])])
                    queue.appendleft(int(slot_sample[slot]))
                    free_slot(slot)
                    preemptions += 1
                else:
                    raise ValueError(f"sampling.num_pages ({num_pages}) is too small for one sequence to grow")
        busy = slot_sample >= 0
        if not busy.any():
            if queue:
                raise ValueError(f"sampling.num_pages ({num_pages}) is too small: no page left for the next "
                                 "sample with every slot idle")
            break
        # the pages every busy slot may read during the chunk, as a bucket (powers of two and 1.5x those)
        reach = np.where(busy, prompt_len + np.minimum(count - 1 + chunk, slot_limit - 1), 0)
        bound = min(bucket_length(_pages(int(reach.max()), page_size), maximum=max_pages, minimum=1), max_pages)
        refill_at = min(max(1, slots // 16), len(queue)) if queue else slots + 1
        per_slot = (table, copy_from, copy_to, prompt_len, count, pending, slot_limit, busy,
                    np.where(busy, slot_sample, 0).astype(np.int32))
        if mesh is not None:
            per_slot = tuple(place(a, rows_sharding(mesh, a.ndim)) for a in per_slot)
        table_arg, rest = per_slot[0], per_slot[1:]
        stacks = np.stack([pool.stack() for pool in pools])
        free_counts = np.asarray([len(pool.free) for pool in pools], np.int32)
        (pool_k, pool_v, new_table, free_count, out_tokens, out_logprobs, new_count, new_pending, still, steps,
         live_pages) = _decode_chunk(graphdef, params, layer_weights, pool_k, pool_v, table_arg, stacks, free_counts,
                                     *rest, key, jnp.int32(refill_at), chunk=chunk, bound=bound, eos_ids=eos_ids,
                                     pad_id=pad_id, implementation=implementation,
                                     readers=n if implementation == "pool" else 1, **sampling)
        out_tokens, out_logprobs = to_host(out_tokens), to_host(out_logprobs)
        new_count, new_pending, still, steps = to_host(new_count), to_host(new_pending), to_host(still), int(steps)
        copy_from[:] = copy_to[:] = SCRATCH_PAGE  # done (and not before: the call may read these arrays in place)
        table[:] = to_host(new_table)
        for pool, left in zip(pools, to_host(free_count)):
            pool.taken_down_to(int(left))
        note_peak()
        decode_steps += steps
        # the gather path reads every slot's first ``bound`` pages, the pool path the whole pool, a kernel each
        # busy slot's live ones
        read = {"gather": steps * slots * bound, "pool": steps * num_pages}.get(implementation, int(live_pages))
        kv_bytes += read * page_bytes
        for slot in np.flatnonzero(busy):
            sample = int(slot_sample[slot])
            drawn = int(new_count[slot] - count[slot])
            tokens_of[sample].extend(out_tokens[slot, :drawn].tolist())
            logprobs_of[sample].extend(out_logprobs[slot, :drawn].tolist())
            if not still[slot]:
                free_slot(slot)
                end_sample(sample)
        count[:], pending[:] = new_count, new_pending
    bar.close()
    if any(pool.in_use for pool in pools):
        raise RuntimeError(f"paged engine: {sum(pool.in_use for pool in pools)} pages still in use after the last "
                           "sample")
    samples = [finish_sample(sample // n, np.asarray(tokens_of[sample], np.int32),
                             np.asarray(logprobs_of[sample], np.float32), int(limits[sample // n]), eos_ids)
               for sample in range(len(tokens_of))]
    return samples, {"decode_steps": decode_steps, "slot_steps": decode_steps * slots,
                     "max_pages_in_use": peak, "kv_bytes_read": kv_bytes, "preemptions": preemptions}
