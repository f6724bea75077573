"""GRPO's jitted pieces: response log-probs and the policy update with exact accumulation.

A rollout batch holds ``S`` sequences, each a left-padded prompt (``P`` tokens) followed by a
right-padded response (``R`` tokens): ``input_ids [S, P+R]``. Log-probs of the response tokens
come from the logits at positions ``P-1 .. P+R-2``, divided by the sampling temperature (as verl
does), so with ``top_k=0, top_p=1`` they are the sampler's distribution. Log-probs and entropy are
computed ``model.logits_chunk_size`` positions at a time (:func:`sftrl_jax.losses.chunked_logprobs`), so
the ``[S, R, V]`` float32 logits never exist at once.

The update receives one mini-batch laid out ``[micro_steps, shards * rows, ...]``; per-token
weights are computed over the whole mini-batch (``agg_weights``), so the loss, and therefore the
update, does not depend on the micro-batch split (same mechanism as SFT).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..losses import agg_weights, chunked_logprobs
from ..optim import apply_update, sum_micro_step_grads
from .algorithms import mixed_policy_loss, policy_loss
from .config import RLSection


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


def make_grpo_step(graphdef, optimizer: optax.GradientTransformation, schedule, cfg: RLSection, *,
                   temperature: float, max_new_tokens: int):
    """``step(state, batch) -> (state, metrics)`` for one mini-batch (``state = {params, opt_state, step}``).

    ``batch`` has the rollout arrays plus ``advantages [N, B]``, ``old_logp [N, B, R]`` and, when
    ``cfg.kl_coef > 0``, ``ref_logp [N, B, R]``; for CHORD also ``chord_mu [N]`` (the step's mu).
    Each micro-batch's loss is :func:`sftrl_jax.rl.algorithms.policy_loss` (GRPO) or
    :func:`~sftrl_jax.rl.algorithms.mixed_policy_loss` (LUFFY, CHORD) with that micro-batch's share
    of the mini-batch's aggregation weights, so the update does not depend on the micro-batch split.
    """
    scale = cfg.loss_scale_factor if cfg.loss_scale_factor is not None else float(max_new_tokens)

    def loss_fn(params, micro_batch, weights, token_mean, off_weights):
        logp, entropy = response_logprobs(graphdef, params, micro_batch, temperature, with_entropy=True)
        common = dict(clip_low=cfg.clip_low, clip_high=cfg.clip_high, weights=weights, token_mean=token_mean,
                      entropy=entropy, entropy_coef=cfg.entropy_coef)
        if cfg.method == "grpo":
            return policy_loss(logp, micro_batch["old_logp"], micro_batch["advantages"], micro_batch["response_mask"],
                               clip_c=cfg.clip_c, ref_logp=micro_batch.get("ref_logp"), kl_coef=cfg.kl_coef,
                               kl_estimator=cfg.kl_estimator, **common)
        return mixed_policy_loss(cfg.method, logp, micro_batch["old_logp"], micro_batch["advantages"],
                                 micro_batch["response_mask"], micro_batch["response_off_policy"],
                                 off_weights=off_weights, mu=micro_batch.get("chord_mu", 0.0),
                                 shaping_gamma=cfg.shaping_gamma, clip_c=cfg.clip_c,
                                 clip_on_policy=cfg.clip_on_policy, **common)

    def step(state, batch):
        mask = batch["response_mask"].astype(jnp.float32)
        off = batch["response_off_policy"].astype(jnp.float32) if cfg.method == "chord" else jnp.zeros_like(mask)
        # CHORD aggregates its GRPO term over on-policy tokens and its SFT term over demonstration tokens
        weights = agg_weights(mask * (1.0 - off), cfg.agg_mode, loss_scale_factor=scale)
        off_weights = agg_weights(mask * off, "token-mean")
        token_mean = agg_weights(mask, "token-mean")

        def micro_step(params, xs):
            return jax.grad(loss_fn, has_aux=True)(params, *xs)

        grads, summed = sum_micro_step_grads(micro_step, state["params"], (batch, weights, token_mean, off_weights))
        params, opt_state = apply_update(optimizer, grads, state["opt_state"], state["params"])
        metrics = {name: jnp.sum(value) for name, value in summed.items()}
        metrics.update(grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]))
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return step
