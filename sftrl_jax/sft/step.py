"""The SFT optimizer step: exact global-token-mean gradient accumulation, and the two bugs.

One step receives the whole global batch as ``[micro_steps, shards * rows, length]`` arrays
(:mod:`sftrl_jax.data.batching`). Per-token weights are computed over *all* of it first
(:func:`sftrl_jax.losses.agg_weights`), then a ``lax.scan`` over micro-steps sums each
micro-step's gradient of ``sum(weights * nll)``. The sum is the gradient of the global-token mean
(BRIEF §4) whatever the split into micro-steps or devices; jit's SPMD partitioning sums over the
data-parallel shards.

``emulate_bug`` reproduces the PyTorch stacks' arithmetic on purpose:

* ``deepspeed_offload`` (BRIEF §2): only micro-steps 0 and N-1 reach the optimizer, i.e. the
  update is built from ``(g_0 + g_{N-1}) / N`` where ``g_i`` is micro-step i's gradient scaled so
  that their mean is the correct gradient. Every rank drops the same micro-steps, so dropping
  them on the micro-step axis is exactly the per-rank behaviour.
* ``openrlhf_mean_of_means`` (BRIEF §3): each (micro-step, shard) loss is the mean over its own
  tokens, averaged over micro-steps and shards.
* ``both``: the two together.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..losses import agg_weights, chunked_logprobs
from ..optim import apply_update, sum_micro_step_grads

EmulateBug = Literal["none", "deepspeed_offload", "openrlhf_mean_of_means", "both"]
BUGS = ("none", "deepspeed_offload", "openrlhf_mean_of_means", "both")


def micro_step_keep(micro_steps: int, emulate_bug: str) -> jax.Array:
    """1.0 for micro-steps whose gradient reaches the optimizer, 0.0 for the dropped ones."""
    keep = jnp.ones((micro_steps,), jnp.float32)
    if emulate_bug in ("deepspeed_offload", "both") and micro_steps > 2:
        index = jnp.arange(micro_steps)
        keep = ((index == 0) | (index == micro_steps - 1)).astype(jnp.float32)
    return keep


def step_weights(label_mask: jax.Array, emulate_bug: str, shards: int) -> jax.Array:
    mode = "micro-mean-of-means" if emulate_bug in ("openrlhf_mean_of_means", "both") else "token-mean"
    return agg_weights(label_mask, mode, shards=shards)


def sequence_nll(graphdef, params, batch) -> tuple[jax.Array, jax.Array]:
    """Per-position negative log-likelihood ``[rows, length]`` of the labels, and the label mask."""
    model = nnx.merge(graphdef, params)
    hidden, _ = model.forward(batch["input_ids"], attention_mask=batch["segment_ids"] > 0,
                              positions=batch["positions"], segment_ids=batch["segment_ids"])
    logp, _ = chunked_logprobs(model.logits, hidden, batch["labels"], chunk_size=model.logits_chunk_size)
    return -logp, batch["label_mask"]


def accumulate_gradients(graphdef, params, batch, weights, keep):
    """Over micro-steps: ``sum_i keep_i * grad(sum(weights_i * nll_i))`` in float32.

    Also returns the true loss statistics (nll sum and token count over every micro-step).
    """

    def micro_step(params, xs):
        micro_batch, micro_weights, micro_keep = xs

        def loss_fn(p):
            nll, mask = sequence_nll(graphdef, p, micro_batch)
            return jnp.sum(micro_weights * nll), (jnp.sum(nll * mask), jnp.sum(mask))

        grads, stats = jax.grad(loss_fn, has_aux=True)(params)
        return jax.tree.map(lambda g: micro_keep * g.astype(jnp.float32), grads), stats

    grads, (nll_sums, token_counts) = sum_micro_step_grads(micro_step, params, (batch, weights, keep))
    return grads, jnp.sum(nll_sums), jnp.sum(token_counts)


def make_train_step(graphdef, optimizer: optax.GradientTransformation, schedule, *, emulate_bug: str,
                    shards: int):
    """``step(state, batch) -> (state, metrics)``; ``state = {"params", "opt_state", "step"}``."""
    if emulate_bug not in BUGS:
        raise ValueError(f"train.emulate_bug: unknown value {emulate_bug!r}; choose one of {BUGS}")

    def step(state, batch):
        micro_steps = batch["input_ids"].shape[0]
        weights = step_weights(batch["label_mask"], emulate_bug, shards)
        keep = micro_step_keep(micro_steps, emulate_bug)
        grads, nll_sum, tokens = accumulate_gradients(graphdef, state["params"], batch, weights, keep)
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
