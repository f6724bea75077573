"""CISPO (clipped importance-sampling-weight policy optimisation, as MiniMax-M1 describes it): every token
keeps its gradient ``A * grad logp``, weighted by its importance ratio clipped and held constant
(stop-gradient), instead of PPO's dropping the tokens whose ratio left the clip range. Defaults: no lower
bound on the weight (``clip_low: 1.0``, MiniMax-M1 sets it large), ``clip_high: 0.28`` (Trinity-RFT's
default), token-mean aggregation."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .base import Objective, PolicyMethod, register


def _clipped_weight(logp, old_logp, clip_low: float, clip_high: float):
    ratio = jnp.exp(jnp.clip(logp - old_logp, -20.0, 20.0))
    return ratio, jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)


def cispo_token_losses(logp, old_logp, advantages, *, clip_low: float, clip_high: float) -> jax.Array:
    """CISPO's per-token losses ``[B, R]``: ``-sg(clip(exp(logp - old_logp), 1 - clip_low, 1 + clip_high)) * A *
    logp``, whose gradient per token is ``-sg(clip(ratio)) * A`` (times ``grad logp``). ``advantages`` ``[B]``
    or ``[B, R]``."""
    if advantages.ndim == logp.ndim - 1:
        advantages = advantages[..., None]
    _, weight = _clipped_weight(logp, old_logp, clip_low, clip_high)
    return -jax.lax.stop_gradient(weight) * advantages * logp


@register
class CISPO(PolicyMethod):
    name = "cispo"
    defaults = {"clip_low": 1.0, "clip_high": 0.28}

    def objective(self, logp, batch, cfg) -> Objective:
        old = batch["old_logp"]
        losses = cispo_token_losses(logp, old, batch["advantages"], clip_low=cfg.clip_low, clip_high=cfg.clip_high)
        ratio, weight = _clipped_weight(logp, old, cfg.clip_low, cfg.clip_high)
        return Objective(policy=losses, stats={"pg_loss": losses, "clipfrac": (weight != ratio).astype(jnp.float32),
                                               "ppo_kl": old - logp})
