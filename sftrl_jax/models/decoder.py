"""One decoder-only transformer for Qwen2/2.5, Llama-3.x and Qwen3.

Layer weights are stacked along a leading ``layers`` axis and applied with ``jax.lax.scan``, so a
28-layer model compiles one layer body, and rematerialisation is one ``jax.checkpoint`` around it.
``scan_layers=False`` (a :class:`~sftrl_jax.models.options.ModelOptions` field, like every build
choice) unrolls that loop instead (same weights, same math): no per-layer slicing
of the stacked weights and no stacked buffers for the backward pass, which makes steps of shallow
models markedly faster, at a compile time that grows with depth.
Weights are stored in "x @ W" layout with heads split out (``q_proj: [layers, embed, heads,
head_dim]``) so tensor parallelism can shard heads; :mod:`sftrl_jax.models.hf_io` converts to
and from the Hugging Face ``[out, in]`` layout.

Calling conventions (all integer arrays int32):

* ``model(input_ids, attention_mask=None, positions=None, segment_ids=None)`` -> float32 logits
  ``[batch, seq, vocab]``. ``attention_mask`` marks real tokens (left padding for sampling);
  ``segment_ids`` marks packed sequences (attention never crosses a segment, and positions
  restart per segment unless given).
* ``model.prefill(input_ids, attention_mask, cache)`` and ``model.decode(tokens, cache)`` run the
  same layers against a :class:`KVCache` for sampling.

Attention (:mod:`sftrl_jax.models.attention`) masks by segment ids: padding is segment 0, real
tokens their segment (1 when unpacked). ``options.attention`` picks the implementation for the
forward pass without a cache ("auto" resolves from the mesh's platform, once, in ``__init__``); the
KV-cache path (prefill/decode) always uses ``dense``.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from ..sharding import DEFAULT_RULES, Rules, named_sharding
from .attention import attention, resolve_attention
from .config import ModelConfig
from .layers import apply_rope, default_positions, dense, rms_norm, rope_inv_freq, rope_tables
from .options import ModelOptions, options_or_defaults

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


class KVCache(NamedTuple):
    """Per-layer keys/values ``[layers, batch, kv_heads, max_len, head_dim]``.

    Heads before positions: the attention dots then read a layer's cache as it is stored, with
    the batch and head axes leading (the layout XLA's batched dot wants), instead of transposing the
    whole cache on every decode step.

    ``valid [batch, max_len]`` marks filled, non-padding slots; ``index`` is the next slot written
    (shared by all rows: prompts are left-padded to a common length).

    :meth:`split` gives the same cache with ``k`` and ``v`` as tuples of per-layer arrays
    ``[batch, kv_heads, max_len, head_dim]``, the form :meth:`Decoder.decode` takes together with
    per-layer weights (no layer slicing inside a decode loop).
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2] if isinstance(self.k, tuple) else self.k.shape[3]

    def split(self) -> KVCache:
        return self._replace(k=tuple(self.k), v=tuple(self.v))


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype="float32") -> KVCache:
    shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
    return KVCache(
        k=jnp.zeros(shape, as_dtype(dtype)),
        v=jnp.zeros(shape, as_dtype(dtype)),
        valid=jnp.zeros((batch, max_len), jnp.bool_),
        index=jnp.zeros((), jnp.int32),
    )


def _mesh_platform(mesh) -> str:
    """"cpu", "gpu" or "tpu": the platform of ``mesh``'s devices ("cpu" without a mesh)."""
    if mesh is None:
        return "cpu"
    devices = getattr(mesh, "devices", None)
    if devices is not None:
        return devices.flat[0].platform
    device = getattr(mesh, "abstract_device", None)  # an AbstractMesh may carry its device kind
    return getattr(device, "platform", None) or "cpu"


def _param(rngs: nnx.Rngs, shape, axes, dtype, *, fan_in: int | None = None, value: float | None = None):
    if value is not None:
        data = jnp.full(shape, value, dtype)
    else:
        std = 0.02 if fan_in is None else fan_in**-0.5
        data = (std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)).astype(dtype)
    return nnx.Param(data, logical_axes=tuple(axes))


class DecoderLayers(nnx.Module):
    """All decoder layers' weights, stacked on the leading ``layers`` axis."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, param_dtype):
        c = config
        L, E, H, KV, D, M = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                             c.intermediate_size)
        p = lambda shape, axes, **kw: _param(rngs, shape, axes, param_dtype, **kw)  # noqa: E731
        self.input_norm = p((L, E), ("layers", "norm"), value=1.0)
        self.q_proj = p((L, E, H, D), ("layers", "embed", "heads", "head_dim"), fan_in=E)
        self.k_proj = p((L, E, KV, D), ("layers", "embed", "kv_heads", "head_dim"), fan_in=E)
        self.v_proj = p((L, E, KV, D), ("layers", "embed", "kv_heads", "head_dim"), fan_in=E)
        self.o_proj = p((L, H, D, E), ("layers", "heads", "head_dim", "embed"), fan_in=H * D)
        if c.qkv_bias:
            self.q_bias = p((L, H, D), ("layers", "heads", "head_dim"), value=0.0)
            self.k_bias = p((L, KV, D), ("layers", "kv_heads", "head_dim"), value=0.0)
            self.v_bias = p((L, KV, D), ("layers", "kv_heads", "head_dim"), value=0.0)
        if c.o_bias:
            self.o_bias = p((L, E), ("layers", "embed"), value=0.0)
        if c.qk_norm:
            self.q_norm = p((L, D), ("layers", "norm"), value=1.0)
            self.k_norm = p((L, D), ("layers", "norm"), value=1.0)
        self.post_norm = p((L, E), ("layers", "norm"), value=1.0)
        self.gate_proj = p((L, E, M), ("layers", "embed", "mlp"), fan_in=E)
        self.up_proj = p((L, E, M), ("layers", "embed", "mlp"), fan_in=E)
        self.down_proj = p((L, M, E), ("layers", "mlp", "embed"), fan_in=M)
        if c.mlp_bias:
            self.gate_bias = p((L, M), ("layers", "mlp"), value=0.0)
            self.up_bias = p((L, M), ("layers", "mlp"), value=0.0)
            self.down_bias = p((L, E), ("layers", "embed"), value=0.0)

    def arrays(self) -> dict[str, jax.Array]:
        return {name: var[...] for name, var in vars(self).items() if isinstance(var, nnx.Param)}


def dense_cache_store(cache_k, cache_v, layer, index, dtype):
    """The KV-cache step of a decoder layer over a dense :class:`KVCache`: write the new keys/values at
    slot ``index``, then read the layer's whole cache. ``layer`` None: the cache is this layer's own
    ``[B, KV, S, D]`` (a split cache); otherwise it is the whole ``[layers, B, KV, S, D]`` stack, carried
    through the layer scan so only new positions are written. Returns ``store(k, v) -> (keys, values,
    (cache_k, cache_v))``, what :func:`_decoder_layer` takes as ``cache_kv``."""

    def write(cache, new):
        new = new.astype(cache.dtype)
        if layer is None:
            return jax.lax.dynamic_update_slice(cache, new, (0, 0, index, 0))
        return jax.lax.dynamic_update_slice(cache, new[None], (layer, 0, 0, index, 0))

    def read(cache):
        whole = cache if layer is None else jax.lax.dynamic_index_in_dim(cache, layer, 0, keepdims=False)
        return whole.astype(dtype)

    def store(k, v):
        new_k, new_v = write(cache_k, k), write(cache_v, v)
        return read(new_k), read(new_v), (new_k, new_v)

    return store


def _decoder_layer(x, w, *, config: ModelConfig, dtype, cos, sin, attend, cache_kv):
    """One pre-norm decoder block. ``w`` holds this layer's weights (no ``layers`` axis);
    ``attend(q, k, v)`` is the attention with its masking bound. ``cache_kv`` (None without a cache):
    ``store(k, v) -> (keys, values, new cache)`` puts this step's keys/values ``[B, KV, T, D]`` in the
    cache and returns the keys/values to attend (:func:`dense_cache_store`; the paged engine's pages)."""
    c = config
    cast = lambda name: w[name].astype(dtype)  # noqa: E731
    h = rms_norm(x, w["input_norm"], c.rms_norm_eps)
    q = dense(h, cast("q_proj"))  # [B, T, H, D]
    k = dense(h, cast("k_proj")).transpose(0, 2, 1, 3)  # keys/values heads-first [B, KV, T, D]
    v = dense(h, cast("v_proj")).transpose(0, 2, 1, 3)
    if c.qkv_bias:
        q, k, v = q + cast("q_bias"), k + cast("k_bias")[:, None], v + cast("v_bias")[:, None]
    if c.qk_norm:
        q = rms_norm(q, w["q_norm"], c.rms_norm_eps)
        k = rms_norm(k, w["k_norm"], c.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos[:, None], sin[:, None], heads_axis=1)
    if cache_kv is not None:
        k, v, new_kv = cache_kv(k, v)
    else:
        new_kv = None
    attn = attend(q, k, v)
    out = dense(attn, cast("o_proj"), n_in=2)
    if c.o_bias:
        out = out + cast("o_bias")
    x = x + out
    h = rms_norm(x, w["post_norm"], c.rms_norm_eps)
    gate = dense(h, cast("gate_proj"))
    up = dense(h, cast("up_proj"))
    if c.mlp_bias:
        gate, up = gate + cast("gate_bias"), up + cast("up_bias")
    down = dense(jax.nn.silu(gate) * up, cast("down_proj"))
    if c.mlp_bias:
        down = down + cast("down_bias")
    return x + down, new_kv


class Decoder(nnx.Module):
    """The model of ``config`` built as ``options`` say (None: the defaults; ``options.path`` is not
    read), its parameters laid out for ``mesh`` under ``rules``."""

    def __init__(self, config: ModelConfig, options: ModelOptions | None = None, *, rngs: nnx.Rngs,
                 mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES):
        o = options_or_defaults(options)
        if o.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {o.remat!r}; choose one of {sorted(REMAT_POLICIES)}")
        self.config = config
        # the options are kept as plain attributes: they are static (part of the graphdef), which
        # must hash, and a ModelOptions does not
        self.param_dtype = as_dtype(o.dtype)
        self.dtype = as_dtype(o.compute_dtype if o.compute_dtype is not None else o.dtype)
        self.remat = o.remat
        self.scan_layers = bool(o.scan_layers)
        self.mesh = mesh
        self.rules = tuple(rules)
        # the platform comes from the mesh, so model math never asks jax.default_backend(); "auto"
        # is resolved here, once
        self.platform = _mesh_platform(mesh)
        self.attention = resolve_attention(o.attention, self.platform)
        self.attention_block_size = int(o.attention_block_size)
        # positions per chunk where a loss turns hidden states into log-probs (losses.chunked_logprobs);
        # 0: all at once
        self.logits_chunk_size = int(o.logits_chunk_size)
        c = config
        self.embed = _param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), self.param_dtype)
        self.layers = DecoderLayers(c, rngs=rngs, param_dtype=self.param_dtype)
        self.final_norm = _param(rngs, (c.hidden_size,), ("norm",), self.param_dtype, value=1.0)
        if not c.tie_word_embeddings:
            self.lm_head = _param(
                rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), self.param_dtype, fan_in=c.hidden_size
            )

    # ------------------------------------------------------------------ public entry points
    def __call__(self, input_ids, *, attention_mask=None, positions=None, segment_ids=None) -> jax.Array:
        hidden, _ = self.forward(input_ids, attention_mask=attention_mask, positions=positions,
                                 segment_ids=segment_ids)
        return self.logits(hidden)

    def prefill(self, input_ids, attention_mask, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Run a left-padded prompt batch into ``cache``; returns the last position's logits ``[B, V]``."""
        hidden, cache = self.forward(input_ids, attention_mask=attention_mask, cache=cache)
        return self.logits(hidden[:, -1:])[:, 0], cache

    def decode(self, tokens, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Append one token per row (``tokens [B]``); returns next-token logits ``[B, V]``."""
        ones = jnp.ones((tokens.shape[0], 1), jnp.int32)
        hidden, cache = self.forward(tokens[:, None], attention_mask=ones, cache=cache)
        return self.logits(hidden)[:, 0], cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits from final hidden states (matmul in the compute dtype, fp32 accumulation)."""
        if self.config.tie_word_embeddings:
            return dense(hidden, self.embed[...].astype(self.dtype).T, preferred_element_type=jnp.float32)
        return dense(hidden, self.lm_head[...].astype(self.dtype), preferred_element_type=jnp.float32)

    def forward(self, input_ids, *, attention_mask=None, positions=None, segment_ids=None,
                cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """Final hidden states ``[B, T, E]`` (compute dtype) and the updated cache (``None`` without one).

        The layers run as one ``lax.scan`` over the ``[layers, ...]`` weight stack; with a cache, the
        stacked ``[layers, B, KV, S, D]`` keys/values ride in the scan carry.
        """
        x, layer, cache_valid = self.layer_inputs(input_ids, attention_mask=attention_mask, positions=positions,
                                                  segment_ids=segment_ids, cache=cache)
        if cache is None:
            def body(carry, w):
                out, _ = layer(carry, w, cache_kv=None)
                return self.constrain(out), None

            if self.remat != "none":
                body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
            x, _ = jax.lax.scan(body, x, self.layers.arrays(), unroll=not self.scan_layers)
            return self.final_hidden(x), None
        if isinstance(cache.k, tuple):
            raise ValueError("a split cache (KVCache.split()) is decoded by the sampler, not by forward")

        # the cache rides in the scan carry (not in xs/ys), so each step updates it in place
        # instead of copying every layer's cache out of and back into the stack
        def cached_body(carry, scanned):
            h, cache_k, cache_v = carry
            w, index = scanned
            store = dense_cache_store(cache_k, cache_v, index, cache.index, self.dtype)
            out, (cache_k, cache_v) = layer(h, w, cache_kv=store)
            return (self.constrain(out), cache_k, cache_v), None

        (x, cache_k, cache_v), _ = jax.lax.scan(cached_body, (x, cache.k, cache.v),
                                                (self.layers.arrays(), jnp.arange(self.config.num_layers)),
                                                unroll=not self.scan_layers)
        return self.final_hidden(x), KVCache(k=cache_k, v=cache_v, valid=cache_valid,
                                             index=cache.index + input_ids.shape[1])

    def layer_inputs(self, input_ids, *, attention_mask=None, positions=None, segment_ids=None,
                     cache: KVCache | None = None):
        """What the layers start from: the embedded tokens ``[B, T, E]``, the layer function
        ``layer(x, weights, cache_kv=...) -> (x, (k, v))`` with positions, masks and attention bound,
        and (with a cache) the cache's new ``valid`` mask. :meth:`forward` and the sampler's
        per-layer decode both run the layers from here."""
        batch, length = input_ids.shape
        unpadded = attention_mask is None and segment_ids is None  # static: plain causal rows
        if attention_mask is None:
            attention_mask = jnp.ones((batch, length), jnp.int32)
        attention_mask = attention_mask.astype(jnp.bool_)
        cache_valid = None
        if cache is None:
            if positions is None:
                positions = default_positions(attention_mask, segment_ids)
            # padding is segment 0 (attends only padding), real tokens their segment (1 if unpacked)
            q_segments = attention_mask.astype(jnp.int32)
            if segment_ids is not None:
                q_segments = segment_ids.astype(jnp.int32) * q_segments
            attend = partial(attention, q_segment_ids=q_segments, kv_segment_ids=q_segments, q_offset=0,
                             implementation=self.attention, mesh=self.mesh, rules=self.rules,
                             block_size=self.attention_block_size, platform=self.platform, unpadded=unpadded)
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
            if positions is None:
                past = jnp.sum(cache.valid, axis=1, dtype=jnp.int32)[:, None]
                positions = past + default_positions(attention_mask, None)
            cache_index = cache.index
            cache_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, attention_mask, cache_index, axis=1)
            # decoding keeps the dense KV-cache path: queries at slots index.., keys the whole cache
            attend = partial(attention, q_segment_ids=attention_mask.astype(jnp.int32),
                             kv_segment_ids=cache_valid.astype(jnp.int32), q_offset=cache_index,
                             implementation="dense", platform=self.platform)
        x = self.embed_tokens(input_ids)
        return x, self.layer_fn(positions, attend), cache_valid

    def layer_fn(self, positions, attend):
        """``layer(x, weights, cache_kv=...) -> (x, new cache)`` for tokens at ``positions [B, T]`` (RoPE),
        attending with ``attend(q, k, v)``."""
        cos, sin = rope_tables(positions, rope_inv_freq(self.config))
        return partial(_decoder_layer, config=self.config, dtype=self.dtype, cos=cos, sin=sin, attend=attend)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """The embedded tokens ``[B, T, E]`` in the compute dtype."""
        return self.constrain(self.embed[...][input_ids].astype(self.dtype))

    def final_hidden(self, x: jax.Array) -> jax.Array:
        """The last layer's output through the final norm."""
        return rms_norm(x, self.final_norm[...], self.config.rms_norm_eps)

    def constrain(self, x: jax.Array) -> jax.Array:
        """Keep activations split over the data-parallel axes (so FSDP all-gathers weights instead)."""
        if self.mesh is None or self.mesh.size == 1:
            return x
        return jax.lax.with_sharding_constraint(x, named_sharding(("batch", "length", None), self.mesh,
                                                                  self.rules, x.shape))
