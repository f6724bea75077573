"""GRPO's pure functions (advantages, policy loss, aggregation, KL estimators, overlong
penalty) against hand-computed values."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from rl_helpers import update_loss

from sftrl_jax.rl.algorithms import compute_advantages, kl_penalty, overlong_penalty

EPS = 1e-6


def test_advantages_with_and_without_std_normalisation():
    rewards = [1, 0, 1, 1, 0, 0, 0, 0]  # second group all equal
    # group 1: mean 0.75, unbiased std sqrt((3 * 0.25^2 + 0.75^2) / 3) = 0.5
    expected = np.array([0.25, -0.75, 0.25, 0.25]) / (0.5 + EPS)
    np.testing.assert_allclose(compute_advantages(rewards, 4), np.r_[expected, 0, 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(compute_advantages(rewards, 4, norm_by_std=False),
                               [0.25, -0.75, 0.25, 0.25, 0, 0, 0, 0], rtol=1e-6)
    # a group of one: mean 0, std 1
    np.testing.assert_allclose(compute_advantages([3.0, -2.0], 1), np.array([3.0, -2.0]) / (1 + EPS), rtol=1e-6)
    with pytest.raises(ValueError, match="not groups of 3"):
        compute_advantages([1, 2, 3, 4], 3)


# Four tokens in one row: (advantage, ratio) chosen to hit each branch of the PPO-clip loss.
CASES = [  # A, ratio, loss with eps 0.2/0.2, c = 3, clipped?, dual-clipped?
    (1.0, 1.5, -1.2, True, False),   # ratio above 1 + eps: clipped
    (1.0, 0.5, -0.5, False, False),  # A > 0, ratio below 1 - eps: the unclipped term is larger
    (-1.0, 5.0, 3.0, False, True),   # A < 0, ratio huge: dual clip caps the loss at -A * c = 3
    (-1.0, 0.5, 0.8, True, False),   # A < 0, ratio below 1 - eps: clipped
]


def _tokens(cases):
    advantages = jnp.asarray([[c[0] for c in cases]])
    old = jnp.zeros((1, len(cases)))
    logp = jnp.log(jnp.asarray([[c[1] for c in cases]]))
    return logp, old, advantages


def test_grpo_loss_branches_by_hand():
    logp, old, advantages = _tokens(CASES)
    mask = jnp.ones((1, 4))
    loss, metrics = update_loss("grpo", logp, old, advantages, mask)
    assert float(loss) == pytest.approx(np.mean([c[2] for c in CASES]), rel=1e-5)
    assert float(metrics["clipfrac"]) == pytest.approx(0.5)
    assert float(metrics["clipfrac_lower"]) == pytest.approx(0.25)
    assert float(metrics["ppo_kl"]) == pytest.approx(-np.mean(np.log([1.5, 0.5, 5.0, 0.5])), rel=1e-5)
    # clip-higher: the upper bound moves to 1.28, the first token's loss to -1.28
    loss_high, _ = update_loss("grpo", logp, old, advantages, mask, clip_high=0.28)
    assert float(loss_high) == pytest.approx((-1.28 - 0.5 + 3.0 + 0.8) / 4, rel=1e-5)
    # per-sequence advantages broadcast over tokens
    row_adv = jnp.asarray([1.0])
    loss_row, _ = update_loss("grpo", jnp.log(jnp.asarray([[1.5, 0.5]])), jnp.zeros((1, 2)), row_adv,
                              jnp.ones((1, 2)))
    assert float(loss_row) == pytest.approx((-1.2 - 0.5) / 2, rel=1e-5)


def test_aggregation_modes_by_hand():
    # token losses via A = -1, ratio = 1 (loss = 1 per token) scaled by per-token advantages
    per_token = np.array([[1.0, 2.0, 5.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    mask = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], np.float32)  # third row fully masked
    logp = old = jnp.zeros((3, 3))
    advantages = -jnp.asarray(per_token)  # loss = -A * ratio = per_token

    def loss(mode, **kw):
        return float(update_loss("grpo", logp, old, advantages, mask, agg_mode=mode, **kw)[0])

    assert loss("token-mean") == pytest.approx((1 + 2 + 4) / 3)
    assert loss("seq-mean-token-mean") == pytest.approx(((1 + 2) / 2 + 4) / 2)  # masked row not counted
    assert loss("seq-mean-token-sum") == pytest.approx(((1 + 2) + 4) / 2)
    assert loss("seq-mean-token-sum-norm") == pytest.approx((1 + 2 + 4) / 3)  # / padded length 3
    assert loss("seq-mean-token-sum-norm", loss_scale_factor=10.0) == pytest.approx(7 / 10)
    with pytest.raises(ValueError, match="unknown loss aggregation mode"):
        loss("sum")
    empty, metrics = update_loss("grpo", logp, old, advantages, jnp.zeros((3, 3)))
    assert float(empty) == 0.0 and all(math.isfinite(float(v)) for v in metrics.values())


def test_kl_estimators_by_hand():
    logp, ref = jnp.asarray([-1.0]), jnp.asarray([-2.0])
    assert float(kl_penalty(logp, ref, "k1")[0]) == pytest.approx(1.0)
    assert float(kl_penalty(logp, ref, "k2")[0]) == pytest.approx(0.5)
    assert float(kl_penalty(logp, ref, "k3")[0]) == pytest.approx(math.exp(-1.0))  # e^-1 + 1 - 1
    assert float(kl_penalty(logp, ref, "low_var_kl")[0]) == pytest.approx(math.exp(-1.0))
    # clamps: the log-ratio to +-20, the k3 value to 10
    assert float(kl_penalty(jnp.asarray([-100.0]), jnp.asarray([0.0]), "k3")[0]) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(logp, ref, "k4")


def test_overlong_penalty_by_hand():
    np.testing.assert_allclose(overlong_penalty([10, 16, 18, 20, 25], 20, 4, 1.0), [0, 0, -0.5, -1.0, -1.0])
    np.testing.assert_allclose(overlong_penalty([20], 20, 0, 1.0), [0.0])
