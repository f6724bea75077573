#!/usr/bin/env python
"""Per-device memory arithmetic for the reference recipe on TPU slices and GPUs (docs/scaling.md).

    python scripts/memory_plan.py                      # the recommended-mesh table of docs/scaling.md
    python scripts/memory_plan.py --all                # every candidate mesh, not just the pick
    python scripts/memory_plan.py --config configs/tpu/rl_qwen2.5-math-7b_v5p-64.yaml
                                                       # one config file: the slice and model come from its name
    python scripts/memory_plan.py --calibrate          # re-measure the XLA factors below (XLA:CPU, ~20 s)

Everything here is arithmetic on the real model shapes (``tests/fixtures/*.config.json``) and on the real
sharding rules (``sftrl_jax.sharding.logical_to_pspec`` on an abstract mesh), not a measurement on a TPU
or GPU. Where the memory depends on what XLA keeps alive (the attention and logits working sets, the
optimizer step, the decode loop), the factor comes from XLA's own buffer assignment for this repository's
real functions, compiled on the CPU backend (``--calibrate`` re-measures them; a test checks the constants
against it). XLA:TPU and XLA:GPU fuse differently, so treat the totals as +-20 % planning figures and keep
headroom (the picks leave 20 % of HBM free).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9

# HBM per device, GB (vendor figures: v5p 95 GB, v6e 32 GB, H100 80 GB, H200 141 GB)
HBM_GB = {"v5p": 95.0, "v6e": 32.0, "h100": 80.0, "h200": 141.0}
# name -> (accelerator, JAX devices, hosts). A v5p chip has 2 TensorCores driven as one JAX device
# (megacore), and the v5p name counts TensorCores: v5p-64 = 32 chips = 32 devices on 8 hosts.
# A v6e name counts chips; multi-host v6e slices have 4 chips per host.
SLICES = {
    "v5p-8": ("v5p", 4, 1), "v5p-16": ("v5p", 8, 2), "v5p-32": ("v5p", 16, 4), "v5p-64": ("v5p", 32, 8),
    "v5p-128": ("v5p", 64, 16),
    "v6e-8": ("v6e", 8, 1), "v6e-16": ("v6e", 16, 4), "v6e-32": ("v6e", 32, 8), "v6e-64": ("v6e", 64, 16),
    "8xh100": ("h100", 8, 1), "8xh200": ("h200", 8, 1), "16xh100": ("h100", 16, 2),
}
MODELS = ("qwen3-0.6b", "qwen2.5-math-7b", "llama-3.1-8b")
HEADROOM = 0.80  # a pick must fit in this share of HBM (the factors are +-20 % figures)

# ---- XLA factors (bytes), measured with --calibrate on this repository's functions (XLA:CPU) ----------
# train state: float32 params + AdamW m, v (persistent) and the step's transients (the float32 gradient
# accumulator and one micro-step's gradient; the update itself is fused in place with donation).
STATE_BYTES = {"float32": 12.0, "bfloat16": 10.0}
STEP_TRANSIENT_BYTES = {"float32": 8.4, "bfloat16": 10.5}
# per (query x key x head) element of one layer's attention, recomputed in the backward pass with
# remat 'full' (float32 scores, softmax output, bf16 probabilities and their gradients)
ATTENTION_BYTES = 16.6
# the same in a forward pass only (the pipeline probe's held-out loss, the RL old-log-prob pass)
ATTENTION_FWD_BYTES = 8.2
LOGITS_FWD_BYTES = 4.5
# per (position x vocab) element of the float32 logits in the loss and its gradient
LOGITS_BYTES_SFT = 9.0   # token_logprobs (logsumexp) only
LOGITS_BYTES_RL = 16.0   # logits / temperature, log-prob and entropy (log_softmax)
# per token per layer, in bytes per element of the analytic activation count (activation_elements())
LAYER_WS_FACTOR = 7.2
# the decode loop keeps this many copies of the KV cache alive (prefill cache, repeated cache,
# the layer scan's new cache and the while-loop carry)
KV_CACHE_COPIES = 3.5


@functools.lru_cache(maxsize=None)
def model_config(name: str):
    from sftrl_jax.models.config import ModelConfig

    return ModelConfig.from_hf_dict(json.loads((ROOT / "tests" / "fixtures" / f"{name}.config.json").read_text()))


@dataclasses.dataclass(frozen=True)
class SFTWork:
    seq_len: int = 16384
    global_batch_size: int = 64


@dataclasses.dataclass(frozen=True)
class ProbeWork:
    """The pipeline's cross-stage probe: held-out SFT loss in batches of ``4 x shards`` rows (pipeline.py), and
    greedy generation on held-out prompts (the sampler's default 64 prompts per batch)."""
    max_length: int = 8192
    rows_per_shard: int = 4
    prompts: int = 64
    max_prompt: int = 1024
    max_new_tokens: int = 4096


@dataclasses.dataclass(frozen=True)
class RLWork:
    max_prompt: int = 1024
    max_new_tokens: int = 8192
    prompts_per_step: int = 128
    group_size: int = 8
    mini_batches_per_step: int = 2
    entropy: bool = True


# the reference recipe (BRIEF section 6) and the Qwen3-0.6B pipeline configs
RECIPES = {
    "qwen2.5-math-7b": {"sft": SFTWork(16384, 64), "rl": RLWork(1024, 8192, 128, 8, 2)},
    "llama-3.1-8b": {"sft": SFTWork(16384, 64), "rl": RLWork(1024, 8192, 128, 8, 2)},
    "qwen3-0.6b": {"sft": SFTWork(8192, 64), "rl": RLWork(1024, 4096, 64, 8, 2)},
}


def _abstract_mesh(mesh: dict):
    from jax.sharding import AbstractMesh

    from sftrl_jax.sharding import MESH_AXES

    return AbstractMesh(tuple(int(mesh.get(a, 1)) for a in MESH_AXES), MESH_AXES)


def param_elements(config, mesh: dict) -> dict[str, float]:
    """Parameter counts under the real sharding rules: ``total``, ``per_device`` (what one device holds),
    ``layer_gathered`` (one decoder layer as the forward pass sees it after the fsdp all-gather: split over
    the tensor axis only) and ``head_gathered`` (the LM head, or the tied embedding, likewise)."""
    from sftrl_jax.models import param_items
    from sftrl_jax.sharding import DEFAULT_RULES, logical_to_pspec

    abstract = _abstract_mesh(mesh)
    model = _abstract(config)
    out = {"total": 0, "per_device": 0.0, "layer_gathered": 0.0, "head_gathered": 0.0}
    for path, var in param_items(model):
        shape = var.shape
        spec = logical_to_pspec(var.get_metadata()["logical_axes"], abstract, DEFAULT_RULES, shape)
        split = tensor_split = 1
        for axes in spec:
            for axis in (axes,) if isinstance(axes, str) else (axes or ()):
                split *= abstract.shape[axis]
                tensor_split *= abstract.shape[axis] if axis == "tensor" else 1
        size = math.prod(shape)
        out["total"] += size
        out["per_device"] += size / split
        if path[0] == "layers":
            out["layer_gathered"] += size / tensor_split / config.num_layers
        elif path[0] == ("embed" if config.tie_word_embeddings else "lm_head"):
            out["head_gathered"] += size / tensor_split
    return out


@functools.lru_cache(maxsize=None)
def _param_counts(config, sizes: tuple[int, int, int]) -> dict[str, float]:
    return param_elements(config, dict(zip(("data", "fsdp", "tensor"), sizes)))


@functools.lru_cache(maxsize=None)
def _abstract(config):
    from sftrl_jax.models import abstract_model

    return abstract_model(config, dtype="bfloat16")


def _div(n: int, t: int) -> int:
    """What a dimension of size n is split by on a tensor axis of size t (replicated when it does not divide)."""
    return t if t > 1 and n % t == 0 else 1


def activation_elements(c, t: int) -> float:
    """Activation elements of one decoder layer per token (projections, attention output, MLP, norms)."""
    heads = c.num_heads * c.head_dim / _div(c.num_heads, t)
    kv = c.num_kv_heads * c.head_dim / _div(c.num_kv_heads, t)
    mlp = c.intermediate_size / _div(c.intermediate_size, t)
    return 4 * c.hidden_size + 3 * heads + 3 * kv + 3 * mlp


def kv_cache_bytes_per_token(c, t: int = 1, dtype_bytes: int = 2) -> float:
    """layers x 2 (k, v) x kv_heads x head_dim x bytes; kv heads split over the tensor axis when they divide."""
    return c.num_layers * 2 * c.num_kv_heads * c.head_dim * dtype_bytes / _div(c.num_kv_heads, t)


def generation_prompts(generation_batch_size: int, prompts: int, shards: int) -> int:
    """Prompts per compiled generation batch, as sftrl_jax.sampling.generate rounds them."""
    from sftrl_jax.data.batching import bucket_length

    batch = max(bucket_length(min(generation_batch_size, prompts), maximum=max(generation_batch_size, 1), minimum=1),
                shards)
    return -(-batch // shards) * shards


@dataclasses.dataclass
class Estimate:
    model: str
    slice: str
    kind: str
    mesh: dict
    micro_batch_size: int
    micro_steps: int
    generation_batch_size: int | None
    parts: dict  # name -> bytes per device
    peak: float
    hbm: float
    seq_len: int = 0  # tokens per row in the training step
    train_peak: float = 0.0  # activations + step gradients at the training peak (bytes per device)
    rollout_peak: float = 0.0  # sampling buffers at the rollout peak

    @property
    def fits(self) -> bool:
        return self.peak <= HEADROOM * self.hbm


def estimate(model, slice_name, kind: str, mesh: dict, micro_batch_size: int, *,
             generation_batch_size: int | None = None, param_dtype: str = "float32", work=None,
             opt_state: str = "sharded") -> Estimate:
    """Peak bytes per device of one SFT or RL run (remat 'full', bf16 compute, as the shipped configs).

    ``model``: a name from :data:`MODELS` or a ``ModelConfig``; ``slice_name``: a name from :data:`SLICES` or
    ``(label, devices, hbm_gb)``. ``opt_state='replicated'`` prices AdamW's m and v held whole on every device
    (see docs/scaling.md) instead of sharded like the parameters.
    """
    c = model_config(model) if isinstance(model, str) else model
    if isinstance(slice_name, str):
        accel, devices, _ = SLICES[slice_name]
        hbm = HBM_GB[accel] * GB
    else:
        slice_name, devices, hbm_gb = slice_name
        hbm = hbm_gb * GB
    mesh = {"data": 1, "fsdp": 1, "tensor": 1, **mesh}
    if math.prod(mesh.values()) != devices:
        raise ValueError(f"mesh {mesh} does not have {devices} devices ({slice_name})")
    t, shards = mesh["tensor"], mesh["data"] * mesh["fsdp"]
    work = work or RECIPES[model][kind]
    E, L, V = c.hidden_size, c.num_layers, c.vocab_size
    heads_split, vocab_split = _div(c.num_heads, t) if c.num_kv_heads % t == 0 else 1, _div(V, t)
    counts = _param_counts(c, tuple(mesh[a] for a in ("data", "fsdp", "tensor")))
    per_device_params = counts["per_device"]
    # one layer's weights all-gathered over fsdp (bf16) plus its float32 gradient, and the LM head's
    gathered = 6 * (counts["layer_gathered"] + counts["head_gathered"])
    parts = {"params+adam": STATE_BYTES[param_dtype] * per_device_params,
             "grads (step)": STEP_TRANSIENT_BYTES[param_dtype] * per_device_params}
    if opt_state == "replicated":
        parts["params+adam"] += 8 * (counts["total"] - per_device_params)

    def train_activations(rows: int, seq: int, logit_positions: int, logit_bytes: float) -> dict:
        return {
            "saved layer inputs": rows * L * seq * E * 2,  # remat 'full': the scan keeps each layer's input
            "layer working set": rows * seq * activation_elements(c, t) * LAYER_WS_FACTOR,
            "attention (1 layer)": rows * (c.num_heads / heads_split) * seq * seq * ATTENTION_BYTES,
            "logits": rows * logit_positions * (V / vocab_split) * logit_bytes,
            "gathered weights": gathered,
        }

    gen, micro_steps, train, rollout = None, 0, {}, {}

    def decode_buffers(prompts: int, group: int, max_prompt: int, new_tokens: int) -> dict:
        rows = prompts * group / shards  # sequences per device while decoding
        seq = max_prompt + new_tokens
        return {
            "kv cache": KV_CACHE_COPIES * rows * seq * kv_cache_bytes_per_token(c, t),
            # prefill: float32 scores and bf16 probabilities of the prompt against the whole cache length
            "prefill attention": prompts / shards * (c.num_heads / heads_split) * max_prompt * seq * 6,
            "sampled tokens": rows * new_tokens * 8,
        }

    if kind == "sft":
        micro_steps = work.global_batch_size // (micro_batch_size * shards)
        train = train_activations(micro_batch_size, work.seq_len, work.seq_len, LOGITS_BYTES_SFT)
        seq_len = work.seq_len
    elif kind == "rl":
        sequences = work.prompts_per_step * work.group_size // work.mini_batches_per_step
        micro_steps = sequences // (micro_batch_size * shards)
        seq_len = work.max_prompt + work.max_new_tokens
        train = train_activations(micro_batch_size, seq_len, work.max_new_tokens,
                                  LOGITS_BYTES_RL if work.entropy else LOGITS_BYTES_SFT)
        gen = generation_batch_size or work.prompts_per_step
        rollout = decode_buffers(generation_prompts(gen, work.prompts_per_step, shards), work.group_size,
                                 work.max_prompt, work.max_new_tokens)
    elif kind == "probe":  # forward only, between training steps: the train state is on the devices
        seq_len, rows = work.max_length, work.rows_per_shard
        parts["grads (step)"] = 0.0
        train = {"probe attention (fwd)": rows * (c.num_heads / heads_split) * seq_len**2 * ATTENTION_FWD_BYTES,
                 "probe logits (fwd)": rows * seq_len * (V / vocab_split) * LOGITS_FWD_BYTES,
                 "gathered weights": gathered / 3}
        gen = generation_prompts(work.prompts, work.prompts, shards)
        rollout = decode_buffers(gen, 1, work.max_prompt, work.max_new_tokens)
    else:
        raise ValueError(f"unknown stage kind {kind!r}")
    if kind == "probe":
        train_peak = train["gathered weights"] + max(train["probe attention (fwd)"], train["probe logits (fwd)"])
    else:
        # the logits' working set (loss and its gradient) is freed before the layers' backward pass starts,
        # so it and the layer working set (attention included) do not add up
        train_peak = (train["saved layer inputs"] + train["gathered weights"] + parts["grads (step)"]
                      + max(train["logits"], train["layer working set"] + train["attention (1 layer)"]))
    # decoding gathers one layer's weights at a time too (bf16, no gradient)
    rollout_peak = sum(rollout.values()) + (gathered / 3 if rollout else 0)
    parts.update(train)
    parts.update(rollout)
    peak = parts["params+adam"] + max(train_peak, rollout_peak)
    return Estimate(model if isinstance(model, str) else c.model_type, slice_name, kind, mesh, micro_batch_size,
                    micro_steps, gen, parts, peak, hbm, seq_len, train_peak, rollout_peak)


def candidates(model: str, slice_name: str, kind: str, work=None):
    """Every (mesh, micro_batch_size, generation_batch_size) that divides the batch on this slice (data = 1)."""
    c = model_config(model)
    _, devices, _ = SLICES[slice_name]
    work = work or RECIPES[model][kind]
    for t in (1, 2, 4, 8):
        if devices % t or c.num_heads % t or c.num_kv_heads % t:
            continue  # a tensor axis the heads do not divide would leave attention replicated
        f = devices // t
        for micro in (1, 2, 4, 8):
            if kind == "sft":
                if work.global_batch_size % (micro * f):
                    continue
                yield {"data": 1, "fsdp": f, "tensor": t}, micro, None
            else:
                if work.prompts_per_step * work.group_size // work.mini_batches_per_step % (micro * f):
                    continue
                for gen in (256, 128, 64, 32, 16, 8):
                    if gen <= work.prompts_per_step and gen >= f:
                        yield {"data": 1, "fsdp": f, "tensor": t}, micro, gen


def pick(model: str, slice_name: str, kind: str, work=None, opt_state: str = "sharded") -> Estimate | None:
    """The smallest tensor axis that fits; then the largest micro-batch; then the largest generation batch."""
    fitting = [e for e in (estimate(model, slice_name, kind, m, mb, generation_batch_size=g, work=work,
                                    opt_state=opt_state)
                           for m, mb, g in candidates(model, slice_name, kind, work)) if e.fits]
    if not fitting:
        return None
    return min(fitting, key=lambda e: (e.mesh["tensor"], -e.micro_batch_size, -(e.generation_batch_size or 0)))


def _mesh_text(mesh: dict) -> str:
    return f"{mesh['data']}/{mesh['fsdp']}/{mesh['tensor']}"


def table(estimates) -> str:
    lines = ["| model | slice (devices) | stage | tokens/row | mesh d/f/t | micro | micro-steps | gen. batch | state "
             "| step grads | activations | rollout | peak GB / HBM |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in estimates:
        act, roll = e.train_peak - e.parts["grads (step)"], e.rollout_peak
        lines.append(f"| {e.model} | {e.slice} ({SLICES[e.slice][1]}) | {e.kind} | {e.seq_len} | {_mesh_text(e.mesh)} | "
                     f"{e.micro_batch_size} | {e.micro_steps} | {e.generation_batch_size or '-'} | "
                     f"{e.parts['params+adam'] / GB:.1f} | {e.parts['grads (step)'] / GB:.1f} | {act / GB:.1f} | "
                     f"{roll / GB:.1f} | {e.peak / GB:.1f} / {e.hbm / GB:.0f}{'' if e.fits else ' (no fit)'} |")
    return "\n".join(lines) + "\n"


def detail(e: Estimate) -> str:
    rows = [f"{e.model} {e.kind} on {e.slice}: mesh data/fsdp/tensor {_mesh_text(e.mesh)}, micro_batch_size "
            f"{e.micro_batch_size} ({e.micro_steps} micro-steps)"
            + (f", generation_batch_size {e.generation_batch_size}" if e.generation_batch_size else "")]
    rows += [f"  {name:<22s} {value / GB:8.2f} GB" for name, value in e.parts.items()]
    rows.append(f"  {'peak':<22s} {e.peak / GB:8.2f} GB of {e.hbm / GB:.0f} GB"
                f" ({'fits' if e.fits else 'does NOT fit'} within {HEADROOM:.0%})")
    return "\n".join(rows)


def parse_config_name(path: str | Path) -> tuple[str, str, str]:
    """``configs/tpu/rl_qwen2.5-math-7b_v5p-64.yaml`` -> (kind, model, slice); pipeline configs -> 'pipeline'."""
    name = Path(path).stem
    match = re.fullmatch(r"(sft|rl|pipeline)_(?P<model>[a-z0-9.\-]+?)(?:_(?:sft_rl|rl_sft))?_(?P<slice>[a-z0-9\-]+)",
                         name)
    if not match or match["model"] not in MODELS or match["slice"] not in SLICES:
        raise ValueError(f"{name}: expected KIND_MODEL_SLICE with a model in {MODELS} and a slice in {sorted(SLICES)}")
    return match[1], match["model"], match["slice"]


def config_estimates(path: str | Path, opt_state: str = "sharded") -> list[Estimate]:
    """Estimates for the stages of a shipped config (the pipeline's SFT and RL stages both)."""
    import yaml

    kind, model, slice_name = parse_config_name(path)
    data = yaml.safe_load(Path(path).read_text())
    _, devices, _ = SLICES[slice_name]
    mesh = dict(data.get("mesh", {}))
    free = [a for a, s in mesh.items() if s == -1]
    if free:
        mesh[free[0]] = devices // math.prod(s for s in mesh.values() if s != -1)
    param_dtype = data.get("model", {}).get("dtype", "float32")
    sections = [("sft", data)] if kind == "sft" else [("rl", data)] if kind == "rl" else \
        [("sft", data["sft"]), ("rl", data["rl"]), ("probe", data.get("probe", {}))]
    out = []
    for stage, section in sections:
        if stage == "sft":
            train, d = section["train"], section["data"]
            work = SFTWork(d["max_length"], train["global_batch_size"])
            out.append(estimate(model, slice_name, "sft", mesh, train["micro_batch_size"], param_dtype=param_dtype,
                                work=work, opt_state=opt_state))
        elif stage == "rl":
            rl = section["rl"]
            work = RLWork(section["data"]["max_prompt_length"], rl["max_new_tokens"], rl["prompts_per_step"],
                          rl["group_size"], rl["mini_batches_per_step"], rl.get("entropy_coef", 0) > 0)
            out.append(estimate(model, slice_name, "rl", mesh, rl["micro_batch_size"],
                                generation_batch_size=rl.get("generation_batch_size", 64), param_dtype=param_dtype,
                                work=work, opt_state=opt_state))
        else:
            defaults = ProbeWork()
            work = ProbeWork(section.get("max_length", 2048), defaults.rows_per_shard, defaults.prompts,
                             section.get("max_prompt_length", 1024), section.get("max_new_tokens", 1024))
            out.append(estimate(model, slice_name, "probe", mesh, work.rows_per_shard, param_dtype=param_dtype,
                                work=work, opt_state=opt_state))
    return out


# ---------------------------------------------------------------------------------------------- calibration
def calibrate(only: tuple[str, ...] | None = None) -> dict[str, float]:
    """Measure the XLA factors above with XLA's buffer assignment (``compiled.memory_analysis()``) for small
    models, through this repository's own loss, step and sampler functions (abstract parameters: nothing is
    allocated or run). ``only`` limits the measurement to some keys of :data:`CONSTANTS`."""
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sftrl_jax.models import abstract_model
    from sftrl_jax.models.config import ModelConfig
    from sftrl_jax.optim import OptimizerOptions, init_opt_state, make_optimizer
    from sftrl_jax.rl.step import response_logprobs
    from sftrl_jax.sampling import _generate_batch
    from sftrl_jax.sft.step import make_eval_step, make_train_step, sequence_nll

    def wanted(*keys):
        return only is None or any(k in only for k in keys)

    def model(param_dtype="float32", **kw):
        base = dict(model_type="qwen2", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=4, head_dim=16, max_position_embeddings=1 << 20)
        cfg = ModelConfig(**{**base, **kw})
        return cfg, nnx.split(abstract_model(cfg, dtype=param_dtype, compute_dtype="bfloat16", remat="full"))

    def sft_batch(rows, length):
        ones = jnp.ones((rows, length), jnp.int32)
        return {"input_ids": ones, "labels": ones, "segment_ids": ones,
                "positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length)),
                "label_mask": ones.astype(jnp.float32)}

    def sft_grad_temp(graphdef, params, length) -> int:
        def loss(p):
            nll, mask = sequence_nll(graphdef, p, sft_batch(1, length))
            return jnp.sum(nll * mask)

        return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

    out = {}
    if wanted("attention_bytes"):  # many heads, long sequence, everything else tiny
        _, (graphdef, params) = model(num_heads=8, num_kv_heads=8)
        out["attention_bytes"] = sft_grad_temp(graphdef, params, 1024) / (8 * 1024 * 1024)
    if wanted("attention_fwd_bytes", "logits_fwd_bytes"):  # the probe's held-out loss: forward only
        def eval_temp(graphdef, params, length):
            batch = sft_batch(1, length)
            return jax.jit(make_eval_step(graphdef)).lower(params, batch).compile().memory_analysis().temp_size_in_bytes

        _, (graphdef, params) = model(num_heads=8, num_kv_heads=8)
        out["attention_fwd_bytes"] = eval_temp(graphdef, params, 1024) / (8 * 1024 * 1024)
        _, (graphdef, params) = model(vocab_size=65536, num_heads=1, num_kv_heads=1)
        out["logits_fwd_bytes"] = eval_temp(graphdef, params, 256) / (256 * 65536)
    if wanted("logits_bytes_sft", "logits_bytes_rl"):  # a big vocabulary, short sequences
        vocab, length, response = 65536, 256, 128
        _, (graphdef, params) = model(vocab_size=vocab, num_heads=1, num_kv_heads=1)
        out["logits_bytes_sft"] = sft_grad_temp(graphdef, params, length) / (length * vocab)
        rl_batch = {"input_ids": jnp.ones((1, length + response), jnp.int32),
                    "attention_mask": jnp.ones((1, length + response), jnp.int32),
                    "positions": jnp.arange(length + response, dtype=jnp.int32)[None],
                    "response_ids": jnp.ones((1, response), jnp.int32)}

        def rl_loss(p):  # the GRPO step's use: log-probs at a temperature != 1 and the entropy bonus
            logp, entropy = response_logprobs(graphdef, p, rl_batch, 0.9, with_entropy=True)
            return jnp.sum(logp) + 0.001 * jnp.sum(entropy)

        temp = jax.jit(jax.grad(rl_loss)).lower(params).compile().memory_analysis().temp_size_in_bytes
        out["logits_bytes_rl"] = temp / (response * vocab)
    if wanted("layer_ws_factor"):  # wide layers, one narrow head: the growth from 256 to 1024 tokens
        cfg, (graphdef, params) = model(hidden_size=1024, intermediate_size=4096, num_heads=1, num_kv_heads=1,
                                        head_dim=128)
        short, long = 256, 1024
        growth = sft_grad_temp(graphdef, params, long) - sft_grad_temp(graphdef, params, short)
        growth -= ATTENTION_BYTES * (long**2 - short**2) + cfg.num_layers * (long - short) * cfg.hidden_size * 2
        out["layer_ws_factor"] = growth / ((long - short) * activation_elements(cfg, 1))
    for dtype in ("float32", "bfloat16"):  # the train state through the real SFT step (donated, AdamW)
        if not wanted(f"state_bytes_{dtype}", f"step_transient_bytes_{dtype}"):
            continue
        _, (graphdef, params) = model(vocab_size=4096, hidden_size=512, intermediate_size=2048, num_layers=8,
                                      head_dim=128, param_dtype=dtype)
        optimizer, schedule = make_optimizer(OptimizerOptions(), 100)
        state = {"params": params, "opt_state": jax.eval_shape(lambda p: init_opt_state(optimizer, p), params),
                 "step": jax.ShapeDtypeStruct((), jnp.int32)}
        n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
        batch = {k: v.reshape(4, 1, 4) for k, v in sft_batch(4, 4).items()}
        step = make_train_step(graphdef, optimizer, schedule, emulate_bug="none", shards=1)
        analysis = jax.jit(step, donate_argnums=0).lower(state, batch).compile().memory_analysis()
        out[f"state_bytes_{dtype}"] = analysis.argument_size_in_bytes / n
        out[f"step_transient_bytes_{dtype}"] = analysis.temp_size_in_bytes / n
    if wanted("kv_cache_copies"):  # the decode loop, against the nominal cache of all its rows
        cfg, (graphdef, params) = model(num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64)
        rows, prompt, new, n = 8, 128, 1024, 8
        ids = jnp.ones((rows, prompt), jnp.int32)
        analysis = _generate_batch.lower(graphdef, params, ids, ids, jnp.ones((rows,), bool), jax.random.key(0),
                                         n=n, max_new_tokens=new, temperature=1.0, top_k=0, top_p=1.0, eos_ids=(1,),
                                         pad_id=0, cache_dtype="bfloat16").compile().memory_analysis()
        nominal = rows * n * (prompt + new) * kv_cache_bytes_per_token(cfg)
        out["kv_cache_copies"] = analysis.temp_size_in_bytes / nominal
    return out


CONSTANTS = {
    "attention_bytes": ATTENTION_BYTES, "attention_fwd_bytes": ATTENTION_FWD_BYTES, "logits_fwd_bytes": LOGITS_FWD_BYTES, "logits_bytes_sft": LOGITS_BYTES_SFT, "logits_bytes_rl": LOGITS_BYTES_RL,
    "layer_ws_factor": LAYER_WS_FACTOR, "state_bytes_float32": STATE_BYTES["float32"],
    "state_bytes_bfloat16": STATE_BYTES["bfloat16"], "step_transient_bytes_float32": STEP_TRANSIENT_BYTES["float32"],
    "step_transient_bytes_bfloat16": STEP_TRANSIENT_BYTES["bfloat16"], "kv_cache_copies": KV_CACHE_COPIES,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every candidate mesh, not only the pick")
    parser.add_argument("--config", nargs="+", help="estimate these config files (name: KIND_MODEL_SLICE.yaml)")
    parser.add_argument("--calibrate", action="store_true", help="re-measure the XLA factors (XLA:CPU)")
    parser.add_argument("--opt-state", choices=["sharded", "replicated"], default="sharded",
                        help="AdamW m, v sharded like the parameters (default) or whole on every device")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--slices", nargs="+", default=["v5p-8", "v5p-16", "v5p-32", "v5p-64", "v5p-128", "v6e-8",
                                                       "v6e-64", "8xh100"], choices=sorted(SLICES))
    args = parser.parse_args(argv)
    if args.calibrate:
        measured = calibrate()
        for key, value in measured.items():
            print(f"{key:<32s} measured {value:7.2f}   used {CONSTANTS[key]:7.2f}")
        return 0
    if args.config:
        for path in args.config:
            for e in config_estimates(path, opt_state=args.opt_state):
                print(f"{path}:\n{detail(e)}\n")
        return 0
    rows, missing = [], []
    for model in args.models:
        for slice_name in args.slices:
            for kind in ("sft", "rl"):
                if args.all:
                    rows += [estimate(model, slice_name, kind, m, mb, generation_batch_size=g, opt_state=args.opt_state)
                             for m, mb, g in candidates(model, slice_name, kind)]
                    continue
                chosen = pick(model, slice_name, kind, opt_state=args.opt_state)
                work = RECIPES[model][kind]
                if chosen is None and kind == "sft" and work.seq_len > 8192:
                    # the packed rows of the SFT data are cut at 8192 tokens instead (see docs/scaling.md)
                    chosen = pick(model, slice_name, kind, dataclasses.replace(work, seq_len=8192), args.opt_state)
                if chosen is None:
                    missing.append(f"{model} {kind} on {slice_name}")
                    continue
                rows.append(chosen)
                if model == "qwen3-0.6b" and kind == "sft":  # the pipeline's probe, on the SFT stage's mesh
                    rows.append(estimate(model, slice_name, "probe", chosen.mesh, 4, work=ProbeWork(),
                                         opt_state=args.opt_state))
    print(table(rows), end="")
    if missing:
        print(f"\nNo mesh fits within {HEADROOM:.0%} of HBM: " + "; ".join(missing) + ".")
    return 0


if __name__ == "__main__":
    sys.exit(main())
