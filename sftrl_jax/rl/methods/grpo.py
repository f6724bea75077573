"""GRPO (verl semantics): group-relative advantages and the PPO-clip loss with clip-higher and dual clip.

Dr.GRPO (``rl.norm_adv_by_std: false``, ``rl.agg_mode: seq-mean-token-sum-norm``) and DAPO (clip-higher
``rl.clip_high: 0.28``, token-mean, dynamic sampling, overlong shaping) are settings of this method.
"""

from __future__ import annotations

from ..algorithms import ppo_token_losses
from .base import Objective, PolicyMethod, register


@register
class GRPO(PolicyMethod):
    name = "grpo"

    def objective(self, logp, batch, cfg) -> Objective:
        losses, indicators = ppo_token_losses(logp, batch["old_logp"], batch["advantages"], clip_low=cfg.clip_low,
                                              clip_high=cfg.clip_high, clip_c=cfg.clip_c)
        return Objective(policy=losses, stats=dict(indicators, pg_loss=losses))
