"""The RL update's loss on hand-made arrays, through the functions the update itself calls."""

import jax.numpy as jnp

from sftrl_jax.rl.config import RLSection
from sftrl_jax.rl.methods import get_method
from sftrl_jax.rl.step import aggregation_weights, method_loss


def update_loss(method: str, logp, old, advantages, mask, off=None, *, entropy=None, batch_extra=None, **settings):
    """``(loss, metrics)`` of ``method`` (``rl.<setting>=value`` from ``settings``) on one mini-batch, as
    :func:`sftrl_jax.rl.step.make_policy_update` differentiates it."""
    cfg = RLSection(method=method, **settings)
    m = get_method(method)
    mask = jnp.asarray(mask, jnp.float32)
    off = jnp.zeros_like(mask) if off is None else jnp.asarray(off, jnp.float32)
    batch = {"old_logp": jnp.asarray(old), "advantages": jnp.asarray(advantages), "response_mask": mask,
             "response_off_policy": off, **(batch_extra or {})}
    weights, demonstration_weights, token_mean = aggregation_weights(m, mask, off, cfg.agg_mode, cfg.loss_scale_factor)
    return method_loss(m, jnp.asarray(logp), batch, cfg, weights=weights, demonstration_weights=demonstration_weights,
                       token_mean=token_mean, entropy=entropy)
