"""The SFT trainer end to end: CLI, learning, HF export, resume, NaN handling, config errors."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_checkpoints import hf_logits, load_hf
from sft_fixtures import luffy_rows, make_model_dir, write_parquet
from sftrl_jax.cli import main
from sftrl_jax.config import ConfigError, OptimizerOptions, load_config
from sftrl_jax.data.batching import EpochSampler
from sftrl_jax.flops import train_flops
from sftrl_jax.models import ModelConfig, load_pretrained, load_tokenizer, read_config
from sftrl_jax.models.config import require_positions
from sftrl_jax.optim import apply_update, init_opt_state, make_optimizer, make_schedule
from sftrl_jax.sft import NonFiniteLossError, SFTConfig, run_sft
from sftrl_jax.sft.trainer import load_examples

pytestmark = pytest.mark.usefixtures("module_xla_cache")  # runs of one shape compile once

TINY = Path(__file__).parents[1] / "configs" / "tiny_sft.yaml"


@pytest.fixture(scope="module")
def workdir(hf_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_run")
    model_dir = make_model_dir(hf_checkpoint("qwen2_tied"), root / "model")
    data = write_parquet(luffy_rows(40, seed=3), root / "train.parquet")
    return root, model_dir, data


def _config(workdir, out, *overrides):
    root, model_dir, data = workdir
    return load_config(SFTConfig, TINY, [f"model.path={model_dir}", f"data.train_files=[{data}]",
                                         f"output_dir={root / out}", *overrides])


@pytest.mark.slow
def test_cli_sft_learns_and_exports_a_transformers_model(workdir, capsys):
    root, model_dir, data = workdir
    code = main(["sft", "--config", str(TINY), f"model.path={model_dir}", f"data.train_files=[{data}]",
                 f"output_dir={root / 'cli'}", "train.max_steps=16", "optimizer.learning_rate=3e-3"])
    assert code == 0
    assert "sft: 16 steps" in capsys.readouterr().out
    out = root / "cli"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 17))
    assert {"loss", "grad_norm", "lr", "tokens", "tokens_per_s"} <= set(train[0])
    assert np.mean([r["loss"] for r in train[-3:]]) < 0.7 * train[0]["loss"]  # it learns
    assert any("eval_loss" in r for r in records)
    assert (out / "loss.png").stat().st_size > 0 and (out / "config.yaml").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "16"]

    final = out / "final"
    assert (final / "tokenizer.json").exists()
    ours, _ = load_pretrained(final)
    ids = np.random.default_rng(0).integers(0, 60, (2, 13)).astype(np.int32)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids))), hf_logits(load_hf(final), ids), atol=1e-4)


@pytest.mark.slow
def test_resume_after_a_kill_equals_the_uninterrupted_run(workdir):
    settings = ["train.max_steps=6", "checkpoint.save_every=2", "train.eval_every=0", "data.eval_fraction=0.0",
                "train.global_batch_size=8", "checkpoint.async_save=true"]
    uninterrupted = run_sft(_config(workdir, "full", *settings), progress=False)

    def kill_at_step_5(step, _):
        if step == 5:
            raise KeyboardInterrupt("simulated kill")

    config = _config(workdir, "killed", *settings)
    with pytest.raises(KeyboardInterrupt):
        run_sft(config, progress=False, on_step=kill_at_step_5)
    saved = sorted(int(p.name) for p in (Path(config.output_dir) / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == 4  # the last checkpoint survived the kill
    with pytest.raises(FileExistsError, match="--resume"):
        run_sft(config, progress=False)  # a fresh run never overwrites a run's checkpoints
    resumed = run_sft(config, resume=True, progress=False)
    assert resumed.steps == 6
    for a, b in zip(jax.tree.leaves(uninterrupted.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["loss"] for r in resumed.metrics] == [r["loss"] for r in uninterrupted.metrics]
    # the FLOPs count continues exactly across the resume (step 5 was recomputed from the step-4 checkpoint)
    flops = [r["flops_train"] for r in uninterrupted.metrics]
    assert [r["flops_train"] for r in resumed.metrics] == flops
    assert all(b > a for a, b in zip(flops, flops[1:]))
    # step 1: forward + backward over each of its 8 sequences at its own (unpadded) length
    examples, _ = load_examples(config, load_tokenizer(config.model.path))
    first = EpochSampler(len(examples), 8, seed=config.train.seed).next()
    model_config = read_config(config.model.path)
    assert flops[0] == pytest.approx(sum(train_flops(model_config, len(examples[i].input_ids)) for i in first),
                                     rel=1e-12)


@pytest.mark.slow
def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(workdir):
    # Adam's first step moves every weight by ~lr: with lr=1e30 the second forward pass overflows.
    config = _config(workdir, "nan", "optimizer.learning_rate=1e30", "optimizer.warmup_ratio=0.0",
                     "optimizer.max_grad_norm=0.0",
                     "checkpoint.save_every=1", "train.max_steps=5", "data.eval_fraction=0.0")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss/grad norm at step 2 .*Last good checkpoint: step 1"):
        run_sft(config, progress=False)
    assert (Path(config.output_dir) / "checkpoints" / "1").is_dir()


def test_config_errors_name_the_key(workdir, capsys):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rat'"):
        _config(workdir, "x", "train.learning_rat=1e-4")
    with pytest.raises(ConfigError, match=r"config key 'train.global_batch_size': expected int, got 'many'"):
        _config(workdir, "x", "train.global_batch_size=many")
    with pytest.raises(ConfigError, match=r"config key 'train.emulate_bug': expected .*'deepspeed_offload'"):
        _config(workdir, "x", "train.emulate_bug=deepspeed")
    with pytest.raises(ConfigError, match=r"config key 'data.overlong': expected 'truncate' \| 'drop', got 'cut'"):
        _config(workdir, "x", "data.overlong=cut")
    with pytest.raises(ConfigError, match=r"config key 'model.path': expected str, got None"):
        load_config(SFTConfig, TINY)
    assert main(["sft", "--config", str(TINY), "bogus.key=1"]) == 2
    assert "unknown config key 'bogus'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"global_batch_size \(6\) must be a multiple of .* shards \(8\)"):
        run_sft(_config(workdir, "bad_batch", "train.global_batch_size=6"), progress=False)


def test_training_past_the_model_positions_is_refused(workdir):
    config = ModelConfig(model_type="qwen2", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=4, max_position_embeddings=4096)
    require_positions(config, 4096, "data.max_length")  # every position exists
    with pytest.raises(ValueError, match=r"data.max_length \(16384\) exceeds the model's max_position_embeddings "
                                         r"\(4096\)"):
        require_positions(config, 16384, "data.max_length")
    hf = config.to_hf_dict()
    del hf["max_position_embeddings"]
    undeclared = ModelConfig.from_hf_dict(hf)
    require_positions(undeclared, 16384, "rl.max_length")  # a config.json without the key: no known limit
    # the tiny test model has 512 positions: SFT refuses a longer data.max_length before loading any data
    with pytest.raises(ValueError, match=r"data.max_length \(1024\) exceeds the model's max_position_embeddings "
                                         r"\(512\)"):
        run_sft(_config(workdir, "too_long", "data.max_length=1024"), progress=False)


def test_schedules_and_fp32_optimizer_state_for_bf16_parameters():
    options = OptimizerOptions(learning_rate=1.0, warmup_ratio=0.2, lr_schedule="cosine")
    schedule = make_schedule(options, total_steps=10)
    assert [float(schedule(s)) for s in (0, 1, 2)] == pytest.approx([0.0, 0.5, 1.0])
    assert float(schedule(6)) == pytest.approx(0.5)  # half-way through the cosine decay
    linear = make_schedule(OptimizerOptions(learning_rate=1.0, lr_schedule="linear"), total_steps=4)
    assert [float(linear(s)) for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    constant = make_schedule(OptimizerOptions(learning_rate=0.1, lr_schedule="constant"), total_steps=4)
    assert float(constant(3)) == pytest.approx(0.1)

    params = {"layers": {"q_proj": jnp.ones((2, 3), jnp.bfloat16), "input_norm": jnp.ones((2, 3), jnp.bfloat16)}}
    optimizer, _ = make_optimizer(OptimizerOptions(learning_rate=0.1, weight_decay=0.5, lr_schedule="constant"), 4)
    state = init_opt_state(optimizer, params)
    assert {leaf.dtype for leaf in jax.tree.leaves(state) if leaf.ndim} == {jnp.dtype("float32")}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    new_params, _ = apply_update(optimizer, zero_grads, state, params)
    assert new_params["layers"]["q_proj"].dtype == jnp.bfloat16
    # With zero gradient only weight decay moves a weight: projections decay, norms do not.
    assert float(new_params["layers"]["q_proj"][0, 0]) < 1.0
    assert float(new_params["layers"]["input_norm"][0, 0]) == 1.0
    # AdamW's decoupled decay takes lr * weight_decay = 5% off a projection weight (0.9492 in bfloat16).
    assert float(new_params["layers"]["q_proj"][0, 0]) == pytest.approx(0.95, abs=4e-3)
    # Adam's first step is lr * g / |g| whatever the gradient's scale (clipped or not): a gradient of 1000
    # moves a norm weight by lr = 0.1, and a projection by lr plus the decay.
    big_grads = jax.tree.map(lambda p: jnp.full(p.shape, 1000.0, jnp.float32), params)
    stepped, _ = apply_update(optimizer, big_grads, init_opt_state(optimizer, params), params)
    assert float(stepped["layers"]["input_norm"][0, 0]) == pytest.approx(0.9, abs=4e-3)
    assert float(stepped["layers"]["q_proj"][0, 0]) == pytest.approx(0.85, abs=4e-3)
