"""CHORD-phi: ``(1 - mu)`` x GRPO's PPO-clip loss on the sampled tokens ``+ mu`` x a weighted SFT loss on
the demonstration tokens, ``mu`` on a warm-up / cosine schedule (``rl.chord_mu_*``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..algorithms import compute_advantages, ppo_token_losses
from .base import Objective, PolicyMethod, per_row, register


def chord_sft_token_losses(logp) -> jax.Array:
    """CHORD-phi's per-token SFT loss on expert tokens: ``-phi * logp`` with ``phi = stopgrad(p (1 - p))``,
    ``p = exp(logp)``: tokens the policy already finds certain (p near 1) or foreign (p near 0) count little."""
    p = jnp.exp(logp)
    return -jax.lax.stop_gradient(p * (1.0 - p)) * logp


def chord_mu(step, total_steps: int, *, peak: float = 0.1, valley: float = 0.1, warmup_steps: int = 0):
    """CHORD's global SFT weight at ``step``: linear warm-up 0 -> ``peak`` over ``warmup_steps``, then cosine
    decay from ``peak`` to ``valley`` over the remaining steps (constant when ``peak == valley``)."""
    step = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum(step / max(warmup_steps, 1), 1.0) if warmup_steps > 0 else jnp.float32(peak)
    progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
    decayed = valley + 0.5 * (peak - valley) * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup_steps, warm, decayed)


@register
class CHORD(PolicyMethod):
    name = "chord"
    demonstrations = "separate"
    row_inputs = ("chord_mu",)

    def advantages(self, rewards, off_policy, group_size, cfg) -> np.ndarray:
        """Group-relative over each group's sampled members only; the demonstration (last) gets 0: the SFT
        term learns it."""
        groups = np.asarray(rewards, np.float32).reshape(-1, group_size)
        sampled = np.asarray(compute_advantages(groups[:, :-1].reshape(-1), group_size - 1,
                                                norm_by_std=cfg.norm_adv_by_std))
        return np.concatenate([sampled.reshape(-1, group_size - 1), np.zeros((len(groups), 1), np.float32)],
                              axis=1).ravel()

    def step_inputs(self, cfg, step, total_steps, rows):
        mu = chord_mu(step, total_steps, peak=cfg.chord_mu_peak, valley=cfg.chord_mu_valley,
                      warmup_steps=cfg.chord_mu_warmup_steps)
        return {"chord_mu": np.full(rows, float(mu), np.float32)}

    def objective(self, logp, batch, cfg) -> Objective:
        off = batch["response_off_policy"]
        pg, indicators = ppo_token_losses(logp, batch["old_logp"], batch["advantages"], clip_low=cfg.clip_low,
                                          clip_high=cfg.clip_high, clip_c=cfg.clip_c)
        sft = chord_sft_token_losses(logp)
        mu = per_row(batch["chord_mu"], logp.ndim)
        return Objective(policy=pg, stats=dict(indicators, pg_loss=pg * (1.0 - off), sft_loss=sft * off),
                         policy_scale=1.0 - mu, demonstration=sft, demonstration_scale=mu)
