"""What ``sftrl-jax compile`` compiles for each kind of run: the functions the trainers declare
(:mod:`sftrl_jax.jitted`: ``sft_functions``, ``rl_functions``, ``probe_eval_spec``) against the run's
state built with shapes only (:func:`sftrl_jax.training.abstract_context`), with the largest argument
shapes a run can produce; and the sampler's (``_generate_batch``, the decode relayout, and one prefill
and one decode step for their FLOPs and bytes).
"""

from __future__ import annotations

import dataclasses
import json
import os

from .report import Compiler
from .topology import AotError

COMPILABLE_KINDS = ("sft", "rl", "pipeline")


# ------------------------------------------------------------------------------------- config kind
def detect_kind(path: str | os.PathLike) -> str:
    """``sft`` / ``rl`` / ``pipeline``: the ``kind:`` a config file (or its ``base:``) declares."""
    from ..config import config_kind

    kind = config_kind(path)
    names = ", ".join(COMPILABLE_KINDS)
    if kind not in COMPILABLE_KINDS:
        raise AotError(f"{path}: " + (f"kind {kind!r} has nothing to compile ({names})" if kind else
                                      f"no 'kind:' ({names}) in the config; add it or pass --kind"))
    return kind


def load_run_config(path, overrides, kind: str | None = None):
    from ..config import load_config
    from ..kinds import config_class

    kind = kind or detect_kind(path)
    return kind, load_config(config_class(kind), path, overrides)


# ------------------------------------------------------------------------------------------ declared functions
def _context(config, mesh, updates: int):
    """The run's loop context with shapes only, and the abstract model."""
    from ..training import abstract_context

    return abstract_context(config, mesh, updates)


def _declared(declare, ctx) -> dict:
    try:
        return declare(ctx)
    except ValueError as err:  # a batch layout the mesh cannot hold, named by the declaration
        raise AotError(str(err)) from None


def compile_declared(compiler: Compiler, functions: dict, *, prefix: str) -> None:
    """Compile each declared function (:class:`sftrl_jax.jitted.JitSpec`) as the trainer jits it."""
    for name, spec in functions.items():
        compiler.compile(f"{prefix}{name}", spec.lower, model_flops=spec.model_flops, resident=spec.resident,
                         note=spec.note)


def compile_sft(compiler: Compiler, config, mesh, *, prefix: str = "sft/"):
    """The SFT trainer's functions; returns ``(ctx, model)``."""
    from ..sft.step import sft_functions

    ctx, model = _context(config, mesh, config.train.max_steps or 1000)
    compile_declared(compiler, _declared(sft_functions, ctx), prefix=prefix)
    return ctx, model


def compile_rl(compiler: Compiler, config, mesh, *, prefix: str = "rl/"):
    """The RL trainer's functions and the sampler its rollouts run; returns ``(ctx, model)``."""
    from ..rl.step import rl_functions

    cfg, sampling = config.rl, config.sampling
    ctx, model = _context(config, mesh, (config.train.max_steps or 1000) * cfg.mini_batches_per_step * cfg.ppo_epochs)
    compile_declared(compiler, _declared(rl_functions, ctx), prefix=prefix)
    state = ctx.abstract_state
    compile_sampler(compiler, ctx, model, prefix=prefix, prompts=cfg.prompts_per_step, batch_size=sampling.batch_size,
                    n=sampling.n, prompt_length=config.data.max_prompt_length, max_new_tokens=sampling.max_new_tokens,
                    temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                    resident={"state": state, "ref": state["params"] if cfg.kl_coef > 0 else None},
                    model_rollout=True, tensor_parallel=sampling.tensor_parallel)
    return ctx, model


# ------------------------------------------------------------------------------------------ sampling
def sampling_params(ctx, model, tensor_parallel: int | None = None):
    """``(decoding, params, relaid)``: the abstract model the sampler decodes with (on the decode mesh of
    ``tensor_parallel``, :func:`sftrl_jax.sampling.on_decode_mesh`), the parameters it decodes from
    (:func:`sftrl_jax.sampling.sampling_layout`: shapes, dtypes and shardings), and whether they differ from
    the training parameters."""
    import jax
    from flax import nnx

    from ..jitted import placed
    from ..models.hf_io import param_shardings
    from ..sampling import on_decode_mesh, sampling_layout
    from ..sharding import sampling_rules

    try:
        decoding = on_decode_mesh(model, tensor_parallel)
    except ValueError as err:  # a sampling.tensor_parallel the mesh or the model cannot take
        raise AotError(str(err)) from None
    if decoding.mesh.size == 1:
        return decoding, ctx.abstract_state["params"], False
    shapes = jax.eval_shape(
        lambda p: nnx.to_pure_dict(nnx.state(sampling_layout(nnx.merge(ctx.graphdef, p), tensor_parallel))),
        ctx.abstract_state["params"])
    return decoding, placed(shapes, param_shardings(decoding, sampling_rules(model.rules))), True


def compile_sampler(compiler: Compiler, ctx, model, *, prefix: str, prompts: int, batch_size: int, n: int,
                    prompt_length: int, max_new_tokens: int, temperature: float, top_k: int = 0, top_p: float = 1.0,
                    resident=None, model_rollout: bool = False, tensor_parallel: int | None = None) -> None:
    """The sampler's jitted functions: the whole ``_generate_batch`` (its memory is the truth: prefill,
    repeated cache, decode loop), and one prefill and one decode step for their FLOPs and bytes, all on the
    decode mesh of ``tensor_parallel`` (``sampling.tensor_parallel``).
    ``model_rollout``: also model both engines' generation time for ``prompts`` x ``n`` responses
    (:mod:`sftrl_jax.aot.rollout`, into ``compiler.rollouts``)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ..data.batching import bucket_length
    from ..jitted import sds
    from ..sampling import _generate_batch, generation_rows
    from ..sharding import data_parallel_size, named_sharding

    decoding, params, relaid = sampling_params(ctx, model, tensor_parallel)
    graphdef, mesh, config = nnx.graphdef(decoding), decoding.mesh, ctx.model_config
    rows = generation_rows(batch_size, prompts, data_parallel_size(mesh))
    length = bucket_length(prompt_length, maximum=1 << 30, minimum=16)
    cache_dtype = jnp.dtype(model.dtype).name
    eos_ids = tuple(int(e) for e in config.eos_token_ids) or (-1,)
    rows_sharding = named_sharding(("batch", "length"), mesh)
    ids = sds((rows, length), jnp.int32, rows_sharding)
    mask = sds((rows, length), jnp.int32, rows_sharding)
    limits = sds((rows,), jnp.int32, named_sharding(("batch",), mesh))
    key_shape = jax.eval_shape(lambda: jax.random.key(0))
    key = sds(key_shape.shape, key_shape.dtype, named_sharding((), mesh))
    first_sample = sds((), jnp.int32, named_sharding((), mesh))
    resident = resident if resident is not None else {}
    if relaid:
        resident = _compile_relayout(compiler, ctx, prefix=prefix, resident=resident, tensor_parallel=tensor_parallel)
    note = f"{rows} prompts x {n} samples, prompt {length} + {max_new_tokens} new tokens"
    compiler.compile(
        f"{prefix}generate",
        lambda: _generate_batch.lower(graphdef, params, ids, mask, limits, key, first_sample, n=n,
                                      max_new_tokens=max_new_tokens,
                                      temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                                      eos_ids=eos_ids, pad_id=0, cache_dtype=cache_dtype, split_layers=False),
        resident=resident,
        note=note + "; memory is the whole generation's; FLOPs/bytes count the decode while_loop (no known trip "
                    "count) once on GPU and up to max_new_tokens times on TPU, so no MFU here (see "
                    "prefill/decode_step)")
    _compile_prefill_and_decode(compiler, ctx, graphdef, params, ids, mask, prefix=prefix, n=n,
                                max_new_tokens=max_new_tokens, cache_dtype=cache_dtype, resident=resident,
                                relaid=relaid, sequences=prompts * n if model_rollout else None)


def _compile_relayout(compiler: Compiler, ctx, *, prefix: str, resident: dict, tensor_parallel: int | None) -> dict:
    """Compile the training -> decode parameter relayout (onto the decode mesh of ``tensor_parallel``); return
    what is resident while sampling after it."""
    import jax
    from flax import nnx

    from ..sampling import sampling_layout

    # the relayout itself (once per rollout phase): training params in, sampling copy out
    def relayout_fn(p):
        return nnx.to_pure_dict(nnx.state(sampling_layout(nnx.merge(ctx.graphdef, p), tensor_parallel)))

    params = ctx.abstract_state["params"]
    compiler.compile(f"{prefix}sampling_layout", lambda: jax.jit(relayout_fn).lower(params),
                     resident=resident, note="training params -> decode layout (once per rollout phase)")
    return {"during_sampling": resident, "train_params": params}


def _compile_prefill_and_decode(compiler: Compiler, ctx, graphdef, params, ids, mask, *, prefix: str, n: int,
                                max_new_tokens: int, cache_dtype: str, resident: dict, relaid: bool,
                                sequences: int | None) -> None:
    """One prefill of the ``ids``/``mask`` prompts and one decode step of the decode model (``graphdef``, on
    its decode mesh, and ``params``); also the step from the training layout if ``relaid``; for their FLOPs and
    bytes."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ..flops import forward_flops, generation_flops
    from ..jitted import sds
    from ..models.decoder import init_cache
    from ..sharding import named_sharding

    mesh, config = ids.sharding.mesh, ctx.model_config  # the decode mesh
    rows, length = ids.shape
    total_rows = rows * n
    max_len = length + max_new_tokens

    def prefill(p, prompt_ids, prompt_mask):
        model = nnx.merge(graphdef, p)
        return model.prefill(prompt_ids, prompt_mask, init_cache(model.config, rows, max_len, cache_dtype))

    compiler.compile(f"{prefix}prefill", lambda: jax.jit(prefill).lower(params, ids, mask),
                     model_flops=rows * forward_flops(config, length), resident=resident,
                     note=f"{rows} prompts x {length} tokens into a {max_len}-slot cache")

    cache_shapes = jax.eval_shape(lambda: init_cache(config, total_rows, max_len, cache_dtype))

    def decode_inputs(on):
        """The decode step's tokens and cache on mesh ``on``."""

        def cache_sharding(leaf):
            axes = {5: ("layers", "batch", "kv_heads", "length", "head_dim"), 2: ("batch", "length")}.get(leaf.ndim)
            return named_sharding(axes or (), on, shape=leaf.shape if axes else None)

        return (sds((total_rows,), jnp.int32, named_sharding(("batch",), on, shape=(total_rows,))),
                jax.tree.map(lambda leaf: sds(leaf.shape, leaf.dtype, cache_sharding(leaf)), cache_shapes))

    tokens, cache = decode_inputs(mesh)

    def decoder(graph):
        return lambda p, token, kv: nnx.merge(graph, p).decode(token, kv)

    decode = decoder(graphdef)

    decode_flops = total_rows * generation_flops(config, max_len, 1, prefill=False)
    compiler.compile(f"{prefix}decode_step", lambda: jax.jit(decode, donate_argnums=2).lower(params, tokens, cache),
                     model_flops=decode_flops, resident=resident,
                     note=f"{total_rows} rows, one token against a {max_len}-slot cache (cache donated)")
    _compile_paged_decode(compiler, ctx, graphdef, params, prefix=prefix, slots=total_rows, prompt_length=length,
                          max_new_tokens=max_new_tokens, cache_dtype=cache_dtype, resident=resident,
                          sequences=sequences)
    if relaid:  # the same step from the training layout (and mesh): what the decode layout saves per token
        train_tokens, train_cache = decode_inputs(ctx.mesh)
        compiler.compile(f"{prefix}decode_step[train_layout]",
                         lambda: jax.jit(decoder(ctx.graphdef), donate_argnums=2).lower(
                             ctx.abstract_state["params"], train_tokens, train_cache),
                         model_flops=decode_flops, resident=resident["during_sampling"],
                         note="decode_step with the FSDP training parameters, for comparison")


def _compile_paged_decode(compiler: Compiler, ctx, graphdef, params, *, prefix: str, slots: int, prompt_length: int,
                          max_new_tokens: int, cache_dtype: str, resident: dict, sequences: int | None) -> None:
    """One decode step of the paged engine (``sampling.engine: paged``) of the decode model (``graphdef`` on its
    decode mesh, ``params``) with as many slots as the static engine
    has rows and its default pool (the static cache's size, its pages split over the data-parallel shards),
    with the decode attention ``sampling.paged_attention: auto`` picks for the platform (JAX's Pallas TPU or
    GPU paged-attention kernel): page tables as wide as the longest sequence
    (``paged_decode_step``), and as the prompt and a third of ``max_new_tokens`` (``paged_decode_step[live]``:
    the pages a slot holds on average when response lengths average a third of the cap, what the gather path
    reads then; the kernel reads each slot's live pages whatever the table's width). ``sequences``: also model
    both engines' generation time for that many responses (static rows = slots)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from .. import paged
    from ..flops import generation_flops
    from ..jitted import sds
    from ..sampling import kv_bytes_per_token
    from ..sharding import data_parallel_size, named_sharding
    from .report import device_bytes
    from .rollout import modelled_rollout

    abstract_model = nnx.merge(graphdef, params)
    mesh, config = abstract_model.mesh, ctx.model_config
    page_size = paged.DEFAULT_PAGE_SIZE
    per_sequence = -(-prompt_length // page_size) + -(-max_new_tokens // page_size)
    shards = data_parallel_size(mesh)
    num_pages = shards * (1 + slots // shards * per_sequence)  # the engine's default pool
    pool_shape = (config.num_kv_heads, num_pages, page_size, config.head_dim)
    layer_pool = paged.pool_sharding(abstract_model, slots, pool_shape)
    implementation = paged.resolve_paged_attention("auto", abstract_model.platform, config.head_dim)
    pool = tuple(sds(pool_shape, jnp.dtype(cache_dtype), layer_pool) for _ in range(config.num_layers))
    rows = named_sharding(("batch",), mesh, shape=(slots,))
    vector = sds((slots,), jnp.int32, rows)

    def step(p, pool_k, pool_v, tokens, positions, write_page, write_offset, page_table, lengths):
        model = nnx.merge(graphdef, p)
        return paged.decode_step(model, paged.per_layer_weights(model, None), pool_k, pool_v, tokens,
                                 positions=positions, write_page=write_page, write_offset=write_offset,
                                 page_table=page_table, lengths=lengths, implementation=implementation)

    reads = ("the kernel reads each slot's live pages" if implementation != "gather" else
             "the gather path reads every slot's table")
    for name, length in (("paged_decode_step", prompt_length + max_new_tokens),
                         ("paged_decode_step[live]", prompt_length + max_new_tokens // 3)):
        bound = -(-length // page_size)
        table = sds((slots, bound), jnp.int32, named_sharding(("batch", None), mesh, shape=(slots, bound)))
        compiler.compile(
            f"{prefix}{name}",
            lambda table=table: jax.jit(step, donate_argnums=(1, 2)).lower(
                params, pool, pool, vector, vector, vector, vector, table, vector),
            model_flops=slots * generation_flops(config, length, 1, prefill=False), resident=resident,
            note=f"{slots} slots, one token each, page tables of {bound} pages of {page_size} ({length} positions; "
                 f"{reads}); pool of {num_pages} pages over {shards} data-parallel shards (the static cache's "
                 f"size, pools donated); decode attention: {implementation}")
    if sequences:
        local = layer_pool.shard_shape(pool_shape)  # [kv heads, pages, page_size, head_dim] on one device
        chip = compiler.topology.chip
        compiler.rollouts[prefix.rstrip("/") or "rl"] = modelled_rollout(
            sequences=sequences, cap=max_new_tokens, prompt=prompt_length, rows=slots, slots=slots, shards=shards,
            page_size=page_size, chunk=paged.DEFAULT_CHUNK, attention=implementation,
            weight_bytes=float(device_bytes(params)),
            kv_bytes_per_position=kv_bytes_per_token(abstract_model) * local[0] / config.num_kv_heads,
            step_flops_per_row=generation_flops(config, prompt_length + max_new_tokens // 3, 1, prefill=False)
            / (mesh.size // shards), hbm_bandwidth=chip.hbm_bandwidth, peak_flops=chip.peak_flops)


# ------------------------------------------------------------------------------------------ pipeline
def compile_pipeline(compiler: Compiler, config, mesh) -> None:
    from ..jitted import without_params
    from ..pipeline import stage_config
    from ..probe import probe_eval_spec

    seen: dict[str, str] = {}
    first = None
    for index, stage in enumerate(config.stages):
        try:
            stage_cfg = stage_config(config, index, config.model.path)
        except ValueError as err:
            raise AotError(str(err)) from None
        key = json.dumps({k: v for k, v in dataclasses.asdict(stage_cfg).items() if k != "output_dir"}, sort_keys=True,
                         default=str)
        prefix = f"stage{index + 1}_{stage.kind}/"
        if key in seen:
            if compiler.log:
                compiler.log(f"stage {index + 1} compiles the same functions as {seen[key]}")
            continue
        seen[key] = prefix
        compiled = (compile_sft if stage.kind == "sft" else compile_rl)(compiler, stage_cfg, mesh, prefix=prefix)
        first = first or compiled
    if first is None:
        return
    ctx, model = first
    probe, state = config.probe, ctx.abstract_state
    if probe.sft_files:
        spec = probe_eval_spec(probe, ctx.graphdef, mesh, state["params"], model_config=ctx.model_config,
                               resident=without_params(state))
        compiler.compile("probe/eval_step", spec.lower, model_flops=spec.model_flops, resident=spec.resident,
                         note=spec.note)
    if probe.prompt_files:
        compile_sampler(compiler, ctx, model, prefix="probe/", prompts=probe.prompt_limit,
                        batch_size=probe.sampling.batch_size, n=probe.sampling.n,
                        prompt_length=probe.max_prompt_length, max_new_tokens=probe.sampling.max_new_tokens,
                        temperature=probe.sampling.temperature, resident=without_params(state),
                        tensor_parallel=probe.sampling.tensor_parallel)
