"""LUFFY: each group is ``sampling.n - 1`` samples and the prompt's demonstration, the demonstration's tokens
trained through policy shaping ``f(p) = p / (p + gamma)``; defaults are LUFFY's released recipe
(``grpo_use_std=False``, ``loss_remove_token_mean=True``, ``loss_remove_clip=True``, entropy 0.001)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ...config import ConfigError
from .base import Objective, PolicyMethod, register


def luffy_token_losses(logp, old_logp, advantages, off_policy_mask, *, shaping_gamma: float = 0.1,
                       clip_low: float = 0.2, clip_high: float = 0.2, clip_on_policy: bool = True) -> jax.Array:
    """LUFFY's per-token losses ``[B, R]`` before aggregation.

    On-policy tokens (``off_policy_mask == 0``): the PPO ratio ``exp(logp - old_logp)``, loss
    ``-A * ratio``, clipped to ``[1 - clip_low, 1 + clip_high]`` PPO-style when ``clip_on_policy``
    (LUFFY's released run removes the clip: ``loss_remove_clip=True``). Demonstration tokens
    (``off_policy_mask == 1``): policy shaping ``f(p) = p / (p + gamma)`` of ``p = exp(logp)``, loss
    ``-A * f(p)``, gradients through ``p``, no clip and no importance ratio to a behaviour policy;
    ``d/dlogp = -A * gamma * p / (p + gamma)^2``. ``advantages``: ``[B]`` or ``[B, R]``.
    """
    if advantages.ndim == logp.ndim - 1:
        advantages = advantages[..., None]
    ratio = jnp.exp(jnp.clip(logp - old_logp, -20.0, 20.0))
    on_policy = -advantages * ratio
    if clip_on_policy:
        on_policy = jnp.maximum(on_policy, -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high))
    p = jnp.exp(logp)
    shaped = -advantages * p / (p + shaping_gamma)
    return jnp.where(off_policy_mask > 0, shaped, on_policy)


@register
class LUFFY(PolicyMethod):
    name = "luffy"
    defaults = {"norm_adv_by_std": False, "agg_mode": "seq-mean-token-sum-norm", "entropy_coef": 0.001,
                "entropy_agg": "micro_batch_token_mean", "clip_on_policy": False}
    demonstrations = "policy"

    def validate(self, cfg) -> None:
        # LUFFY divides each rank's summed token losses by its padded response length and averages over its
        # ranks: the global sum over (response length x ranks). No default can know the ranks of the run
        # being reproduced, so the constant must be stated.
        if cfg.agg_mode == "seq-mean-token-sum-norm" and cfg.loss_scale_factor is None:
            raise ConfigError(
                "config key 'rl.loss_scale_factor': rl.method=luffy with agg_mode seq-mean-token-sum-norm "
                "needs the constant the summed token losses are divided by. LUFFY's released run divides by "
                "its padded response length times its 8 data-parallel ranks (8192 x 8): set "
                "rl.loss_scale_factor=65536 to reproduce it, or sampling.max_new_tokens x the ranks of the run "
                "you compare with")

    def objective(self, logp, batch, cfg) -> Objective:
        losses = luffy_token_losses(logp, batch["old_logp"], batch["advantages"], batch["response_off_policy"],
                                    shaping_gamma=cfg.shaping_gamma, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                                    clip_on_policy=cfg.clip_on_policy)
        return Objective(policy=losses, stats={"pg_loss": losses})
