"""GSPO (Group Sequence Policy Optimization): one importance ratio per sequence, the geometric mean of its
tokens' ratios ``s_i = exp(mean_t(logp - old_logp))``, clipped per sequence. Defaults are the published
ones: clip range ``[1 - 3e-4, 1 + 4e-4]`` and ``seq-mean-token-mean`` aggregation, with which the per-token
losses below average to GSPO's objective ``mean_i max(-A_i s_i, -A_i clip(s_i, 1 - low, 1 + high))``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .base import Objective, PolicyMethod, register


def _sequence_log_ratio(logp, old_logp, mask):
    tokens = jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    return jnp.sum((logp - old_logp) * mask, axis=-1) / tokens


def gspo_token_losses(logp, old_logp, advantages, mask, *, clip_low: float = 3e-4,
                      clip_high: float = 4e-4) -> jax.Array:
    """GSPO's per-token losses ``[B, R]``; their ``seq-mean-token-mean`` aggregation is GSPO's objective.

    Token ``t`` of sequence ``i`` carries the ratio ``s_i,t = sg(s_i) * p_t / sg(p_t)``: its value is the
    sequence ratio ``s_i`` and its gradient ``s_i * grad logp_t``, so the mean over the sequence's tokens has
    the value and gradient of the sequence-level term (the log-ratio is capped at 10, as verl does, before
    the exponential). ``mask`` marks each sequence's tokens; ``advantages`` ``[B]`` or ``[B, R]``.
    """
    mask = mask.astype(logp.dtype)
    if advantages.ndim == logp.ndim - 1:
        advantages = advantages[..., None]
    sequence = jax.lax.stop_gradient(_sequence_log_ratio(logp, old_logp, mask))
    log_ratio = jnp.minimum(logp - jax.lax.stop_gradient(logp) + sequence[..., None], 10.0)
    ratio = jnp.exp(log_ratio)
    return jnp.maximum(-advantages * ratio, -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high))


@register
class GSPO(PolicyMethod):
    name = "gspo"
    defaults = {"clip_low": 3e-4, "clip_high": 4e-4, "agg_mode": "seq-mean-token-mean"}

    def objective(self, logp, batch, cfg) -> Objective:
        mask = batch["response_mask"]
        losses = gspo_token_losses(logp, batch["old_logp"], batch["advantages"], mask, clip_low=cfg.clip_low,
                                   clip_high=cfg.clip_high)
        sequence = _sequence_log_ratio(logp, batch["old_logp"], mask.astype(logp.dtype))[..., None]
        ratio = jnp.broadcast_to(jnp.exp(jnp.minimum(sequence, 10.0)), logp.shape)
        clipped = ((ratio < 1.0 - cfg.clip_low) | (ratio > 1.0 + cfg.clip_high)).astype(jnp.float32)
        return Objective(policy=losses, stats={"pg_loss": losses, "clipfrac": clipped,
                                               "ppo_kl": jnp.broadcast_to(-sequence, logp.shape)})
