"""The pure functions RL methods share (verl semantics): group-relative advantages, the PPO-clip
per-token loss, KL estimators, DAPO's overlong penalty.

Each is unit-tested against hand-computed values without a model. The methods
(:mod:`sftrl_jax.rl.methods`) build their per-token losses from them; the update
(:mod:`sftrl_jax.rl.step`) adds KL and entropy and aggregates through
:func:`sftrl_jax.losses.agg_weights`, the function SFT uses, so a mini-batch's loss is exactly
accumulated over micro-batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")


def compute_advantages(rewards, group_size: int, *, norm_by_std: bool = True, eps: float = 1e-6) -> jax.Array:
    """Group-relative advantages for rewards laid out as consecutive groups of ``group_size``.

    ``A = (r - mean_g) / (std_g + eps)`` with the unbiased std, or ``r - mean_g`` without std
    normalisation (Dr.GRPO). A group of one has mean 0 and std 1 (verl).
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"compute_advantages: {rewards.shape[0]} rewards are not groups of {group_size}")
    groups = rewards.reshape(-1, group_size)
    if group_size == 1:
        mean, std = jnp.zeros_like(groups), jnp.ones_like(groups)
    else:
        mean = jnp.mean(groups, axis=1, keepdims=True)
        std = jnp.std(groups, axis=1, keepdims=True, ddof=1)
    advantages = (groups - mean) / (std + eps) if norm_by_std else groups - mean
    return advantages.reshape(-1)


def ppo_token_losses(logp, old_logp, advantages, *, clip_low: float = 0.2, clip_high: float = 0.2,
                     clip_c: float = 3.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token PPO-clip loss with clip-higher and dual clip, and per-token clip indicators."""
    if advantages.ndim == logp.ndim - 1:
        advantages = advantages[..., None]
    log_ratio = jnp.clip(logp - old_logp, -20.0, 20.0)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clip_loss = jnp.maximum(unclipped, clipped)
    dual = -advantages * clip_c
    losses = jnp.where(advantages < 0, jnp.minimum(clip_loss, dual), clip_loss)
    indicators = {
        "clipfrac": (clipped > unclipped).astype(jnp.float32),
        "clipfrac_lower": ((clip_loss > dual) & (advantages < 0)).astype(jnp.float32),
        "ppo_kl": -log_ratio,  # old - new: verl's approximate KL between old and current policy
    }
    return losses, indicators


def kl_penalty(logp, ref_logp, estimator: str = "k3") -> jax.Array:
    """Per-token KL estimate between the policy and the reference (k1, k2, k3 = low_var_kl)."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * jnp.square(logp - ref_logp)
    if estimator in ("k3", "low_var_kl"):
        kl = jnp.clip(ref_logp - logp, -20.0, 20.0)
        return jnp.clip(jnp.exp(kl) - kl - 1.0, -10.0, 10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


def overlong_penalty(lengths, max_new_tokens: int, buffer_len: int, factor: float) -> jax.Array:
    """DAPO's soft overlong punishment: 0 up to ``max - buffer`` tokens, then linearly down to ``-factor``."""
    lengths = jnp.asarray(lengths, jnp.float32)
    if buffer_len <= 0:
        return jnp.zeros_like(lengths)
    excess = lengths - (max_new_tokens - buffer_len)
    return -jnp.clip(excess / buffer_len, 0.0, 1.0) * factor
