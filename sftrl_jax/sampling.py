"""The one sampler, used by RL rollouts and by evaluation.

``generate`` left-pads a batch of prompts, runs one jit-compiled prefill into a pre-allocated KV
cache, repeats the cache ``n`` times (samples of a prompt share its prefill), and decodes in a
``lax.while_loop`` that stops early once every row has emitted an EOS. Prompt lengths and batch
sizes are rounded up to powers of two so a long evaluation compiles a handful of shapes. Rows
are split over the data-parallel mesh axes; the model keeps its own parameter sharding.

Randomness is counter-based: the token at index ``t`` of sample ``s`` draws from
``fold_in(fold_in(key(seed), s), t)``, where the sample id ``s = prompt index x n + sample index``
counts over the whole request. A sample therefore depends on its seed, its prompt and its own
tokens only, not on its batch-mates, the batch size, the engine, the slot it decodes in or how rows
are sharded (the floating-point rounding of the logits aside).

Two engines share this module's helpers: ``static`` (here) and ``paged`` (:mod:`sftrl_jax.paged`,
continuous batching over a paged KV cache); :func:`generate` runs either and returns the same samples.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from .data.batching import bucket_length
from .models.decoder import Decoder, KVCache, dense_cache_store, init_cache
from .models.hf_io import param_shardings
from .sharding import data_parallel_size, decode_mesh, place, rows_sharding, sampling_rules, to_host

_NEG_INF = -1e30


@dataclasses.dataclass
class Sample:
    prompt_index: int
    tokens: list[int]  # generated ids, ending at (and including) the first EOS
    logprobs: list[float]  # log-probability of each token under the sampling distribution
    stop_reason: Literal["eos", "length"]  # "length": the request's token limit was reached


class NonFiniteLogitsError(FloatingPointError):
    """The model's logits were NaN or infinite where a token was drawn (weights that overflow in the compute
    dtype, or broken in memory): the token means nothing, so generation stops rather than score it."""


def filter_logits(logits: jax.Array, *, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """float32 logits of the sampling distribution (temperature, then top-k, then top-p).

    ``temperature == 0`` leaves the logits as they are (greedy decoding takes the argmax, and the
    reported log-probs are the model's own).
    """
    logits = logits.astype(jnp.float32)
    if temperature > 0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, _NEG_INF, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep a token if the mass strictly before it is < top_p (the top token is always kept)
        before = jnp.cumsum(probs, axis=-1) - probs
        sorted_logits = jnp.where(before < top_p, sorted_logits, _NEG_INF)
        logits = jnp.full_like(logits, _NEG_INF).at[
            jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return logits


def sample_keys(key: jax.Array, sample_ids: jax.Array) -> jax.Array:
    """One key per row, ``fold_in(key, sample_id)``: a sample's randomness whatever row it decodes in."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, sample_ids)


def pick(logits, keys, token_index, temperature, top_k, top_p):
    """(token, its log-prob under the sampling distribution) for each row; row ``r`` draws from
    ``fold_in(keys[r], token_index[r])`` (``token_index`` a scalar or one index per row)."""
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    if temperature > 0:
        token_index = jnp.broadcast_to(jnp.asarray(token_index, jnp.int32), keys.shape)
        token = jax.vmap(lambda k, t, row: jax.random.categorical(jax.random.fold_in(k, t), row))(
            keys, token_index, filtered)
    else:
        token = jnp.argmax(filtered, axis=-1)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(filtered, axis=-1), token[:, None], axis=-1)[:, 0]
    return token.astype(jnp.int32), logprob


def split_layer_weights(model: Decoder) -> list[dict]:
    """Each layer's weights as separate arrays (a copy of the layer stack), for :func:`decode_split`.

    XLA:CPU copies a layer's weights out of the ``[layers, ...]`` stack every time a step slices
    them (it does not fuse the slice into the dot); in a decode loop that is every token. Slicing
    once before the loop removes those copies at the price of a second copy of the layer weights
    while the loop runs (``docs/design.md``, "Stacked layers and `lax.scan`"). GPU and TPU fuse
    the slice into the matmul, so they decode from the stack (:meth:`Decoder.decode`).
    """
    arrays = model.layers.arrays()
    split = [{name: value[i] for name, value in arrays.items()} for i in range(model.config.num_layers)]
    # the barrier keeps XLA from sinking the slices back into the loop that uses them
    return jax.lax.optimization_barrier(split)


def decode_split(model: Decoder, tokens, cache: KVCache, layer_weights: list[dict]) -> tuple[jax.Array, KVCache]:
    """:meth:`Decoder.decode` from per-layer weights (:func:`split_layer_weights`) and a split cache
    (:meth:`KVCache.split`), the layers in a Python loop: the same numbers, nothing sliced from a stack."""
    ones = jnp.ones((tokens.shape[0], 1), jnp.int32)
    x, layer, cache_valid = model.layer_inputs(tokens[:, None], attention_mask=ones, cache=cache)
    cache_k, cache_v = [], []
    for w, layer_k, layer_v in zip(layer_weights, cache.k, cache.v):
        x, (layer_k, layer_v) = layer(x, w, cache_kv=dense_cache_store(layer_k, layer_v, None, cache.index,
                                                                      model.dtype))
        x = model.constrain(x)
        cache_k.append(layer_k)
        cache_v.append(layer_v)
    cache = KVCache(k=tuple(cache_k), v=tuple(cache_v), valid=cache_valid, index=cache.index + 1)
    return model.logits(model.final_hidden(x))[:, 0], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "n", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "eos_ids", "pad_id", "cache_dtype", "split_layers"))
def _generate_batch(graphdef, params, prompt_ids, prompt_mask, limits, key, first_sample, *, n, max_new_tokens,
                    temperature, top_k, top_p, eos_ids, pad_id, cache_dtype, split_layers):
    """One static batch: ``limits [rows]`` the new-token limit of each prompt's samples (0: a padding row);
    row ``r`` of the ``rows x n`` outputs is sample ``first_sample + r`` of the request."""
    model = nnx.merge(graphdef, params)
    layer_weights = split_layer_weights(model) if split_layers else None  # once, outside the decode loop
    rows, prompt_len = prompt_ids.shape
    cache = init_cache(model.config, rows, prompt_len + max_new_tokens, cache_dtype)
    logits, cache = model.prefill(prompt_ids, prompt_mask, cache)
    if n > 1:  # every sample of a prompt continues from the same prefill
        cache = jax.tree.map(lambda x: jnp.repeat(x, n, axis=1 if x.ndim == 5 else 0) if x.ndim else x, cache)
        logits, limits = jnp.repeat(logits, n, axis=0), jnp.repeat(limits, n, axis=0)
    if split_layers:
        cache = cache.split()
    total = rows * n
    eos = jnp.asarray(eos_ids, jnp.int32)
    keys = sample_keys(key, first_sample + jnp.arange(total, dtype=jnp.int32))

    def cond(carry):
        step, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, logits, cache, done, tokens, logprobs = carry
        token, logprob = pick(logits, keys, step, temperature, top_k, top_p)
        token = jnp.where(done, pad_id, token)
        tokens = tokens.at[:, step].set(token)
        logprobs = logprobs.at[:, step].set(jnp.where(done, 0.0, logprob))
        done = done | jnp.any(token[:, None] == eos[None, :], axis=-1) | (step + 1 >= limits)
        if split_layers:
            logits, cache = decode_split(model, token, cache, layer_weights)
        else:
            logits, cache = model.decode(token, cache)
        return step + 1, logits, cache, done, tokens, logprobs

    carry = (jnp.zeros((), jnp.int32), logits, cache, limits <= 0,
             jnp.full((total, max_new_tokens), pad_id, jnp.int32), jnp.zeros((total, max_new_tokens), jnp.float32))
    steps, _, _, _, tokens, logprobs = jax.lax.while_loop(cond, body, carry)
    return tokens, logprobs, steps


def memory_limit(devices) -> tuple[int, str]:
    """Bytes the sampler's buffers may take on ``devices`` together, and what bounds them: the devices'
    own memory where they report it (GPU, TPU; read from this process's devices, the others' taken as equal),
    else the host's physical memory (CPU devices share it)."""
    local = [d for d in devices if d.process_index == jax.process_index()]
    stats = [getattr(d, "memory_stats", lambda: None)() or {} for d in local]
    if stats and all(s.get("bytes_limit") for s in stats):
        per_device = min(s["bytes_limit"] for s in stats)
        return per_device * len(devices), f"the {len(devices)} devices' memory"
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this host's memory"


def check_generation_size(model: Decoder, rows: int, prompt_len: int, max_new_tokens: int, n: int) -> None:
    """Refuse a generation batch whose KV cache and token buffers alone exceed the memory there is, before
    anything is allocated (XLA would abort the process instead). ``rows`` prompts of ``prompt_len`` tokens,
    ``n`` samples each, ``max_new_tokens`` new tokens."""
    config = model.config
    total = rows * n
    length = prompt_len + max_new_tokens
    cache = 2 * config.num_layers * total * config.num_kv_heads * length * config.head_dim
    needed = cache * jnp.dtype(model.dtype).itemsize + total * length + total * max_new_tokens * 8
    devices = list(model.mesh.devices.flat) if model.mesh is not None else jax.local_devices()[:1]
    limit, what = memory_limit(devices)
    if needed > limit:
        raise ValueError(f"sampling.max_new_tokens ({max_new_tokens}): generating {total} rows of up to {length} "
                         f"tokens needs {needed / 2**30:.1f} GiB for the KV cache and token buffers alone, more "
                         f"than {what} ({limit / 2**30:.1f} GiB); lower sampling.max_new_tokens (or "
                         "sampling.batch_size / sampling.n)")


def generation_rows(batch_size: int, num_prompts: int, shards: int) -> int:
    """Prompts per compiled generation batch: ``batch_size`` (or fewer when there are fewer prompts)
    rounded up to a bucket (powers of two and 1.5x those) and to a multiple of the data-parallel ``shards``."""
    rows = max(bucket_length(min(batch_size, num_prompts), maximum=max(batch_size, 1), minimum=1), shards)
    return -(-rows // shards) * shards


def on_decode_mesh(model: Decoder, tensor_parallel: int | None = None) -> Decoder:
    """``model`` (the same arrays, not moved) with its ``mesh`` the decode mesh of ``tensor_parallel``
    (:func:`sftrl_jax.sharding.decode_mesh`), which every function of the model and the sampler then lays
    its work out on. A ``tensor_parallel`` that is set must divide the model's query and kv heads."""
    if model.mesh is None:
        return model
    c = model.config
    if tensor_parallel is not None and (c.num_heads % tensor_parallel or c.num_kv_heads % tensor_parallel):
        raise ValueError(f"sampling.tensor_parallel ({tensor_parallel}): must divide the model's {c.num_heads} "
                         f"query heads and {c.num_kv_heads} kv heads")
    mesh = decode_mesh(model.mesh, tensor_parallel)
    if mesh is model.mesh:
        return model
    moved = nnx.merge(*nnx.split(model))
    moved.mesh = mesh  # the same devices in the same order, so the platform is the model's
    return moved


def sampling_layout(model: Decoder, tensor_parallel: int | None = None) -> Decoder:
    """The same model laid out for decoding; made once per rollout phase, not per token.

    Parameters move to :func:`sftrl_jax.sharding.sampling_rules` on the decode mesh (:func:`on_decode_mesh`:
    ``tensor_parallel`` devices on its ``tensor`` axis, default the mesh's): whole on every data-parallel
    shard, split over ``tensor``, so a decode step reads local weights instead of all-gathering the FSDP
    shards of every layer for each token; and the weights every step casts to the compute dtype are cast
    once here (norm weights, read in float32, keep theirs). The returned model's ``mesh`` is the decode
    mesh. The tokens and log-probs are those of the training layout up to the rounding of sums split over
    more devices. The price is one more copy of the weights (in the compute dtype) while sampling;
    ``sftrl-jax compile`` shows both the copy and the bytes each decode step saves (``docs/scaling.md``).
    """
    model = on_decode_mesh(model, tensor_parallel)
    if model.mesh is None or model.mesh.size == 1:
        return model
    graphdef, state = nnx.split(model)
    shardings = param_shardings(model, sampling_rules(model.rules))
    keeps_dtype = nnx.to_pure_dict(jax.tree.map(lambda var: "norm" in var.get_metadata()["logical_axes"],
                                                nnx.state(model, nnx.Param),
                                                is_leaf=lambda x: isinstance(x, nnx.Variable)))

    @functools.partial(jax.jit, out_shardings=shardings)
    def relayout(params):
        return jax.tree.map(lambda x, keep: x if keep else x.astype(model.dtype), params, keeps_dtype)

    return nnx.merge(graphdef, relayout(nnx.to_pure_dict(state)))


ENGINES = ("static", "paged")


def generate(
    model: Decoder,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    seed: int = 0,
    n: int = 1,
    batch_size: int = 64,
    pad_token_id: int = 0,
    progress: bool = False,
    split_layer_weights: bool | None = None,
    engine: Literal["static", "paged"] = "static",
    max_slots: int | None = None,
    page_size: int | None = None,
    num_pages: int | None = None,
    paged_attention: str = "auto",
    stats: dict | None = None,
) -> list[Sample]:
    """Sample ``n`` continuations of each prompt.

    Returns ``len(prompt_ids) * n`` samples, prompt-major: sample ``j`` of prompt ``i`` is at
    ``i * n + j`` (its sample id, which with ``seed`` fixes its randomness). ``temperature=0`` is greedy.
    ``max_new_tokens``: the new-token limit of every prompt, or one limit per prompt.

    ``engine="static"``: batches of ``batch_size`` prompts (rounded to a bucket, powers of two and 1.5x those,
    and to the data-parallel size), each decoded until its longest response ends. ``engine="paged"``
    (:mod:`sftrl_jax.paged`): ``max_slots`` decode slots (default: the static engine's rows, its
    batch of prompts x ``n``) refilled from the queue as sequences end, keys/values in a pool of
    ``num_pages`` pages of ``page_size`` tokens (defaults :data:`sftrl_jax.paged.DEFAULT_PAGE_SIZE`;
    enough pages for every slot's longest sequence, the static engine's cache), its decode attention
    ``paged_attention`` (:func:`sftrl_jax.paged.resolve_paged_attention`: ``auto`` is JAX's Pallas TPU
    or GPU paged-attention kernel, on CPU an XLA pass over the whole pool). Both give the same samples.
    ``split_layer_weights`` decodes from per-layer copies of the layer weights made once per batch
    (:func:`split_layer_weights`; same tokens and log-probs, one extra copy of the layer
    weights in memory); default: on a CPU mesh only, where slicing the stacked weights copies
    them on every decode step. GPU and TPU fuse that slice into the matmul.
    ``stats``: a dict filled with the generation's figures (:func:`engine_stats`).
    """
    if engine not in ENGINES:
        raise ValueError(f"sampling.engine: expected one of {' | '.join(ENGINES)}, got {engine!r}")
    if not prompt_ids:
        return []
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate: every prompt needs at least one token")
    limits = request_limits(max_new_tokens, len(prompt_ids))
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_ids
    eos_ids = tuple(int(e) for e in ([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id))
    if not eos_ids:
        eos_ids = (-1,)  # no EOS: every row runs to its limit
    if split_layer_weights is None:
        split_layer_weights = model.platform == "cpu"  # the platform of the model's mesh
    tick = time.perf_counter()
    if engine == "paged":
        from .paged import generate_paged

        samples, figures = generate_paged(
            model, prompt_ids, limits=limits, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
            eos_ids=eos_ids, seed=seed, n=n, pad_id=pad_token_id, split_layers=bool(split_layer_weights),
            max_slots=max_slots if max_slots is not None else static_rows(model, batch_size, len(prompt_ids)) * n,
            page_size=page_size,
            num_pages=num_pages, attention=paged_attention, progress=progress)
    else:
        samples, figures = _generate_static(
            model, prompt_ids, limits=limits, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
            eos_ids=eos_ids, seed=seed, n=n, batch_size=batch_size, pad_id=pad_token_id,
            split_layers=bool(split_layer_weights), progress=progress)
    if stats is not None:
        stats.update(engine_stats(samples, seconds=time.perf_counter() - tick, **figures))
    return samples


def static_rows(model: Decoder, batch_size: int, prompts: int) -> int:
    """Prompts per batch of the static engine for ``prompts`` prompts (:func:`generation_rows` on the model's
    data-parallel size)."""
    return generation_rows(batch_size, prompts, data_parallel_size(model.mesh) if model.mesh is not None else 1)


def request_limits(max_new_tokens: int | Sequence[int], prompts: int) -> np.ndarray:
    """The new-token limit of each of ``prompts`` requests (int32), from one limit or one per prompt."""
    if isinstance(max_new_tokens, (int, np.integer)):
        limits = np.full(prompts, int(max_new_tokens), np.int32)
    else:
        limits = np.asarray(list(max_new_tokens), np.int32)
        if limits.shape != (prompts,):
            raise ValueError(f"generate: max_new_tokens has {limits.size} limits for {prompts} prompts")
    if limits.min() < 1:
        raise ValueError(f"sampling.max_new_tokens: every limit must be >= 1, got {int(limits.min())}")
    return limits


def engine_stats(samples: Sequence[Sample], *, seconds: float, decode_steps: int, slot_steps: int,
                 max_pages_in_use: int = 0, kv_bytes_read: float = 0.0, preemptions: int = 0) -> dict:
    """One generation's figures: ``useful_tokens`` (tokens of the returned samples), ``decode_steps``,
    ``slot_steps`` (decode slots x steps, the rows each step computed), ``slot_utilisation`` (useful
    tokens / slot steps), ``useful_tokens_per_s``, ``max_pages_in_use`` (the paged engine's pool),
    ``kv_bytes_read`` (keys/values the decode steps' attention read) and ``preemptions`` (sequences the
    paged engine restarted when its pool ran out)."""
    useful = sum(len(s.tokens) for s in samples)
    return {"useful_tokens": useful, "decode_steps": int(decode_steps), "slot_steps": int(slot_steps),
            "slot_utilisation": useful / slot_steps if slot_steps else 0.0, "seconds": seconds,
            "useful_tokens_per_s": useful / seconds if seconds > 0 else 0.0,
            "max_pages_in_use": int(max_pages_in_use), "kv_bytes_read": float(kv_bytes_read),
            "preemptions": int(preemptions)}


def generation_metrics(stats: dict, prefix: str = "") -> dict:
    """The figures of :func:`engine_stats` that RL logs and evaluation reports: useful tokens per second,
    slot utilisation (useful tokens / (slots x decode steps)) and the paged engine's peak pages in use."""
    if not stats:
        return {}
    return {f"{prefix}useful_tokens_per_s": float(stats["useful_tokens_per_s"]),
            f"{prefix}slot_utilisation": float(stats["slot_utilisation"]),
            f"{prefix}max_pages_in_use": int(stats["max_pages_in_use"])}


def finish_sample(prompt_index: int, tokens: np.ndarray, logprobs: np.ndarray, limit: int,
                  eos_ids: Sequence[int]) -> Sample:
    """The sample from a row of generated ``tokens``: up to and including its first stop id, else its
    first ``limit`` tokens (stop reason ``length``).

    A token's log-prob is NaN or infinite whenever the logits it was drawn from hold a NaN or a +inf (a -inf
    logit is only a token that cannot be drawn), so a non-finite one raises :class:`NonFiniteLogitsError`."""
    tokens, logprobs = tokens[:limit], logprobs[:limit]
    hits = np.flatnonzero(np.isin(tokens, eos_ids))
    end = int(hits[0]) + 1 if hits.size else limit
    broken = np.flatnonzero(~np.isfinite(logprobs[:end]))
    if broken.size:
        raise NonFiniteLogitsError(
            f"sampling: the model's logits are NaN or infinite at new token {int(broken[0])} of a sample of "
            f"prompt {prompt_index} (0-based, in this call's prompts); generation stopped. Check the weights "
            "(model.path) and model.compute_dtype")
    return Sample(prompt_index=prompt_index, tokens=tokens[:end].tolist(), logprobs=logprobs[:end].tolist(),
                  stop_reason="eos" if hits.size else "length")


def kv_bytes_per_token(model: Decoder) -> int:
    """Bytes of keys and values one cached token holds over all layers (in the model's compute dtype)."""
    c = model.config
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * jnp.dtype(model.dtype).itemsize


def _generate_static(model: Decoder, prompt_ids, *, limits, temperature, top_k, top_p, eos_ids, seed, n,
                     batch_size, pad_id, split_layers, progress) -> tuple[list[Sample], dict]:
    """The static engine: batches of prompts, each decoded until its longest response ends."""
    mesh = model.mesh
    graphdef, params = nnx.split(model)
    batch_prompts = static_rows(model, batch_size, len(prompt_ids))
    max_new_tokens = int(limits.max())
    check_generation_size(model, batch_prompts, max(map(len, prompt_ids)), max_new_tokens, n)
    key = jax.random.key(seed)
    samples: list[Sample] = []
    decode_steps = slot_steps = 0
    kv_bytes = 0.0
    starts = range(0, len(prompt_ids), batch_prompts)
    for start in tqdm(starts, desc="generate", disable=not progress, dynamic_ncols=True):
        chunk = prompt_ids[start:start + batch_prompts]
        ids, mask, batch_limits = _prompt_batch(chunk, limits[start:start + batch_prompts], batch_prompts, pad_id,
                                                mesh)
        tokens, logprobs, steps = _generate_batch(
            graphdef, params, ids, mask, batch_limits, key, jnp.int32(start * n), n=n,
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            eos_ids=eos_ids, pad_id=pad_id, cache_dtype=jnp.dtype(model.dtype).name, split_layers=split_layers)
        tokens, logprobs = to_host(tokens), to_host(logprobs)  # gathered from every process when multi-host
        steps = int(steps)
        decode_steps += steps
        slot_steps += steps * batch_prompts * n
        # every decode step reads the whole cache: rows x (prompt + max_new_tokens) positions
        kv_bytes += steps * batch_prompts * n * (ids.shape[1] + max_new_tokens) * kv_bytes_per_token(model)
        for row in range(len(chunk) * n):
            prompt = start + row // n
            samples.append(finish_sample(prompt, tokens[row], logprobs[row], int(limits[prompt]), eos_ids))
    return samples, {"decode_steps": decode_steps, "slot_steps": slot_steps, "kv_bytes_read": kv_bytes}


def _prompt_batch(chunk: Sequence[Sequence[int]], chunk_limits: np.ndarray, rows: int, pad_id: int, mesh):
    """Left-padded ``ids``/``mask`` ``[rows, bucketed length]`` and the rows' new-token ``limits`` (0 for
    padding rows), on ``mesh`` when given."""
    length = bucket_length(max(len(p) for p in chunk), maximum=1 << 30, minimum=16)
    ids = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    for row, prompt in enumerate(chunk):
        ids[row, length - len(prompt):] = prompt
        mask[row, length - len(prompt):] = 1
    limits = np.zeros(rows, np.int32)
    limits[:len(chunk)] = chunk_limits
    if mesh is None:
        return ids, mask, limits
    return (place(ids, rows_sharding(mesh, 2)), place(mask, rows_sharding(mesh, 2)),
            place(limits, rows_sharding(mesh, 1)))


def stop_token_ids(tokenizer, model_config, model_dir: str | None = None) -> list[int]:
    """The ids that end a response (the one place that decides them, for rollouts, evaluation and the
    probe): the tokenizer's EOS, the model config's ``eos_token_id`` (int or list), and the
    ``eos_token_id`` of ``generation_config.json`` in ``model_dir`` (a path; default: the directory the
    model was read from, ``model_config.source_dir``) when there is one, as ``transformers``/vLLM stop."""
    from .models.hf_io import generation_eos_token_ids

    directory = model_dir if model_dir is not None else getattr(model_config, "source_dir", None)
    return sorted({tokenizer.eos_token_id, *model_config.eos_token_ids, *generation_eos_token_ids(directory)}
                  - {None})


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


class TextSampler:
    """The sampler as RL rollouts, evaluation and the pipeline's probe use it: a model in its decode
    layout (made once, :func:`sampling_layout` with ``options.tensor_parallel``), the stop and pad ids, and
    responses decoded to text (the stop token left out) with ``options`` (:class:`sftrl_jax.config.SamplingOptions`)."""

    def __init__(self, model: Decoder, tokenizer, options, *, progress: bool = False):
        self.model = sampling_layout(model, options.tensor_parallel)
        self.tokenizer, self.options, self.progress = tokenizer, options, progress
        self.stop_ids = stop_token_ids(tokenizer, model.config)
        self.pad_id = pad_token_id(tokenizer)
        self.stats: dict = {}

    def sample(self, prompt_ids: Sequence[Sequence[int]], *, seed: int, n: int | None = None
               ) -> tuple[list[Sample], list[str]]:
        """``n`` (default ``options.n``) samples per prompt, prompt-major, and their texts. The generation's
        figures (:func:`engine_stats`) are added up in ``self.stats``."""
        o = self.options
        stats: dict = {}
        samples = generate(self.model, prompt_ids, max_new_tokens=o.max_new_tokens, temperature=o.temperature,
                           top_p=o.top_p, top_k=o.top_k, eos_token_id=self.stop_ids, seed=seed,
                           n=o.n if n is None else n, batch_size=o.batch_size, pad_token_id=self.pad_id,
                           progress=self.progress, engine=o.engine, max_slots=o.max_slots, page_size=o.page_size,
                           num_pages=o.num_pages, paged_attention=o.paged_attention, stats=stats)
        self.stats = add_stats(self.stats, stats)
        bodies = [s.tokens[:-1] if s.stop_reason == "eos" else s.tokens for s in samples]
        return samples, self.tokenizer.batch_decode(bodies, skip_special_tokens=False)


def add_stats(total: dict, stats: dict) -> dict:
    """Two generations' :func:`engine_stats` as one (counts and seconds added, the pool's peak kept)."""
    if not total:
        return dict(stats)
    out = {key: total[key] + stats[key] for key in ("useful_tokens", "decode_steps", "slot_steps", "seconds",
                                                    "kv_bytes_read", "preemptions")}
    out["max_pages_in_use"] = max(total["max_pages_in_use"], stats["max_pages_in_use"])
    out["slot_utilisation"] = out["useful_tokens"] / out["slot_steps"] if out["slot_steps"] else 0.0
    out["useful_tokens_per_s"] = out["useful_tokens"] / out["seconds"] if out["seconds"] > 0 else 0.0
    return out
