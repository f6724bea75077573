"""LUFFY and CHORD: the per-token losses by hand, their gradients, the mu schedule, the
aggregation, and the methods end to end in the RL trainer."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rl_helpers import update_loss

from sft_fixtures import make_model_dir, write_parquet
from sftrl_jax.config import ConfigError, load_config
from sftrl_jax.rl import RLConfig, chord_mu, chord_sft_token_losses, luffy_token_losses, run_rl
from sftrl_jax.rl.config import RLSection

GAMMA = 0.1


def test_luffy_on_policy_tokens_by_hand_with_and_without_the_clip():
    # ratio 1.5 with A = +1: clipped loss -1.2, unclipped -1.5; ratio 0.5 with A = -1: clip 0.8 -> 0.8, raw 0.5
    logp = jnp.log(jnp.asarray([[1.5, 0.5]]))
    old = jnp.zeros((1, 2))
    adv = jnp.asarray([[1.0, -1.0]])
    off = jnp.zeros((1, 2))
    clipped = luffy_token_losses(logp, old, adv, off)
    raw = luffy_token_losses(logp, old, adv, off, clip_on_policy=False)
    np.testing.assert_allclose(np.asarray(clipped), [[-1.2, 0.8]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(raw), [[-1.5, 0.5]], rtol=1e-6)


def test_luffy_shaped_demonstration_tokens_and_their_gradient_by_hand():
    p = np.array([0.05, 0.3, 0.9])
    adv = np.array([2.0, -1.0, 0.5])
    logp = jnp.log(jnp.asarray(p))[None]
    old = jnp.full((1, 3), -7.0)  # no importance ratio: old log-probs must not matter
    advantages = jnp.asarray(adv)[None]
    off = jnp.ones((1, 3))
    losses = luffy_token_losses(logp, old, advantages, off, shaping_gamma=GAMMA)
    np.testing.assert_allclose(np.asarray(losses)[0], -adv * p / (p + GAMMA), rtol=1e-6)
    grad = jax.grad(lambda lp: jnp.sum(luffy_token_losses(lp, old, advantages, off, shaping_gamma=GAMMA)))(logp)
    np.testing.assert_allclose(np.asarray(grad)[0], -adv * GAMMA * p / (p + GAMMA) ** 2, rtol=1e-5)
    # per-sequence advantages broadcast over tokens, and the mask picks per token
    mixed = luffy_token_losses(logp, old, jnp.asarray([1.0]), jnp.asarray([[1.0, 0.0, 1.0]]), clip_on_policy=False)
    expected = [-p[0] / (p[0] + GAMMA), -p[1] / np.exp(-7.0), -p[2] / (p[2] + GAMMA)]
    np.testing.assert_allclose(np.asarray(mixed)[0], expected, rtol=1e-5)


def test_chord_sft_term_weights_tokens_by_p_times_one_minus_p():
    p = np.array([0.01, 0.5, 0.99])
    logp = jnp.log(jnp.asarray(p))
    np.testing.assert_allclose(np.asarray(chord_sft_token_losses(logp)), -p * (1 - p) * np.log(p), rtol=1e-5)
    grad = jax.grad(lambda lp: jnp.sum(chord_sft_token_losses(lp)))(logp)
    np.testing.assert_allclose(np.asarray(grad), -p * (1 - p), rtol=1e-5)  # phi is held constant


def test_chord_mu_schedule():
    assert float(chord_mu(0, 10)) == pytest.approx(0.1) and float(chord_mu(9, 10)) == pytest.approx(0.1)
    values = [float(chord_mu(s, 12, peak=0.8, valley=0.2, warmup_steps=2)) for s in range(13)]
    assert values[0] == pytest.approx(0.0) and values[1] == pytest.approx(0.4)  # linear warm-up
    assert values[2] == pytest.approx(0.8) and values[12] == pytest.approx(0.2)
    assert values[7] == pytest.approx(0.2 + 0.3 * (1 + math.cos(math.pi * 0.5)))  # cosine, half way
    assert all(a >= b for a, b in zip(values[2:], values[3:]))


def test_chord_loss_mixes_the_two_terms_by_hand():
    # one on-policy row (ratio 1, A = 1: pg = -1 per token) and one demonstration row
    logp = jnp.asarray([[0.0, 0.0], [math.log(0.5), math.log(0.25)]])
    old = jnp.zeros((2, 2))
    adv = jnp.asarray([1.0, 0.0])
    mask = jnp.ones((2, 2))
    off = jnp.asarray([[0.0, 0.0], [1.0, 1.0]])
    loss, metrics = update_loss("chord", logp, old, adv, mask, off, batch_extra={"chord_mu": jnp.full((2,), 0.25)})
    sft = np.mean([-0.5 * 0.5 * math.log(0.5), -0.25 * 0.75 * math.log(0.25)])
    assert float(loss) == pytest.approx(0.75 * -1.0 + 0.25 * sft, rel=1e-5)
    assert float(metrics["off_policy_share"]) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def workdir(hf_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    model_dir = make_model_dir(hf_checkpoint("qwen2_tied"), root / "model")
    rows = [{"data_source": "toy", "prompt": [{"role": "user", "content": f"say {i % 10}"}],
             "reward_model": {"ground_truth": str(i % 10)},
             "target": [{"role": "assistant", "content": f"\\boxed{{{i % 10}}}"}]}
            for i in range(32)]
    data = write_parquet(rows, root / "luffy.parquet")
    return root, model_dir, data


def _config(workdir, out, *overrides):
    root, model_dir, data = workdir
    return load_config(RLConfig, overrides=[
        f"model.path={model_dir}", f"data.files=[{data}]", f"output_dir={root / out}", "rl.prompts_per_step=4",
        "sampling.n=4", "rl.mini_batches_per_step=2", "train.micro_batch_size=1", "sampling.max_new_tokens=16",
        "train.seed=0", "train.max_steps=2", "checkpoint.save_every=0", "logging.progress=false",
        "rl.loss_scale_factor=64", *overrides])


def test_method_defaults_follow_the_recipes():
    luffy, grpo = RLSection(method="luffy", loss_scale_factor=65536.0), RLSection()
    assert (luffy.norm_adv_by_std, luffy.agg_mode, luffy.entropy_coef, luffy.clip_on_policy) == \
        (False, "seq-mean-token-sum-norm", 0.001, False)
    assert (grpo.norm_adv_by_std, grpo.agg_mode, grpo.entropy_coef) == (True, "token-mean", 0.0)
    assert RLSection(method="luffy", entropy_coef=0.0, loss_scale_factor=1.0).entropy_coef == 0.0  # set wins
    with pytest.raises(ConfigError, match=r"^config key 'rl.loss_scale_factor': .*8192 x 8.*65536"):
        RLSection(method="luffy")  # LUFFY's constant depends on its ranks: stated, never guessed
    assert RLSection(method="luffy", agg_mode="token-mean").loss_scale_factor is None  # not used there


@pytest.mark.slow
@pytest.mark.parametrize("method", ["luffy", "chord"])
def test_mixed_policy_methods_train_with_one_demonstration_per_group(workdir, method):
    graded = []

    def reward(texts, truths, token_ids):
        graded.extend(texts)
        return [float("boxed" in t) for t in texts]

    result = run_rl(_config(workdir, method, f"rl.method={method}"), reward_fn=reward)
    steps = [r for r in result.metrics if "pg_loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    # one row in four is the demonstration; it is graded like the samples (and always correct here)
    assert sum(t.startswith("\\boxed{") and t.endswith("}") and len(t) == 9 for t in graded) == 2 * 4
    assert all(r["off_policy_share"] > 0 for r in steps)
    assert all(np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in steps)
    if method == "chord":
        assert all("sft_loss" in r for r in steps)
    config = json.dumps(result.metrics)
    assert "logprob_mismatch_abs" in config


def test_a_prompt_without_a_demonstration_is_refused(workdir, tmp_path):
    rows = [{"prompt": "say 1", "answer": "1"}] * 8
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"8 of 8 prompts have no demonstration"):
        run_rl(_config(workdir, "nodemo", "rl.method=luffy", f"data.files=[{path}]"),
               reward_fn=lambda t, g, i: [0.0] * len(t))


def test_rl_past_the_models_positions_is_refused_before_training(workdir):
    # the tiny checkpoint has 512 positions; a 600-token response budget cannot fit after any prompt
    with pytest.raises(ValueError, match=r"the longest prompt \(\d+ tokens\) \+ sampling.max_new_tokens \(\d+\) "
                                         r"exceeds the model's max_position_embeddings \(512\)"):
        run_rl(_config(workdir, "too_long", "sampling.max_new_tokens=600"), reward_fn=lambda t, g, i: [0.0] * len(t))


@pytest.mark.parametrize("suffix", ["<think>\n", ""])
def test_demonstrations_drop_a_think_the_prompt_already_opens(workdir, tmp_path, suffix):
    from sftrl_jax.data.prompts import PromptDataOptions, load_prompt_items
    from sftrl_jax.models import load_tokenizer
    from sftrl_jax.rl.demonstrations import load_demonstrations

    _, model_dir, _ = workdir
    target = "<think>\nsay it</think>\\boxed{1}"
    data = write_parquet([{"prompt": [{"role": "user", "content": "say 1"}], "reward_model": {"ground_truth": "1"},
                           "target": [{"role": "assistant", "content": target}]}], tmp_path / "think.parquet")
    tokenizer = load_tokenizer(model_dir)
    options = PromptDataOptions(files=[str(data)], prompt_suffix=suffix)
    items, _ = load_prompt_items(options, tokenizer)
    demo = load_demonstrations(items, options, tokenizer, eos_id=tokenizer.eos_token_id, max_new_tokens=64)
    # LUFFY's dataset: a prompt that opens the block keeps the only <think>; otherwise the target keeps its own
    expected = target[len("<think>\n"):] if suffix else target
    assert demo[items[0].prompt_id].text == expected
    assert demo[items[0].prompt_id].token_ids[:-1] == tokenizer(expected, add_special_tokens=False)["input_ids"]
