"""GRPO end to end: split-invariant updates, learning a controlled reward, KL, dynamic sampling."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sft_fixtures import make_model_dir
from sftrl_jax.config import load_config
from sftrl_jax.data.batching import micro_step_layout as _layout
from sftrl_jax.models import load_pretrained
from sftrl_jax.rl import DynamicSamplingError, RLConfig, run_rl
from sftrl_jax.rl.config import RLSection
from sftrl_jax.rl.methods import get_method
from sftrl_jax.rl.rollouts import Rollouts, rollout_arrays
from sftrl_jax.rl.step import make_logprob_fn, make_policy_update, update_batch_keys
from sftrl_jax.rl.verl_layout import verl_step_layout
from sftrl_jax.sharding import make_mesh, micro_batch_sharding, place

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("module_xla_cache")]  # every test trains GRPO end to end

TARGET = 7  # the controlled reward: 1 when a response contains this token id


@pytest.fixture(scope="module")
def workdir(hf_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    model_dir = make_model_dir(hf_checkpoint("qwen2_tied"), root / "model")
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(64):
            f.write(json.dumps({"prompt": f"say {i % 10}", "answer": str(i % 2)}) + "\n")
    return root, model_dir


def contains_target(responses, truths, token_ids):
    return [float(TARGET in ids) for ids in token_ids]


def _config(workdir, out, *overrides):
    root, model_dir = workdir
    return load_config(RLConfig, overrides=[
        f"model.path={model_dir}", f"data.files=[{root / 'prompts.jsonl'}]", f"output_dir={root / out}",
        "rl.prompts_per_step=4", "sampling.n=4", "rl.mini_batches_per_step=2", "train.micro_batch_size=1",
        "sampling.max_new_tokens=8", "train.seed=0", "checkpoint.save_every=0", *overrides])


def _update(directory, rollouts, cfg, *, devices, micro_batch_size):
    mesh = make_mesh({"fsdp": devices}, devices=jax.devices()[:devices])
    model, _ = load_pretrained(directory, mesh=mesh)
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model))
    arrays = rollout_arrays(rollouts, max_new_tokens=16, mask_truncated=False, pad_id=0)
    arrays.pop("sampler_logp")
    arrays["advantages"] = np.linspace(-1.5, 1.5, len(rollouts.responses)).astype(np.float32)
    arrays.update(get_method(cfg.method).step_inputs(cfg, 3, 10, len(rollouts.responses)))
    if "entropy_weight" in update_batch_keys(cfg):
        arrays["entropy_weight"] = verl_step_layout(
            arrays["attention_mask"].sum(1), arrays["response_mask"].sum(1), ranks=cfg.verl_ranks,
            mini_batches=cfg.mini_batches_per_step, max_token_len=cfg.verl_max_token_len)[1]
    rows = micro_batch_size * devices
    on_devices = lambda a: {k: place(v, micro_batch_sharding(mesh, v.ndim)) for k, v in a.items()}  # noqa
    old = jax.jit(make_logprob_fn(graphdef, 1.0))(params, on_devices(_layout(arrays, rows)))
    # perturb the old log-probs so the ratios are not all 1 and the clipping branches are used
    arrays["old_logp"] = np.asarray(old).reshape(arrays["response_ids"].shape) + np.float32(0.3) * np.cos(
        np.arange(arrays["response_ids"].size)).reshape(arrays["response_ids"].shape).astype(np.float32)
    # plain SGD: the update is the gradient itself (Adam's first step is ~sign(g) and would hide errors)
    optimizer = optax.sgd(1.0)
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
    step = jax.jit(make_policy_update(graphdef, optimizer, lambda s: 1.0, cfg, temperature=1.0, max_new_tokens=16))
    new_state, metrics = step(state, on_devices(_layout(arrays, rows)))
    return jax.device_get(new_state["params"]), jax.device_get(metrics), jax.device_get(params)


def _random_rollouts(seed: int, lengths, off_policy=()) -> Rollouts:
    """8 random prompts (3-11 tokens) and responses of the given lengths, rewards and log-probs 0."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 60, int(rng.integers(3, 12))).tolist() for _ in range(len(lengths))]
    responses = [rng.integers(1, 60, int(n)).tolist() for n in lengths]
    count = len(lengths)
    return Rollouts(prompts, responses, [[0.0] * len(r) for r in responses], [False] * count, [0.0] * count,
                    [0.0] * count, off_policy=list(off_policy))


def _update_error(params, reference, before) -> float:
    """The largest relative difference between two updates (``params - before`` vs ``reference - before``)."""
    return max(jax.tree.leaves(jax.tree.map(lambda a, b, c: np.linalg.norm(a - b) / np.linalg.norm(b - c),
                                            params, reference, before)))


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_grpo_update_does_not_depend_on_the_micro_batch_split(workdir, agg_mode):
    _, model_dir = workdir
    rollouts = _random_rollouts(0, (1, 16, 3, 9, 2, 14, 5, 7))
    cfg = RLSection(agg_mode=agg_mode, clip_high=0.28, entropy_coef=0.01)
    reference, _, before = _update(model_dir, rollouts, cfg, devices=1, micro_batch_size=8)
    splits = [(1, 2), (1, 1), (8, 1), (2, 2)] if agg_mode == "token-mean" else [(2, 2)]
    for devices, micro in splits:  # 4 micro-steps, 8 micro-steps, 8 devices, 2 devices x 2 micro-steps
        params, metrics, _ = _update(model_dir, rollouts, cfg, devices=devices, micro_batch_size=micro)
        error = max(jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max() / np.abs(b).max(), params,
                                                 reference)))
        update_error = _update_error(params, reference, before)
        # float32 sums in a different order: parameters agree to a few ulps of the largest entry
        # (1.1e-6 measured), the update itself to 1e-4 of its size
        assert error <= 3e-6 and update_error <= 1e-4, (devices, micro, error, update_error)
        assert 0 < metrics["clipfrac"] < 1


@pytest.mark.parametrize("method", ["gspo", "cispo"])
def test_sequence_and_is_weight_methods_do_not_depend_on_the_micro_batch_split(workdir, method):
    _, model_dir = workdir
    rollouts = _random_rollouts(2, (1, 16, 3, 9, 2, 14, 5, 7))
    # GSPO's published clip range is so narrow that the 0.3 perturbation clips every sequence: widen it so
    # both branches are used
    cfg = RLSection(method=method, entropy_coef=0.01, **({"clip_low": 0.05, "clip_high": 0.05} if method == "gspo"
                                                         else {}))
    reference, _, before = _update(model_dir, rollouts, cfg, devices=1, micro_batch_size=8)
    for devices, micro in [(1, 2), (8, 1), (2, 2)]:
        params, metrics, _ = _update(model_dir, rollouts, cfg, devices=devices, micro_batch_size=micro)
        assert _update_error(params, reference, before) <= 1e-4, (method, devices, micro)
        assert 0 < metrics["clipfrac"] < 1


@pytest.mark.parametrize("method, expert_source", [("luffy", None), ("chord", "group"), ("chord", "expert_data")])
def test_mixed_policy_update_does_not_depend_on_the_micro_batch_split(workdir, method, expert_source):
    _, model_dir = workdir
    # groups of 4 ending with the prompt's demonstration, or (CHORD's expert rows) 6 sampled rows then 2 expert rows
    off_policy = [False] * 6 + [True] * 2 if expert_source == "expert_data" else [False, False, False, True] * 2
    rollouts = _random_rollouts(1, (4, 16, 3, 9, 2, 14, 5, 7), off_policy=off_policy)
    responses = rollouts.responses
    chord = {"expert_source": expert_source, "expert_data": ["expert.jsonl"]} if method == "chord" else {}
    # LUFFY: its entropy as token means of verl micro-batches (per-row weights over 2 ranks)
    luffy = {"verl_ranks": 2, "verl_max_token_len": 24} if method == "luffy" else {}
    cfg = RLSection(method=method, clip_high=0.28, entropy_coef=0.01, loss_scale_factor=64.0, **chord, **luffy)
    reference, _, before = _update(model_dir, rollouts, cfg, devices=1, micro_batch_size=8)
    for devices, micro in [(2, 2), (8, 1)]:
        params, metrics, _ = _update(model_dir, rollouts, cfg, devices=devices, micro_batch_size=micro)
        update_error = _update_error(params, reference, before)
        assert update_error <= 1e-4, (method, devices, micro, update_error)
        assert metrics["off_policy_share"] == pytest.approx(
            sum(len(r) for r, o in zip(responses, rollouts.off_policy) if o) / sum(map(len, responses)), rel=1e-5)


def test_grpo_raises_a_controlled_reward_and_logs_everything(workdir):
    config = _config(workdir, "learn", "train.max_steps=24", "optimizer.learning_rate=3e-2",
                     "sampling.max_new_tokens=6",
                     "checkpoint.save_every=12")
    result = run_rl(config, reward_fn=contains_target, progress=False)
    rewards = [r["reward_mean"] for r in result.metrics]
    assert np.mean(rewards[-4:]) > np.mean(rewards[:4]) + 0.3, rewards
    expected_keys = {"reward_mean", "accuracy", "all_correct_share", "all_wrong_share", "response_len_mean",
                     "response_len_max", "truncated_share", "entropy", "clipfrac", "clipfrac_lower", "ppo_kl",
                     "logprob_mismatch_abs", "logprob_mismatch_kl", "grad_norm", "lr", "time_generate",
                     "time_score", "time_train", "tokens_per_s", "flops_train", "flops_generate"}
    assert expected_keys <= set(result.metrics[0])
    # the sampler's log-probs and the trainer's recomputation agree (same distribution: T=1, no top-k/p)
    assert max(r["logprob_mismatch_abs"] for r in result.metrics) < 1e-4
    assert result.metrics[-1]["flops_train"] > result.metrics[0]["flops_train"] > 0
    assert (result.output_dir / "rl.png").exists() and (result.final_dir / "config.json").exists()


@pytest.mark.slow
def test_rollouts_decode_tensor_parallel_while_the_update_stays_fsdp(workdir):
    """sampling.tensor_parallel=2 on the 8-device fsdp mesh: rollouts decode on (fsdp 4, tensor 2), the
    updates on fsdp 8, and the sampler's log-probs are the trainer's (same distribution: T=1)."""
    config = _config(workdir, "decode_tp", "train.max_steps=2", "sampling.tensor_parallel=2")
    metrics = run_rl(config, reward_fn=contains_target, progress=False).metrics
    assert len(metrics) == 2 and max(r["logprob_mismatch_abs"] for r in metrics) < 1e-4


def test_kl_penalty_keeps_the_policy_near_the_reference(workdir):
    def final_kls(kl_coef, out):
        config = _config(workdir, out, "train.max_steps=10", "optimizer.learning_rate=1e-2",
                         "sampling.max_new_tokens=6",
                         "rl.mini_batches_per_step=1", f"rl.kl_coef={kl_coef}", "rl.kl_estimator=k3")
        return [r["kl_ref"] for r in run_rl(config, reward_fn=contains_target, progress=False).metrics]

    weak, strong = final_kls(1e-6, "kl_weak"), final_kls(1.0, "kl_strong")
    assert weak[0] == pytest.approx(0.0, abs=1e-6) and strong[0] == pytest.approx(0.0, abs=1e-6)  # starts at ref
    assert all(np.isfinite(strong)) and 0 < max(strong[-3:]) < 0.5 * max(weak[-3:])


def test_dynamic_sampling_fills_the_batch_or_stops_at_the_cap(workdir):
    def odd_prompts_vary(responses, truths, token_ids):  # prompts with answer "0" always score 0
        return [float(t == "1" and ids[0] % 2 == 0) for t, ids in zip(truths, token_ids)]

    config = _config(workdir, "dyn", "train.max_steps=2", "rl.dynamic_sampling=true", "rl.max_generation_rounds=6",
                     "sampling.temperature=1.0")
    result = run_rl(config, reward_fn=odd_prompts_vary, progress=False)
    for record in result.metrics:
        assert record["all_correct_share"] == 0 and record["all_wrong_share"] == 0  # only informative groups
        assert record["generation_rounds"] >= 2 and record["dropped_groups"] >= 2

    never_varies = _config(workdir, "dyn_cap", "train.max_steps=2", "rl.dynamic_sampling=true",
                           "rl.max_generation_rounds=3")
    with pytest.raises(DynamicSamplingError, match=r"only 0 of 4 prompt groups .* after 3 generation rounds"):
        run_rl(never_varies, reward_fn=lambda r, t, ids: [1.0] * len(r), progress=False)
