"""CHORD: ``(1 - mu)`` x GRPO's PPO-clip loss on the sampled rows ``+ mu`` x an SFT loss on expert rows, ``mu``
on a warm-up / cosine-decay schedule; settings and defaults are Trinity-RFT's (``rl.mu_*``,
``rl.enable_phi_function``, ``rl.expert_data_ratio``).

Where the expert rows come from (``rl.expert_source``): ``expert_data`` (Trinity-RFT's, the default) mixes
``ceil(rl.expert_data_ratio x rl.prompts_per_step x sampling.n)`` rows of the SFT data set ``rl.expert_data``
into each step's batch, outside the groups (:mod:`sftrl_jax.rl.expert_data`); the rest of the batch is whole
groups of ``sampling.n`` samples. ``group``: each group is ``sampling.n - 1`` samples and the prompt's own
demonstration. Either way the expert rows are ``response_off_policy`` rows, trained only by the SFT term (a
token mean over their tokens); the GRPO term is ``rl.agg_mode`` over the sampled rows' tokens.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ...config import ConfigError
from ..algorithms import compute_advantages, ppo_token_losses
from .base import Objective, PolicyMethod, per_row, register


def chord_sft_token_losses(logp, *, phi: bool = True) -> jax.Array:
    """CHORD's per-token SFT loss on expert tokens. ``phi`` (CHORD-phi, ``rl.enable_phi_function``):
    ``-phi * logp`` with ``phi = stopgrad(p (1 - p))``, ``p = exp(logp)``, so tokens the policy already finds
    certain (p near 1) or foreign (p near 0) count little; otherwise (CHORD-mu) the plain SFT loss ``-logp``."""
    if not phi:
        return -logp
    p = jnp.exp(logp)
    return -jax.lax.stop_gradient(p * (1.0 - p)) * logp


def chord_mu(global_step: int, *, warmup_steps: int = 0, decay_steps: int = 0, peak: float = 0.1,
             valley: float = 0.1) -> float:
    """CHORD's weight of the SFT term at training step ``global_step`` (counted from 1, as Trinity-RFT's
    trainer counts the step it is about to take): ``peak * global_step / warmup_steps`` during the warm-up,
    then a cosine from ``peak`` down to ``valley`` over ``decay_steps`` steps, then ``valley`` for good
    (with ``decay_steps = 0``: ``valley`` straight after the warm-up)."""
    if global_step < warmup_steps:
        return peak * global_step / warmup_steps
    if global_step >= warmup_steps + decay_steps:
        return valley
    progress = (global_step - warmup_steps) / decay_steps
    return valley + (peak - valley) * 0.5 * (1.0 + math.cos(math.pi * progress))


@register
class CHORD(PolicyMethod):
    name = "chord"
    # Trinity-RFT's defaults (its MIXCHORDPolicyLossFn and MixSampleStrategy): CHORD-phi with a constant mu 0.1,
    # half of each batch expert rows
    defaults = {"expert_source": "expert_data", "expert_data_ratio": 0.5, "mu_warmup_steps": 0,
                "mu_decay_steps": 0, "mu_peak": 0.1, "mu_valley": 0.1, "enable_phi_function": True}
    demonstrations = "separate"
    row_inputs = ("chord_mu",)

    def validate(self, cfg) -> None:
        if cfg.expert_source == "expert_data" and not cfg.expert_data:
            raise ConfigError(
                "config key 'rl.expert_data': rl.method=chord with rl.expert_source=expert_data (the default, "
                "Trinity-RFT's) mixes rows of an SFT data set into every step: set rl.expert_data=[FILES] (rows "
                "with a prompt and a target or response), or rl.expert_source=group to put each prompt's own "
                "demonstration in its group")

    def advantages(self, rewards, off_policy, group_size, cfg) -> np.ndarray:
        """Group-relative over the sampled rows only (whole groups: ``group_size - 1`` of each group with
        ``rl.expert_source=group``, ``group_size`` with expert rows outside the groups); expert rows get 0: the
        SFT term learns them."""
        rewards = np.asarray(rewards, np.float32)
        off = np.asarray(off_policy, bool) if len(off_policy) else np.zeros(len(rewards), bool)
        sampled_per_group = group_size - 1 if cfg.expert_source == "group" else group_size
        out = np.zeros(len(rewards), np.float32)
        out[~off] = np.asarray(compute_advantages(rewards[~off], sampled_per_group, norm_by_std=cfg.norm_adv_by_std))
        return out

    def step_inputs(self, cfg, step, total_steps, rows):
        mu = chord_mu(step + 1, warmup_steps=cfg.mu_warmup_steps, decay_steps=cfg.mu_decay_steps, peak=cfg.mu_peak,
                      valley=cfg.mu_valley)
        return {"chord_mu": np.full(rows, mu, np.float32)}

    def objective(self, logp, batch, cfg) -> Objective:
        off = batch["response_off_policy"]
        pg, indicators = ppo_token_losses(logp, batch["old_logp"], batch["advantages"], clip_low=cfg.clip_low,
                                          clip_high=cfg.clip_high, clip_c=cfg.clip_c)
        sft = chord_sft_token_losses(logp, phi=cfg.enable_phi_function)
        mu = per_row(batch["chord_mu"], logp.ndim)
        stats = dict(indicators, pg_loss=pg * (1.0 - off), sft_loss=sft * off, mu=jnp.broadcast_to(mu, logp.shape))
        return Objective(policy=pg, stats=stats, policy_scale=1.0 - mu, demonstration=sft, demonstration_scale=mu)
