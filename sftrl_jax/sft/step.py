"""The SFT optimizer step: exact global-token-mean gradient accumulation, and the two bugs.

One step receives the whole global batch as ``[micro_steps, shards * rows, length]`` arrays
(:mod:`sftrl_jax.data.batching`). Per-token weights are computed over *all* of it first
(:func:`sftrl_jax.losses.agg_weights`), then a ``lax.scan`` over micro-steps sums each
micro-step's gradient of ``sum(weights * nll)``. The sum is the gradient of the global-token mean
(every supervised token of the global batch weighted alike) whatever the split into micro-steps or
devices; jit's SPMD partitioning sums over the data-parallel shards.

``emulate_bug`` reproduces the PyTorch stacks' arithmetic on purpose, on a *virtual* DeepSpeed
layout of ``ranks`` data-parallel ranks x ``N`` micro-steps x ``micro_batch_size`` sequences
(``train.emulate_ranks`` / ``train.emulate_micro_batch_size``; by default our own mesh's). Example
``k`` of the global batch sits where a real run with ``ranks`` shards puts it
(:func:`sftrl_jax.data.batching.layout_step`): group ``g = k // micro_batch_size``, micro-step
``g // ranks``, rank ``g % ranks``. :func:`bug_example_weights` turns that into one weight per
example on the host; the batch carries them as per-token ``loss_weights`` and the step takes the
exact gradient of ``sum(loss_weights * nll)``, so the emulated arithmetic does not depend on how
our mesh splits the batch:

* ``deepspeed_offload`` (DeepSpeed's gradient accumulation under ZeRO optimizer offload keeps only
  some micro-steps' gradients): only micro-steps 0 and N-1 reach the optimizer, i.e. the
  update is built from ``(g_0 + g_{N-1}) / N`` where ``g_i`` is micro-step i's gradient scaled so
  that their mean is the correct gradient (weight ``1 / T`` for the kept examples, ``T`` the
  global batch's supervised tokens, 0 for the others). Every rank drops the same micro-steps.
* ``openrlhf_mean_of_means`` (OpenRLHF's SFT loss is a mean of per-micro-batch means, not a mean
  over the global batch's tokens): each (micro-step, rank) loss is the mean over its own tokens,
  averaged over micro-steps and ranks (weight ``1 / (T_group * N * ranks)``).
* ``both``: the two together.
"""

from __future__ import annotations

import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..data.batching import WEIGHTS_KEY, pad_rows
from ..flops import forward_flops, train_flops
from ..jitted import JitSpec, abstract, sds, without_params
from ..losses import agg_weights, chunked_logprobs
from ..optim import apply_update, sum_micro_step_grads
from ..sharding import micro_batch_sharding, rows_sharding
from .config import EmulateBug

BUGS = typing.get_args(EmulateBug)


def _require_bug(emulate_bug: str) -> None:
    if emulate_bug not in BUGS:
        raise ValueError(f"train.emulate_bug: unknown value {emulate_bug!r}; choose one of {BUGS}")


def virtual_layout(size: int, ranks: int, micro_batch_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``(micro_step, rank, N)`` of each of the ``size`` examples of a global batch on a virtual layout
    of ``ranks`` x ``N`` micro-steps x ``micro_batch_size``, as :func:`~sftrl_jax.data.batching.layout_step`
    assigns them for a real run with ``ranks`` shards."""
    if size % (ranks * micro_batch_size):
        raise ValueError(f"a global batch of {size} is not a whole number of micro-steps of {ranks} ranks x "
                         f"{micro_batch_size} sequences")
    group = np.arange(size) // micro_batch_size  # = micro_step * ranks + rank
    return group // ranks, group % ranks, size // (ranks * micro_batch_size)


def bug_example_weights(token_counts, emulate_bug: str, *, ranks: int, micro_batch_size: int) -> np.ndarray:
    """One loss weight per example (float64) of a global batch whose examples have ``token_counts``
    supervised tokens, such that ``sum_k weight_k * (sum of example k's token nll)`` is the loss
    whose gradient the emulated stack hands the optimizer (see the module docstring)."""
    _require_bug(emulate_bug)
    tokens = np.asarray(token_counts, np.float64)
    micro_step, rank, n = virtual_layout(len(tokens), ranks, micro_batch_size)
    keep = np.ones(len(tokens))
    if emulate_bug in ("deepspeed_offload", "both") and n > 2:
        keep = ((micro_step == 0) | (micro_step == n - 1)).astype(np.float64)
    if emulate_bug in ("openrlhf_mean_of_means", "both"):
        group = micro_step * ranks + rank
        group_tokens = np.bincount(group, weights=tokens, minlength=n * ranks)[group]
        return keep / np.maximum(group_tokens, 1.0) / (n * ranks)
    return keep / max(tokens.sum(), 1.0)


def supervised_token_counts(examples) -> np.ndarray:
    """Tokens each example's loss is taken over: its response tokens after the first position (that one
    has no predecessor)."""
    return np.array([float(np.sum(e.loss_mask[1:])) for e in examples])


def sequence_nll(graphdef, params, batch) -> tuple[jax.Array, jax.Array]:
    """Per-position negative log-likelihood ``[rows, length]`` of the labels, and the label mask."""
    model = nnx.merge(graphdef, params)
    hidden, _ = model.forward(batch["input_ids"], attention_mask=batch["segment_ids"] > 0,
                              positions=batch["positions"], segment_ids=batch["segment_ids"])
    logp, _ = chunked_logprobs(model.logits, hidden, batch["labels"], chunk_size=model.logits_chunk_size)
    return -logp, batch["label_mask"]


def accumulate_gradients(graphdef, params, batch, weights):
    """Over micro-steps: ``sum_i grad(sum(weights_i * nll_i))`` in float32.

    Also returns the true loss statistics (nll sum and token count over every micro-step).
    """

    def micro_step(params, xs):
        micro_batch, micro_weights = xs

        def loss_fn(p):
            nll, mask = sequence_nll(graphdef, p, micro_batch)
            return jnp.sum(micro_weights * nll), (jnp.sum(nll * mask), jnp.sum(mask))

        grads, stats = jax.grad(loss_fn, has_aux=True)(params)
        return jax.tree.map(lambda g: g.astype(jnp.float32), grads), stats

    grads, (nll_sums, token_counts) = sum_micro_step_grads(micro_step, params, (batch, weights))
    return grads, jnp.sum(nll_sums), jnp.sum(token_counts)


def make_train_step(graphdef, optimizer: optax.GradientTransformation, schedule, *, emulate_bug: str = "none"):
    """``step(state, batch) -> (state, metrics)``; ``state = {"params", "opt_state", "step"}``.

    Correct accumulation (``emulate_bug="none"``) weighs every supervised token by 1 / (tokens of
    the global batch). With a bug emulated the batch must carry ``loss_weights``
    (:func:`bug_example_weights` through the batcher's ``example_weights``).
    """
    _require_bug(emulate_bug)

    def step(state, batch):
        if emulate_bug == "none":
            weights = agg_weights(batch["label_mask"], "token-mean")
        elif WEIGHTS_KEY in batch:
            weights = batch[WEIGHTS_KEY]
        else:
            raise ValueError(f"emulate_bug={emulate_bug!r}: the batch has no {WEIGHTS_KEY!r} (the emulated "
                             "layout's per-token weights; see sftrl_jax.sft.step.bug_example_weights)")
        grads, nll_sum, tokens = accumulate_gradients(graphdef, state["params"], batch, weights)
        params, opt_state = apply_update(optimizer, grads, state["opt_state"], state["params"])
        metrics = {
            "loss": nll_sum / jnp.maximum(tokens, 1),  # the true global-token mean, whatever the bug
            "grad_norm": optax.tree.norm(grads),     # of the gradient the optimizer received
            "lr": schedule(state["step"]),
            "tokens": tokens,
        }
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return step


def make_eval_step(graphdef):
    """``eval(params, batch [rows, length]) -> (nll_sum, tokens)``."""

    def evaluate(params, batch):
        nll, mask = sequence_nll(graphdef, params, batch)
        return jnp.sum(nll * mask), jnp.sum(mask)

    return evaluate


def batch_dtypes(emulate_bug: str) -> dict[str, np.dtype]:
    """The arrays of an SFT batch (the batcher's own, :func:`sftrl_jax.data.batching.pad_rows`) and their
    dtypes; with a bug emulated also its per-token ``loss_weights``."""
    dtypes = {k: v.dtype for k, v in pad_rows([], 1, 1).items()}
    if emulate_bug != "none":
        dtypes[WEIGHTS_KEY] = np.dtype("float32")
    return dtypes


def sft_functions(ctx) -> dict[str, JitSpec]:
    """The SFT trainer's jitted functions for ``ctx`` (a :class:`sftrl_jax.training.LoopContext` whose config
    is an ``SFTConfig``): ``train_step`` (one global batch ``[micro_steps, shards * rows, max_length]``, the
    state donated) and, when the config holds out data, ``eval_step`` (``[shards * rows, max_length]``)."""
    config, mesh = ctx.config, ctx.mesh
    train = config.train
    per_micro = train.micro_batch_size * ctx.shards
    if train.global_batch_size % per_micro:
        raise ValueError(f"train.global_batch_size ({train.global_batch_size}) must be a multiple of "
                         f"train.micro_batch_size ({train.micro_batch_size}) x data-parallel shards ({ctx.shards})")
    micro_steps = train.global_batch_size // per_micro
    length = config.data.max_length
    dtypes = batch_dtypes(train.emulate_bug)
    batch_sharding = micro_batch_sharding(mesh, 3)
    state = ctx.abstract_state
    functions = {"train_step": JitSpec(
        make_train_step(ctx.graphdef, ctx.optimizer, ctx.schedule, emulate_bug=train.emulate_bug),
        args=(state, {k: sds((micro_steps, per_micro, length), dtype, batch_sharding) for k, dtype in dtypes.items()}),
        in_shardings=(ctx.state_shardings, batch_sharding), out_shardings=(ctx.state_shardings, None),
        donate_argnums=(0,), model_flops=micro_steps * per_micro * train_flops(ctx.model_config, length),
        note=f"{micro_steps} micro-steps x {per_micro} rows x {length} tokens")}
    if config.data.eval_files or config.data.eval_fraction > 0:
        functions["eval_step"] = eval_spec(ctx.graphdef, mesh, state["params"], rows=per_micro, length=length,
                                           params_sharding=ctx.state_shardings["params"],
                                           model_config=ctx.model_config, resident=without_params(state))
    return functions


def eval_spec(graphdef, mesh, params, *, rows: int, length: int, params_sharding=None, model_config=None,
              resident=None) -> JitSpec:
    """The held-out loss ``eval(params, batch [rows, length]) -> (nll_sum, tokens)`` on ``mesh`` (SFT's
    periodic evaluation and the pipeline's probe); ``params``: the parameters or their abstract form."""
    sharding = rows_sharding(mesh, 2)
    batch = {k: sds((rows, length), dtype, sharding) for k, dtype in batch_dtypes("none").items()}
    return JitSpec(make_eval_step(graphdef), args=(abstract(params), batch),
                   in_shardings=(params_sharding, sharding) if params_sharding is not None else None,
                   model_flops=rows * forward_flops(model_config, length) if model_config is not None else None,
                   resident=resident, note=f"{rows} rows x {length} tokens")
