"""GRPO's pure functions (verl semantics, BRIEF §5): advantages, the PPO-clip policy loss, KL.

The entropy (bonus and metric) is :func:`sftrl_jax.losses.entropy_from_logits`, computed with the
log-probs in chunks (:func:`sftrl_jax.losses.chunked_logprobs`).

All of them are unit-tested against hand-computed values without a model; the trainer only wires
them together. Loss aggregation goes through :func:`sftrl_jax.losses.agg_weights`, the same
function SFT uses, so the GRPO loss of a mini-batch is exactly accumulated over micro-batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..losses import agg_weights

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


def policy_loss(logp, old_logp, advantages, mask, *, clip_low: float = 0.2, clip_high: float = 0.2,
                clip_c: float = 3.0, agg_mode: str = "token-mean", loss_scale_factor: float | None = None,
                weights=None, token_mean=None, entropy=None, entropy_coef: float = 0.0, ref_logp=None,
                kl_coef: float = 0.0, kl_estimator: str = "k3") -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO's aggregated loss over the given batch and its metrics: the PPO-clip term, plus
    ``kl_coef`` x KL to the reference (when ``ref_logp`` is given) minus ``entropy_coef`` x entropy
    (when ``entropy`` is given). This is the loss the GRPO step differentiates.

    ``logp``, ``old_logp``, ``mask`` (and ``entropy``, ``ref_logp``): ``[batch, seq]``;
    ``advantages``: ``[batch]`` or ``[batch, seq]``. ``weights`` and ``token_mean`` (from
    ``agg_weights`` over a larger batch) replace the aggregation and the metric weights when given:
    that is how a micro-batch contributes its exact share of a mini-batch's loss and metrics.
    Metrics: token means of ``pg_loss``, ``clipfrac``, ``clipfrac_lower``, ``ppo_kl`` and, when
    given, ``entropy`` and ``kl_ref``.
    """
    losses, indicators = ppo_token_losses(logp, old_logp, advantages, clip_low=clip_low, clip_high=clip_high,
                                          clip_c=clip_c)
    per_token, stats = losses, dict(indicators, pg_loss=losses)
    if ref_logp is not None and kl_coef > 0:
        stats["kl_ref"] = kl_penalty(logp, ref_logp, kl_estimator)
        per_token = per_token + kl_coef * stats["kl_ref"]
    if entropy is not None:
        stats["entropy"] = entropy
        if entropy_coef > 0:
            per_token = per_token - entropy_coef * entropy
    if weights is None:
        weights = agg_weights(mask, agg_mode, loss_scale_factor=loss_scale_factor)
    if token_mean is None:
        token_mean = agg_weights(mask, "token-mean")
    metrics = {name: jnp.sum(token_mean * value) for name, value in stats.items()}
    return jnp.sum(weights * per_token), metrics


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


# ------------------------------------------------------------------ mixed-policy methods (issue 20)
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


def mixed_policy_loss(method: str, logp, old_logp, advantages, mask, off_policy_mask, *, weights, token_mean,
                      off_weights=None, entropy=None, entropy_coef: float = 0.0, mu=0.0, shaping_gamma: float = 0.1,
                      clip_low: float = 0.2, clip_high: float = 0.2, clip_c: float = 3.0,
                      clip_on_policy: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The aggregated loss of a mixed-policy method over a batch holding on-policy and demonstration rows.

    ``luffy``: :func:`luffy_token_losses` on every token, aggregated with ``weights`` (the rows' share of
    the mini-batch aggregation), minus ``entropy_coef`` x entropy. ``chord``: ``(1 - mu)`` x the GRPO
    PPO-clip loss on on-policy tokens (``weights`` over on-policy tokens only) ``+ mu`` x
    :func:`chord_sft_token_losses` on demonstration tokens (``off_weights``, a token mean over them).
    Metrics are token means (``token_mean``) of the terms. ``mu``: a scalar or one value per row.
    """
    off = off_policy_mask.astype(jnp.float32)
    stats = {}
    if method == "luffy":
        per_token = luffy_token_losses(logp, old_logp, advantages, off, shaping_gamma=shaping_gamma,
                                       clip_low=clip_low, clip_high=clip_high, clip_on_policy=clip_on_policy)
        stats["pg_loss"] = per_token
        loss_weights = weights
    elif method == "chord":
        mu = jnp.reshape(mu, jnp.shape(mu) + (1,) * (logp.ndim - jnp.ndim(mu)))  # per row [B] or a scalar
        pg, indicators = ppo_token_losses(logp, old_logp, advantages, clip_low=clip_low, clip_high=clip_high,
                                          clip_c=clip_c)
        sft = chord_sft_token_losses(logp)
        per_token = (1.0 - mu) * weights * pg + mu * off_weights * sft
        stats.update(indicators, pg_loss=pg * (1.0 - off), sft_loss=sft * off)
        loss_weights = jnp.ones_like(per_token)
    else:
        raise ValueError(f"unknown mixed-policy method {method!r}; choose luffy or chord")
    if entropy is not None:
        stats["entropy"] = entropy
        if entropy_coef > 0:
            per_token = per_token - entropy_coef * entropy * (weights if method == "chord" else 1.0)
    stats["off_policy_share"] = off
    metrics = {name: jnp.sum(token_mean * value) for name, value in stats.items()}
    return jnp.sum(loss_weights * per_token), metrics
