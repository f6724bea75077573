"""The RL update and its inputs: response log-probs and the policy update with exact accumulation,
declared once (:func:`rl_functions`) for the trainer and ``sftrl-jax compile``.

A rollout batch holds ``S`` sequences, each a left-padded prompt (``P`` tokens) followed by a
right-padded response (``R`` tokens): ``input_ids [S, P+R]``. Log-probs of the response tokens
come from the logits at positions ``P-1 .. P+R-2``, divided by the sampling temperature (as verl
does), so with ``top_k=0, top_p=1`` they are the sampler's distribution. Log-probs and entropy are
computed ``model.logits_chunk_size`` positions at a time (:func:`sftrl_jax.losses.chunked_logprobs`), so
the ``[S, R, V]`` float32 logits never exist at once.

The update receives one mini-batch laid out ``[micro_steps, shards * rows, ...]``; per-token
weights are computed over the whole mini-batch (:func:`aggregation_weights`), so the loss, and
therefore the update, does not depend on the micro-batch split (same mechanism as SFT). The method
(``rl.method``, :mod:`sftrl_jax.rl.methods`) gives the per-token loss; :func:`method_loss` adds
truncated importance sampling, KL and entropy and aggregates, for every method alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..flops import forward_flops, train_flops
from ..jitted import JitSpec, sds, without_params
from ..losses import agg_weights, chunked_logprobs
from ..optim import apply_update, sum_micro_step_grads
from ..sharding import micro_batch_sharding
from .algorithms import kl_penalty
from .methods import PolicyMethod, get_method, per_row
from .rollouts import check_batch_sizes, padded_lengths

# The arrays of a rollout batch (:func:`sftrl_jax.rl.rollouts.rollout_arrays`): key -> (dtype, extent), the
# extent ``sequence`` [.., P+R], ``response`` [.., R] or ``row`` [..]
ROLLOUT_KEYS = {"input_ids": ("int32", "sequence"), "attention_mask": ("int32", "sequence"),
                "positions": ("int32", "sequence"), "response_ids": ("int32", "response"),
                "response_mask": ("float32", "response"), "response_off_policy": ("float32", "response")}


def update_batch_keys(cfg) -> dict[str, tuple[str, str]]:
    """Every array of an update batch under ``cfg`` (an ``RLSection``): the rollout, the advantages, the old
    (and reference) log-probs, the truncated-importance-sampling weights, the entropy's per-row weights (verl's
    micro-batch token means) and the method's own inputs."""
    keys = {**ROLLOUT_KEYS, "advantages": ("float32", "row"), "old_logp": ("float32", "response")}
    if cfg.kl_coef > 0:
        keys["ref_logp"] = ("float32", "response")
    if cfg.tis_cap is not None:
        keys["tis_weight"] = ("float32", "response")
    if cfg.entropy_coef > 0 and cfg.entropy_agg == "micro_batch_token_mean":
        keys["entropy_weight"] = ("float32", "row")
    keys.update({name: ("float32", "row") for name in get_method(cfg.method).row_inputs})
    return keys


def response_logprobs(graphdef, params, batch, temperature: float, *, with_entropy: bool = False):
    """log p of each response token ``[S, R]`` (and its entropy when asked)."""
    model = nnx.merge(graphdef, params)
    response_len = batch["response_ids"].shape[-1]
    prompt_len = batch["input_ids"].shape[-1] - response_len
    hidden, _ = model.forward(batch["input_ids"], attention_mask=batch["attention_mask"],
                              positions=batch["positions"])

    def logits_fn(h):
        logits = model.logits(h)
        return logits / temperature if temperature > 0 else logits

    return chunked_logprobs(logits_fn, hidden[:, prompt_len - 1:prompt_len - 1 + response_len], batch["response_ids"],
                            chunk_size=model.logits_chunk_size, with_entropy=with_entropy)


def make_logprob_fn(graphdef, temperature: float):
    """``fn(params, batch [N, B, ...]) -> logp [N, B, R]``, one micro-batch at a time (no gradients)."""

    def fn(params, batch):
        return jax.lax.map(lambda mb: response_logprobs(graphdef, params, mb, temperature)[0], batch)

    return fn


def aggregation_weights(method: PolicyMethod, mask, off_policy, agg_mode: str, loss_scale_factor: float):
    """``(weights, demonstration_weights, token_mean)`` over a whole mini-batch: the policy term's aggregation
    (``agg_mode`` over the policy tokens: every response token, or the sampled ones when the method trains
    demonstrations with a term of its own), the demonstration term's token mean, and the metrics' token mean."""
    mask = mask.astype(jnp.float32)
    off = off_policy.astype(jnp.float32) if method.demonstrations == "separate" else jnp.zeros_like(mask)
    weights = agg_weights(mask * (1.0 - off), agg_mode, loss_scale_factor=loss_scale_factor)
    return weights, agg_weights(mask * off, "token-mean"), agg_weights(mask, "token-mean")


def method_loss(method: PolicyMethod, logp, batch: dict, cfg, *, weights, demonstration_weights, token_mean,
                entropy=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss the update differentiates, and its metrics, for one (micro-)batch.

    ``sum(weights * (policy_scale * tis_weight * policy + kl_coef * KL - entropy_coef * entropy))
    + sum(demonstration_weights * demonstration_scale * demonstration)`` with the method's
    :class:`~sftrl_jax.rl.methods.Objective`; ``tis_weight`` when the batch has one, KL when it has
    ``ref_logp`` and ``cfg.kl_coef > 0``, entropy when given. With ``entropy_weight`` in the batch (one per
    row: ``rl.entropy_agg: micro_batch_token_mean``) the entropy term is instead
    ``-entropy_coef * sum(entropy_weight * response_mask * entropy)``. The weights come from
    :func:`aggregation_weights` over the whole mini-batch (a micro-batch passes its share). Metrics are
    token means (``token_mean``) of the method's stats, ``entropy``, ``kl_ref`` and, for methods with
    demonstrations, ``off_policy_share``.
    """
    objective = method.objective(logp, batch, cfg)
    policy = objective.policy
    if "tis_weight" in batch:
        policy = policy * batch["tis_weight"]
    per_token = policy if objective.policy_scale is None else per_row(objective.policy_scale, logp.ndim) * policy
    stats = dict(objective.stats)
    if "ref_logp" in batch and cfg.kl_coef > 0:
        stats["kl_ref"] = kl_penalty(logp, batch["ref_logp"], cfg.kl_estimator)
        per_token = per_token + cfg.kl_coef * stats["kl_ref"]
    entropy_term = 0.0
    if entropy is not None:
        stats["entropy"] = entropy
        if cfg.entropy_coef > 0 and "entropy_weight" in batch:
            row_weights = per_row(batch["entropy_weight"], logp.ndim) * batch["response_mask"]
            entropy_term = -cfg.entropy_coef * jnp.sum(row_weights * entropy)
        elif cfg.entropy_coef > 0:
            per_token = per_token - cfg.entropy_coef * entropy
    loss = jnp.sum(weights * per_token) + entropy_term
    if objective.demonstration is not None:
        scale = per_row(objective.demonstration_scale, logp.ndim)
        loss = loss + jnp.sum(demonstration_weights * scale * objective.demonstration)
    if method.demonstrations is not None:
        stats["off_policy_share"] = batch["response_off_policy"].astype(jnp.float32)
    return loss, {name: jnp.sum(token_mean * value) for name, value in stats.items()}


def make_policy_update(graphdef, optimizer: optax.GradientTransformation, schedule, cfg, *, temperature: float,
                       max_new_tokens: int):
    """``update(state, batch) -> (state, metrics)`` for one mini-batch of ``rl.method``
    (``state = {params, opt_state, step}``; ``batch``: the arrays of :func:`update_batch_keys`, laid out
    ``[micro_steps, rows, ...]``)."""
    method = get_method(cfg.method)
    scale = cfg.loss_scale_factor if cfg.loss_scale_factor is not None else float(max_new_tokens)

    def loss_fn(params, micro_batch, weights, demonstration_weights, token_mean):
        logp, entropy = response_logprobs(graphdef, params, micro_batch, temperature, with_entropy=True)
        return method_loss(method, logp, micro_batch, cfg, weights=weights,
                           demonstration_weights=demonstration_weights, token_mean=token_mean, entropy=entropy)

    def update(state, batch):
        weights = aggregation_weights(method, batch["response_mask"], batch["response_off_policy"], cfg.agg_mode,
                                      scale)

        def micro_step(params, xs):
            return jax.grad(loss_fn, has_aux=True)(params, *xs)

        grads, summed = sum_micro_step_grads(micro_step, state["params"], (batch, *weights))
        params, opt_state = apply_update(optimizer, grads, state["opt_state"], state["params"])
        metrics = {name: jnp.sum(value) for name, value in summed.items()}
        metrics.update(grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]))
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return update


def batch_lengths(config) -> tuple[int, int]:
    """(prompt, response) lengths of the largest rollout batch ``config`` can produce."""
    max_new_tokens = config.sampling.max_new_tokens
    return padded_lengths(config.data.max_prompt_length, max_new_tokens, max_new_tokens)


def abstract_batch(keys: dict, leading: tuple, prompt_len: int, response_len: int, mesh) -> dict:
    """ShapeDtypeStructs of the arrays ``keys`` names (:data:`ROLLOUT_KEYS` form), laid out ``leading + ...``."""
    extent = {"sequence": (prompt_len + response_len,), "response": (response_len,), "row": ()}
    out = {}
    for key, (dtype, kind) in keys.items():
        shape = leading + extent[kind]
        out[key] = sds(shape, np.dtype(dtype), micro_batch_sharding(mesh, len(shape)))
    return out


def rl_functions(ctx) -> dict[str, JitSpec]:
    """The RL trainer's jitted functions for ``ctx`` (a :class:`sftrl_jax.training.LoopContext` whose
    config is an ``RLConfig``): ``policy_update`` (one mini-batch of ``rl.method``, the state donated) and
    ``logprobs`` (old and reference log-probs of the step's sequences)."""
    config = ctx.config
    cfg, sampling = config.rl, config.sampling
    micro_steps = check_batch_sizes(config, ctx.shards)
    rows = config.train.micro_batch_size * ctx.shards
    prompt_len, response_len = batch_lengths(config)
    sequences = cfg.prompts_per_step * sampling.n
    state = ctx.abstract_state
    ref = state["params"] if cfg.kl_coef > 0 else None
    batch_sharding = micro_batch_sharding(ctx.mesh, 2)
    seq_len = prompt_len + response_len
    shapes = f"prompt {prompt_len} + response {response_len} tokens"
    update = JitSpec(
        make_policy_update(ctx.graphdef, ctx.optimizer, ctx.schedule, cfg, temperature=sampling.temperature,
                           max_new_tokens=sampling.max_new_tokens),
        args=(state, abstract_batch(update_batch_keys(cfg), (micro_steps, rows), prompt_len, response_len, ctx.mesh)),
        in_shardings=(ctx.state_shardings, batch_sharding), out_shardings=(ctx.state_shardings, None),
        donate_argnums=(0,), model_flops=micro_steps * rows * train_flops(ctx.model_config, seq_len), resident=ref,
        note=f"{cfg.method}: one mini-batch of {micro_steps} micro-steps x {rows} rows, {shapes}")
    logprobs = JitSpec(
        make_logprob_fn(ctx.graphdef, sampling.temperature),
        args=(state["params"], abstract_batch(ROLLOUT_KEYS, (sequences // rows, rows), prompt_len, response_len,
                                              ctx.mesh)),
        in_shardings=(ctx.state_shardings["params"], batch_sharding),
        model_flops=sequences * forward_flops(ctx.model_config, seq_len),
        resident={"state": without_params(state), "ref": ref},
        note=f"old{' and ref' if ref is not None else ''} log-probs: {sequences} sequences, {shapes}")
    return {"policy_update": update, "logprobs": logprobs}
