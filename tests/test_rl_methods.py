"""RL methods as registered objects: GSPO and CISPO by hand, defaults, the registry, truncated IS."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rl_helpers import update_loss

from sftrl_jax.config import ConfigError, load_config
from sftrl_jax.rl import METHODS, RLConfig, cispo_token_losses, gspo_token_losses
from sftrl_jax.rl.config import RLSection
from sftrl_jax.rl.methods import Objective, PolicyMethod, get_method, register
from sftrl_jax.rl.trainer import truncated_is_weights


# ------------------------------------------------------------------------------------------ GSPO
def test_gspo_sequence_ratio_clip_and_gradient_by_hand():
    # sequence 0: token log-ratios 0.1, 0.3 -> s = exp(0.2) = 1.2214 > 1.2, A = +1: clipped, loss -1.2, no gradient
    # sequence 1: log-ratios -0.1, 0.05 and a padded token -> s = exp(-0.025), A = -1: unclipped, loss s
    old = jnp.zeros((2, 3))
    logp = jnp.asarray([[0.1, 0.3, 0.0], [-0.1, 0.05, 5.0]])
    mask = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    adv = jnp.asarray([1.0, -1.0])
    s1 = math.exp(-0.025)
    losses = gspo_token_losses(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    np.testing.assert_allclose(np.asarray(losses)[:, :2], [[-1.2, -1.2], [s1, s1]], rtol=1e-6)
    loss, metrics = update_loss("gspo", logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert float(loss) == pytest.approx((-1.2 + s1) / 2, rel=1e-6)  # seq-mean-token-mean (GSPO's default)
    assert float(metrics["clipfrac"]) == pytest.approx(0.5)
    grad = jax.grad(lambda lp: update_loss("gspo", lp, old, adv, mask, clip_low=0.2, clip_high=0.2)[0])(logp)
    # d/dlogp_t of (1/2 sequences) (1/2 tokens) sum_t -A s_1 = s_1 / 4 for sequence 1's tokens, 0 elsewhere
    np.testing.assert_allclose(np.asarray(grad), [[0, 0, 0], [s1 / 4, s1 / 4, 0]], atol=1e-7, rtol=1e-6)


def _gspo_sequence_objective(logp, old, adv, mask, clip_low, clip_high):
    """GSPO's objective written per sequence: mean_i max(-A_i s_i, -A_i clip(s_i))."""
    s = jnp.exp(jnp.sum((logp - old) * mask, -1) / jnp.sum(mask, -1))
    return jnp.mean(jnp.maximum(-adv * s, -adv * jnp.clip(s, 1 - clip_low, 1 + clip_high)))


@pytest.mark.parametrize("clip", [(3e-4, 4e-4), (0.05, 0.05)])
def test_gspo_token_losses_have_the_sequence_objectives_value_and_gradient(clip):
    rng = np.random.default_rng(0)
    logp = jnp.asarray(rng.normal(-1.0, 0.5, (6, 7)), jnp.float32)
    old = logp + jnp.asarray(rng.normal(0, 0.05, (6, 7)), jnp.float32)
    mask = jnp.asarray((np.arange(7)[None] < np.array([7, 3, 5, 1, 6, 4])[:, None]).astype(np.float32))
    adv = jnp.asarray([1.0, -0.5, 2.0, -1.5, 0.3, -0.7])
    expected = _gspo_sequence_objective(logp, old, adv, mask, *clip)
    ours = update_loss("gspo", logp, old, adv, mask, clip_low=clip[0], clip_high=clip[1])[0]
    assert float(ours) == pytest.approx(float(expected), rel=1e-5)
    g_ours = jax.grad(lambda lp: update_loss("gspo", lp, old, adv, mask, clip_low=clip[0], clip_high=clip[1])[0])(logp)
    g_ref = jax.grad(lambda lp: _gspo_sequence_objective(lp, old, adv, mask, *clip))(logp)
    np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_ref), atol=1e-7, rtol=1e-5)
    assert np.abs(np.asarray(g_ref)).max() > 0


# ------------------------------------------------------------------------------------------ CISPO
def test_cispo_clipped_weight_is_held_constant_by_hand():
    # ratios 1.5, 0.5, 1.0 with clip_low 1.0 (no lower bound), clip_high 0.28: weights 1.28, 0.5, 1.0
    logp = jnp.log(jnp.asarray([[1.5, 0.5, 1.0]]))
    old = jnp.zeros((1, 3))
    adv = jnp.asarray([[1.0, -1.0, 2.0]])
    weights = np.array([1.28, 0.5, 1.0])
    losses = cispo_token_losses(logp, old, adv, clip_low=1.0, clip_high=0.28)
    np.testing.assert_allclose(np.asarray(losses)[0], -weights * np.array([1, -1, 2]) * np.log([1.5, 0.5, 1.0]),
                               rtol=1e-6, atol=1e-7)
    grad = jax.grad(lambda lp: jnp.sum(cispo_token_losses(lp, old, adv, clip_low=1.0, clip_high=0.28)))(logp)
    np.testing.assert_allclose(np.asarray(grad)[0], -weights * np.array([1, -1, 2]), rtol=1e-6)
    # a clipped token keeps its gradient (PPO would drop it); per-row advantages broadcast
    row = jax.grad(lambda lp: jnp.sum(cispo_token_losses(lp, old, jnp.asarray([1.0]), clip_low=0.2,
                                                         clip_high=0.2)))(logp)
    np.testing.assert_allclose(np.asarray(row)[0], [-1.2, -0.8, -1.0], rtol=1e-6)
    loss, metrics = update_loss("cispo", logp, old, adv, jnp.ones((1, 3)))  # token-mean, its defaults
    assert float(loss) == pytest.approx(float(jnp.mean(losses)), rel=1e-6)
    assert float(metrics["clipfrac"]) == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------------ defaults
def test_each_method_brings_its_own_defaults_and_a_set_value_wins():
    assert (RLSection(method="gspo").clip_low, RLSection(method="gspo").clip_high) == (3e-4, 4e-4)
    assert RLSection(method="gspo").agg_mode == "seq-mean-token-mean"
    assert (RLSection(method="cispo").clip_low, RLSection(method="cispo").clip_high) == (1.0, 0.28)
    assert (RLSection().clip_low, RLSection().clip_high, RLSection().clip_c) == (0.2, 0.2, 3.0)
    assert RLSection(method="gspo", clip_high=1e-3).clip_high == 1e-3


@pytest.mark.parametrize("overrides", [[], ["rl.prompts_per_step=3"]])
def test_method_defaults_reach_a_loaded_config(overrides):
    # a partial rl: section must not freeze GRPO's resolved defaults into settings
    config = load_config(RLConfig, overrides=["model.path=x", "rl.method=luffy", "rl.loss_scale_factor=64",
                                              "rl.verl_ranks=8", *overrides])
    assert (config.rl.norm_adv_by_std, config.rl.agg_mode, config.rl.entropy_coef) == \
        (False, "seq-mean-token-sum-norm", 0.001)
    assert load_config(RLConfig, overrides=["model.path=x", "rl.method=gspo"]).rl.clip_low == 3e-4


def test_unknown_method_and_tis_without_recompute_are_config_errors():
    with pytest.raises(ConfigError, match="rl.method.*'ppo'.*chord, cispo, grpo, gspo, luffy"):
        load_config(RLConfig, overrides=["model.path=x", "rl.method=ppo"])
    with pytest.raises(ConfigError, match="rl.tis_cap.*recompute"):
        load_config(RLConfig, overrides=["model.path=x", "rl.tis_cap=2", "rl.old_logprobs=sampler"])


# ------------------------------------------------------------------------------------------ registry
def test_a_new_method_is_one_registered_class():
    @register
    class Toy(PolicyMethod):
        name = "toy_reinforce"
        defaults = {"clip_high": 0.5}

        def objective(self, logp, batch, cfg):
            return Objective(policy=-batch["advantages"][:, None] * logp, stats={})

    try:
        assert RLSection(method="toy_reinforce").clip_high == 0.5
        loss, _ = update_loss("toy_reinforce", jnp.log(jnp.asarray([[0.5, 0.25]])), jnp.zeros((1, 2)),
                              jnp.asarray([2.0]), jnp.ones((1, 2)))
        assert float(loss) == pytest.approx(-2.0 * (math.log(0.5) + math.log(0.25)) / 2, rel=1e-6)
    finally:
        del METHODS["toy_reinforce"]


def test_registration_refuses_defaults_for_settings_a_method_cannot_set():
    with pytest.raises(TypeError, match="ppo_epochs"):
        @register
        class Bad(PolicyMethod):
            name = "bad"
            defaults = {"ppo_epochs": 2}  # not null-defaulted: the loader could not tell a set value from it
    assert "bad" not in METHODS
    with pytest.raises(ValueError, match="unknown RL method 'nope'"):
        get_method("nope")


# ------------------------------------------------------------------------------------------ TIS
def test_truncated_importance_weights_by_hand():
    old = np.log(np.array([[0.5, 0.9, 0.2, 0.3]], np.float32))
    sampler = np.log(np.array([[0.25, 0.9, 0.8, 0.1]], np.float32))
    sampled = np.array([[True, True, True, False]])  # the last token: a demonstration's (weight 1)
    weights, metrics = truncated_is_weights(old, sampler, sampled, cap=1.5)
    np.testing.assert_allclose(weights, [[1.5, 1.0, 0.25, 1.0]], rtol=1e-6)  # ratios 2 (capped), 1, 0.25
    assert metrics["tis_capped_share"] == pytest.approx(1 / 3)
    assert metrics["tis_weight_mean"] == pytest.approx((1.5 + 1.0 + 0.25) / 3)


def test_tis_weights_scale_the_policy_term_only():
    logp = jnp.log(jnp.asarray([[1.1, 0.9]]))
    old, adv, mask = jnp.zeros((1, 2)), jnp.asarray([1.0]), jnp.ones((1, 2))
    entropy = jnp.asarray([[0.7, 0.4]])
    tis = jnp.asarray([[0.5, 2.0]])
    plain, _ = update_loss("grpo", logp, old, adv, mask, entropy=entropy, entropy_coef=0.1)
    weighted, _ = update_loss("grpo", logp, old, adv, mask, entropy=entropy, entropy_coef=0.1,
                              batch_extra={"tis_weight": tis})
    # per-token PPO losses -1.1 and -0.9 (inside the clip), entropy bonus 0.1 * (0.7 + 0.4) unweighted
    assert float(plain) == pytest.approx((-1.1 - 0.9) / 2 - 0.1 * 1.1 / 2, rel=1e-5)
    assert float(weighted) == pytest.approx((-1.1 * 0.5 - 0.9 * 2.0) / 2 - 0.1 * 1.1 / 2, rel=1e-5)


# ------------------------------------------------------------------------------------------ trainer wiring
def _algorithm(*overrides):
    """An RLAlgorithm with its config and method set and the log-prob function replaced by a fixed one."""
    from sftrl_jax.rl import RLAlgorithm

    config = load_config(RLConfig, overrides=["model.path=x", "rl.prompts_per_step=1", "sampling.n=2",
                                              "sampling.max_new_tokens=16", *overrides])
    algorithm = RLAlgorithm()
    algorithm.config, algorithm.method = config, get_method(config.rl.method)
    algorithm.pad_id, algorithm.ref_params = 0, None
    algorithm._on_devices = lambda arrays: arrays
    algorithm.recomputed = np.log(np.full((2, 16), 0.5, np.float32))
    algorithm.logprobs_of = lambda params, laid: algorithm.recomputed
    return algorithm


def _two_rollouts():
    from sftrl_jax.rl import Rollouts

    sampler = [[math.log(0.25)] * 3, [math.log(0.5)] * 2]
    return Rollouts(prompts=[[5, 6], [5, 6]], responses=[[1, 2, 3], [4, 5]], sampler_logprobs=sampler,
                    truncated=[True, False], correctness=[1.0, 0.0], rewards=[1.0, 0.0])


@pytest.mark.parametrize("mask_truncated", [False, True])
def test_the_trainer_applies_mask_truncated(mask_truncated):
    algorithm = _algorithm(f"rl.mask_truncated={str(mask_truncated).lower()}")
    arrays, _ = algorithm._update_arrays({"params": None}, _two_rollouts())
    assert arrays["response_mask"][0].sum() == (0 if mask_truncated else 3)  # the truncated response
    assert arrays["response_mask"][1].sum() == 2


def test_the_trainer_takes_old_logprobs_from_the_sampler_or_recomputes_them():
    sampler = np.zeros((2, 16), np.float32)
    sampler[0, :3], sampler[1, :2] = math.log(0.25), math.log(0.5)
    arrays, metrics = _algorithm("rl.old_logprobs=sampler")._update_arrays({"params": None}, _two_rollouts())
    np.testing.assert_array_equal(arrays["old_logp"], sampler)
    assert metrics["logprob_mismatch_abs"] == pytest.approx(3 / 5 * math.log(2), rel=1e-6)
    algorithm = _algorithm()
    arrays, _ = algorithm._update_arrays({"params": None}, _two_rollouts())
    np.testing.assert_array_equal(arrays["old_logp"], algorithm.recomputed)
    assert "tis_weight" not in arrays


def test_the_trainer_adds_truncated_importance_weights():
    algorithm = _algorithm("rl.tis_cap=1.5")
    arrays, metrics = algorithm._update_arrays({"params": None}, _two_rollouts())
    # old 0.5 vs sampler 0.25 -> ratio 2, capped at 1.5 (3 tokens); 0.5 vs 0.5 -> 1 (2 tokens); padding 1
    np.testing.assert_allclose(arrays["tis_weight"][0, :4], [1.5, 1.5, 1.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(arrays["tis_weight"][1, :3], [1.0, 1.0, 1.0], rtol=1e-6)
    assert metrics["tis_capped_share"] == pytest.approx(3 / 5)
