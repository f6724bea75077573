"""LUFFY and CHORD: the per-token losses by hand, their gradients, the mu schedule, the
aggregation, CHORD's expert rows, and the methods end to end in the RL trainer.

CHORD's expected values follow Trinity-RFT (modelscope/Trinity-RFT), read from:
trinity/algorithm/policy_loss_fn/chord_policy_loss.py (mu_schedule_function, the phi and plain SFT losses,
MIXCHORDPolicyLossFn: (1 - mu) GRPO + mu SFT, its defaults), trinity/algorithm/policy_loss_fn/sft_loss.py
(SFTLossFn: token mean of -logp), trinity/algorithm/sample_strategy/mix_sample_strategy.py (MixSampleStrategy:
ceil(expert_data_ratio x batch) expert rows, default ratio 0.5) and examples/mix_chord/mix_chord.yaml (its
recipes).
"""

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
from sftrl_jax.rl.methods import get_method

pytestmark = pytest.mark.usefixtures("module_xla_cache")  # runs of one shape compile once

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


def test_chord_plain_sft_loss_without_phi_by_hand():
    # enable_phi_function: false (CHORD-mu) is Trinity's SFTLossFn: -logp, gradient -1 per token
    p = np.array([0.01, 0.5, 0.99])
    logp = jnp.log(jnp.asarray(p))
    np.testing.assert_allclose(np.asarray(chord_sft_token_losses(logp, phi=False)), -np.log(p), rtol=1e-6)
    grad = jax.grad(lambda lp: jnp.sum(chord_sft_token_losses(lp, phi=False)))(logp)
    np.testing.assert_allclose(np.asarray(grad), [-1.0, -1.0, -1.0], rtol=1e-6)


def test_chord_mu_schedule_is_trinitys():
    # mu_schedule_function: peak * step / warmup below the warm-up, valley from warmup + decay on, between them
    # valley + (peak - valley) * (1 + cos(pi * (step - warmup) / decay)) / 2
    assert [chord_mu(s) for s in (1, 2, 500)] == [0.1, 0.1, 0.1]  # defaults 0, 0, 0.1, 0.1: CHORD-phi's constant
    # examples/mix_chord/mix_chord.yaml: warm-up 200, decay 400, peak 0.5, valley 0.02
    recipe = dict(warmup_steps=200, decay_steps=400, peak=0.5, valley=0.02)
    assert chord_mu(1, **recipe) == pytest.approx(0.0025)  # 0.5 * 1 / 200
    assert chord_mu(100, **recipe) == pytest.approx(0.25)  # half way up
    assert chord_mu(200, **recipe) == pytest.approx(0.5)  # the peak: cosine at 0
    assert chord_mu(400, **recipe) == pytest.approx(0.26)  # 0.02 + 0.48 * (1 + cos(pi / 2)) / 2
    assert chord_mu(500, **recipe) == pytest.approx(0.02 + 0.24 * (1 + math.cos(0.75 * math.pi)))
    assert chord_mu(600, **recipe) == chord_mu(5000, **recipe) == 0.02  # the valley from 200 + 400 on
    # its CHORD-mu comment: no warm-up, decay 200, peak 0.9, valley 0.05
    assert chord_mu(100, decay_steps=200, peak=0.9, valley=0.05) == pytest.approx(0.475)
    assert chord_mu(200, decay_steps=200, peak=0.9, valley=0.05) == 0.05
    # no decay steps: the valley right after the warm-up (the peak is only approached)
    assert chord_mu(9, warmup_steps=10, peak=0.5, valley=0.1) == pytest.approx(0.45)
    assert chord_mu(10, warmup_steps=10, peak=0.5, valley=0.1) == 0.1


def test_chord_step_inputs_count_steps_from_one():
    # Trinity's trainer samples step train_step_num + 1: our first step (0 finished) is its step 1
    cfg = RLSection(method="chord", expert_source="group", mu_warmup_steps=200, mu_decay_steps=400, mu_peak=0.5,
                    mu_valley=0.02)
    mu = get_method("chord").step_inputs(cfg, 99, 1000, 3)["chord_mu"]
    np.testing.assert_allclose(mu, [0.25] * 3, rtol=1e-6)
    assert get_method("chord").step_inputs(cfg, 0, 1000, 1)["chord_mu"][0] == pytest.approx(0.0025)


def test_chord_defaults_are_trinitys_and_expert_data_is_required():
    # MIXCHORDPolicyLossFn.default_args / __init__: mu_warmup_steps 0, mu_decay_steps 0, mu_peak 0.1,
    # mu_valley 0.1, enable_phi_function True; MixSampleStrategy.default_args: expert_data_ratio 0.5
    cfg = RLSection(method="chord", expert_data=["expert.jsonl"])
    assert (cfg.expert_source, cfg.expert_data_ratio, cfg.mu_warmup_steps, cfg.mu_decay_steps, cfg.mu_peak,
            cfg.mu_valley, cfg.enable_phi_function) == ("expert_data", 0.5, 0, 0, 0.1, 0.1, True)
    assert (cfg.clip_low, cfg.clip_high, cfg.clip_c, cfg.agg_mode) == (0.2, 0.2, 3.0, "token-mean")  # its PPO loss
    with pytest.raises(ConfigError, match=r"^config key 'rl.expert_data': rl.method=chord with "
                                          r"rl.expert_source=expert_data .*rl.expert_source=group"):
        RLSection(method="chord")
    with pytest.raises(ConfigError, match=r"config key 'rl.expert_data'"):
        load_config(RLConfig, overrides=["model.path=x", "rl.method=chord"])
    assert RLSection(method="chord", expert_source="group").expert_data == []  # its own demonstrations
    assert RLSection().mu_peak is None  # not a GRPO setting


@pytest.mark.parametrize("old", ["chord_mu_peak", "chord_mu_valley", "chord_mu_warmup_steps"])
def test_the_old_chord_keys_are_unknown(old):
    with pytest.raises(ConfigError, match=rf"unknown config key 'rl.{old}'; valid keys under 'rl': .*mu_peak"):
        load_config(RLConfig, overrides=["model.path=x", "rl.method=chord", "rl.expert_source=group", f"rl.{old}=0.2"])


def test_expert_data_settings_are_range_checked():
    with pytest.raises(ConfigError, match=r"rl.expert_data_ratio.*in \[0, 1\)"):
        load_config(RLConfig, overrides=["model.path=x", "rl.method=chord", "rl.expert_data=[e.jsonl]",
                                         "rl.expert_data_ratio=1.0"])
    with pytest.raises(ConfigError, match=r"rl.expert_source"):
        load_config(RLConfig, overrides=["model.path=x", "rl.method=chord", "rl.expert_source=batch"])


def _sizes(*overrides):
    from sftrl_jax.rl.rollouts import check_batch_sizes, expert_rows_per_step, groups_per_step

    config = load_config(RLConfig, overrides=["model.path=x", "rl.method=chord", "rl.expert_data=[e.jsonl]",
                                              "train.micro_batch_size=1", "rl.mini_batches_per_step=1", *overrides])
    check_batch_sizes(config, 1)
    experts, groups = expert_rows_per_step(config), groups_per_step(config)
    # the step's batch (what rl_functions declares and the trainer splits): still prompts_per_step x n rows
    assert groups * config.sampling.n + experts == config.rl.prompts_per_step * config.sampling.n
    return experts, groups


def test_expert_rows_per_step_follow_trinitys_ratio():
    # mix_chord.yaml: batch_size 40 x repeat_times 8 = 320 per step, expert_data_ratio 0.2: ceil(64) = 64 expert
    # rows, 256 usual ones (its policy loss args: train_batch_size_expert 64, train_batch_size_usual 256)
    assert _sizes("rl.prompts_per_step=40", "sampling.n=8", "rl.expert_data_ratio=0.2") == (64, 32)
    assert _sizes("rl.prompts_per_step=128", "sampling.n=8") == (512, 64)  # the default ratio 0.5
    assert _sizes("rl.prompts_per_step=3", "sampling.n=2", "rl.expert_data_ratio=0.25") == (2, 2)  # ceil(1.5)
    assert _sizes("rl.prompts_per_step=4", "sampling.n=4", "rl.expert_data_ratio=0.0") == (0, 4)
    assert _sizes("rl.prompts_per_step=4", "sampling.n=4", "rl.expert_source=group") == (0, 4)  # in the groups
    with pytest.raises(ValueError, match=r"rl.expert_data_ratio \(0.3\) of rl.prompts_per_step x sampling.n \(16\) "
                                         r"is 5 expert rows \(rounded up\), leaving 11 sampled rows: not whole "
                                         r"groups of sampling.n \(4\)"):
        _sizes("rl.prompts_per_step=4", "sampling.n=4", "rl.expert_data_ratio=0.3")
    with pytest.raises(ValueError, match=r"4 expert rows .* leaving 12 sampled rows: each must be a multiple of "
                                         r"rl.mini_batches_per_step \(8\)"):
        _sizes("rl.prompts_per_step=4", "sampling.n=4", "rl.expert_data_ratio=0.25", "rl.mini_batches_per_step=8")


def test_every_mini_batch_gets_its_share_of_expert_rows():
    from sftrl_jax.rl.expert_data import mini_batch_order

    # 4 sampled rows (0-3) then 2 expert rows (4, 5), 2 mini-batches
    assert mini_batch_order(4, 2, 2).tolist() == [0, 1, 4, 2, 3, 5]
    assert mini_batch_order(4, 2, 1).tolist() == [0, 1, 2, 3, 4, 5]


def test_chord_advantages_leave_expert_rows_out_of_the_groups():
    # MixSampleStrategy gives expert rows reward 0 and advantages 0; the GRPO advantage covers the usual rows
    cfg = RLSection(method="chord", expert_data=["e.jsonl"])
    adv = get_method("chord").advantages(np.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]),
                                         np.array([False] * 4 + [True] * 2), 2, cfg)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)  # (r - mean) / (unbiased std + eps) in the group (1, 0)
    np.testing.assert_allclose(adv, [a, -a, 0, 0, 0, 0], rtol=1e-6)
    grouped = RLSection(method="chord", expert_source="group")  # the demonstration is each group's last member
    adv = get_method("chord").advantages(np.array([1.0, 0.0, 1.0, 1.0, 1.0, 1.0]), np.array([False, False, True] * 2),
                                         3, grouped)
    np.testing.assert_allclose(adv, [a, -a, 0, 0, 0, 0], rtol=1e-6)


@pytest.mark.parametrize("phi", [True, False])
def test_chord_update_on_usual_and_expert_rows_is_one_minus_mu_grpo_plus_mu_sft(phi):
    # two sampled rows (ratio 1, A = +1 on 2 tokens, A = -1 on 3 tokens) and one expert row of 2 tokens, padding
    # after; the expert row's advantage (5) and old log-probs must not matter. MIXCHORDPolicyLossFn:
    # (1 - mu) x the PPO loss token-mean over the usual tokens + mu x the SFT loss token-mean over the expert ones
    mu = 0.3
    logp = jnp.asarray([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [math.log(0.5), math.log(0.25), -3.0]])
    old = jnp.asarray([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-9.0, -9.0, -9.0]])
    adv = jnp.asarray([1.0, -1.0, 5.0])
    mask = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    off = jnp.asarray([[0.0] * 3, [0.0] * 3, [1.0, 1.0, 0.0]])

    def loss(lp):
        return update_loss("chord", lp, old, adv, mask, off, batch_extra={"chord_mu": jnp.full((3,), mu)},
                           expert_data=["e.jsonl"], enable_phi_function=phi)

    grpo = (-1.0 - 1.0 + 1.0 + 1.0 + 1.0) / 5  # -A * ratio on the 5 usual tokens
    p = np.array([0.5, 0.25])
    weights = p * (1 - p) if phi else np.ones(2)  # phi = p (1 - p), held constant
    sft = float(np.mean(-weights * np.log(p)))
    value, metrics = loss(logp)
    assert float(value) == pytest.approx((1 - mu) * grpo + mu * sft, rel=1e-6)
    assert float(metrics["mu"]) == pytest.approx(mu)
    grad = np.asarray(jax.grad(lambda lp: loss(lp)[0])(logp))
    expected = np.array([[-(1 - mu) / 5] * 2 + [0.0], [(1 - mu) / 5] * 3, [*(-mu * weights / 2), 0.0]])
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-8)


def test_chord_loss_mixes_the_two_terms_by_hand():
    # one on-policy row (ratio 1, A = 1: pg = -1 per token) and one demonstration row
    logp = jnp.asarray([[0.0, 0.0], [math.log(0.5), math.log(0.25)]])
    old = jnp.zeros((2, 2))
    adv = jnp.asarray([1.0, 0.0])
    mask = jnp.ones((2, 2))
    off = jnp.asarray([[0.0, 0.0], [1.0, 1.0]])
    loss, metrics = update_loss("chord", logp, old, adv, mask, off, batch_extra={"chord_mu": jnp.full((2,), 0.25)},
                                expert_source="group")
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
    luffy, grpo = RLSection(method="luffy", loss_scale_factor=65536.0, verl_ranks=8), RLSection()
    assert (luffy.norm_adv_by_std, luffy.agg_mode, luffy.entropy_coef, luffy.entropy_agg, luffy.clip_on_policy) == \
        (False, "seq-mean-token-sum-norm", 0.001, "micro_batch_token_mean", False)
    assert (grpo.norm_adv_by_std, grpo.agg_mode, grpo.entropy_coef, grpo.entropy_agg) == \
        (True, "token-mean", 0.0, "loss")
    assert RLSection(method="luffy", entropy_coef=0.0, loss_scale_factor=1.0).entropy_coef == 0.0  # set wins
    with pytest.raises(ConfigError, match=r"^config key 'rl.loss_scale_factor': .*8192 x 8.*65536"):
        RLSection(method="luffy")  # LUFFY's constant depends on its ranks: stated, never guessed
    assert RLSection(method="luffy", agg_mode="token-mean", verl_ranks=8).loss_scale_factor is None  # unused there


@pytest.mark.slow
@pytest.mark.parametrize("method", ["luffy", "chord"])
def test_mixed_policy_methods_train_with_one_demonstration_per_group(workdir, method):
    graded = []

    def reward(texts, truths, token_ids):
        graded.extend(texts)
        return [float("boxed" in t) for t in texts]

    # LUFFY's entropy per verl micro-batch, on the step arranged over 2 ranks
    grouped = ["rl.expert_source=group"] if method == "chord" else ["rl.verl_ranks=2"]
    result = run_rl(_config(workdir, method, f"rl.method={method}", *grouped), reward_fn=reward)
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
        run_rl(_config(workdir, "nodemo", "rl.method=luffy", "rl.entropy_agg=loss", f"data.files=[{path}]"),
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


def test_demonstrations_read_prompts_as_the_rl_prompts_are(tmp_path):
    # remove_system_prompt + keep_template_system_prompt: the rows' system message goes, the template's default
    # system block stays; a demonstration is matched to its prompt only if both are rendered the same way
    from hf_checkpoints import QWEN25_CHAT_TEMPLATE, QWEN25_DEFAULT_SYSTEM, make_tokenizer
    from sftrl_jax.data.prompts import PromptDataOptions, load_prompt_items
    from sftrl_jax.models import load_tokenizer
    from sftrl_jax.rl.demonstrations import load_demonstrations

    tokenizer = load_tokenizer(make_tokenizer(tmp_path / "tok", chat_template=QWEN25_CHAT_TEMPLATE))
    data = write_parquet([{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say 1"}],
                           "reward_model": {"ground_truth": "1"},
                           "target": [{"role": "assistant", "content": "\\boxed{1}"}]}], tmp_path / "sys.parquet")
    options = PromptDataOptions(files=[str(data)], remove_system_prompt=True, keep_template_system_prompt=True)
    items, _ = load_prompt_items(options, tokenizer)
    assert QWEN25_DEFAULT_SYSTEM in items[0].prompt_text and "be brief" not in items[0].prompt_text
    demo = load_demonstrations(items, options, tokenizer, eos_id=tokenizer.eos_token_id, max_new_tokens=64)
    assert demo[items[0].prompt_id].text == "\\boxed{1}"


def test_expert_rows_are_tokenised_as_sft_reads_them(workdir, tmp_path):
    from sftrl_jax.data.prompts import PromptDataOptions
    from sftrl_jax.data.sft import build_prompt_text
    from sftrl_jax.models import load_tokenizer
    from sftrl_jax.rl.expert_data import load_expert_rows

    _, model_dir, _ = workdir
    tokenizer = load_tokenizer(model_dir)
    eos = tokenizer.eos_token_id
    sft_jsonl = tmp_path / "expert.jsonl"  # our SFT jsonl: prompt + response
    sft_jsonl.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "say 1", "response": "\\boxed{1}"},
        {"prompt": "x" * 300, "response": "a prompt longer than data.max_prompt_length"},
        {"prompt": "say 2", "response": None},  # no response: a bad row
        {"prompt": "say 3", "response": "3" * 40}]))  # longer than the response budget: cut
    luffy = write_parquet([{"prompt": [{"role": "user", "content": "say 4"}],  # LUFFY's parquet: target
                            "target": [{"role": "assistant", "content": "\\boxed{4}"}]}], tmp_path / "expert.parquet")
    options = PromptDataOptions(split="train", max_prompt_length=64)
    rows, counts = load_expert_rows([str(sft_jsonl), str(luffy)], options, tokenizer, eos_id=eos, max_new_tokens=16)
    assert counts == {"bad_rows": 1, "prompt_too_long": 1, "truncated": 1}
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert [r.prompt_ids for r in rows] == [ids(build_prompt_text(f"say {i}", tokenizer)) for i in (1, 3, 4)]
    assert rows[0].token_ids == ids("\\boxed{1}") + [eos] and not rows[0].truncated
    assert rows[1].token_ids == ids("3" * 40)[:16] and rows[1].truncated
    assert rows[2].token_ids == ids("\\boxed{4}") + [eos]


@pytest.fixture(scope="module")
def expert_file(workdir):
    path = workdir[0] / "expert.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"add {i} and {i}", "response": f"\\boxed{{{2 * i}}}"}) + "\n"
                            for i in range(12)))
    return path


@pytest.mark.slow
def test_chord_trains_expert_rows_outside_the_groups_and_resumes_exactly(workdir, expert_file):
    def reward(graded):
        def fn(texts, truths, token_ids):
            graded.extend(texts)
            return [float(i % 2) for i in range(len(texts))]  # half of each group right
        return fn

    # 4 prompts x 4 per step = 16 sequences, expert_data_ratio 0.5: 8 expert rows and 2 groups of 4 samples;
    # mu: warm-up over 2 steps to 0.1 (step 1: 0.05), then the valley 0.1
    settings = ["rl.method=chord", f"rl.expert_data=[{expert_file}]", "rl.mu_warmup_steps=2",
                "checkpoint.save_every=1"]
    graded = []
    straight = run_rl(_config(workdir, "chord_straight", *settings), reward_fn=reward(graded))
    steps = [r for r in straight.metrics if "pg_loss" in r]
    assert len(graded) == 2 * 8  # only the sampled rows are graded; expert rows are not generated or graded
    assert [r["mu"] for r in steps] == pytest.approx([0.05, 0.1])
    for record in steps:
        assert record["expert_rows"] == 8 and record["reward_mean"] == 0.5  # expert rows left out (else 0.25)
        assert 0 < record["off_policy_share"] < 1 and record["sft_loss"] > 0
        assert record["expert_response_len_mean"] == pytest.approx(np.mean([len(f"\\boxed{{{2 * i}}}") + 1
                                                                            for i in range(12)]), abs=2.0)
    # stopped after step 1 (its checkpoint written), then resumed to 2: equals 2 straight (the expert rows'
    # position is restored: step 2 starts the expert data's second epoch, in another order than the first)
    def stop_after_step_1(step, _):
        if step == 1:
            raise KeyboardInterrupt("stopped")

    with pytest.raises(KeyboardInterrupt):
        run_rl(_config(workdir, "chord_resumed", *settings), reward_fn=reward([]), on_step=stop_after_step_1)
    resumed = run_rl(_config(workdir, "chord_resumed", *settings), resume=True, reward_fn=reward([]))
    assert resumed.steps == 2
    for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    last = [r for r in resumed.metrics if "pg_loss" in r][-1]
    assert {k: last[k] for k in ("sft_loss", "pg_loss", "flops_train", "flops_generate")} == \
        {k: steps[-1][k] for k in ("sft_loss", "pg_loss", "flops_train", "flops_generate")}


def test_chord_expert_data_with_too_few_usable_rows_is_refused(workdir, tmp_path):
    few = tmp_path / "few.jsonl"
    few.write_text(json.dumps({"prompt": "say 1", "response": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"rl.expert_data \(.*few.jsonl\): 1 usable rows .*fewer than the 8 expert "
                                         r"rows each step takes"):
        run_rl(_config(workdir, "few", "rl.method=chord", f"rl.expert_data=[{few}]"),
               reward_fn=lambda t, g, i: [0.0] * len(t))
