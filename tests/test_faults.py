"""Runs that would go silently wrong, and journals with one bad line.

- every numeric config key is range-checked at load, naming the dotted key and the allowed range;
- a model directory without its tokenizer files (no supervised tokens) is an error before training;
- a torn last line of ``metrics.jsonl`` does not block ``--resume``; a corrupt line elsewhere is
  reported with its line number and skipped;
- one corrupt line of an evaluation's ``generations.jsonl`` does not discard the valid ones after it.
"""

import dataclasses
import json
import logging
import re
import typing
from pathlib import Path

import pytest

from sft_fixtures import luffy_rows, make_model_dir, write_parquet
from sftrl_jax.cli import main
from sftrl_jax.config import ConfigError, check_range, load_config, ranges_of
from sftrl_jax.evaluation import Completion, EvalConfig, run_eval
from sftrl_jax.metrics import MetricsWriter, read_jsonl
from sftrl_jax.pipeline import PipelineConfig
from sftrl_jax.rl import RLConfig
from sftrl_jax.sft import SFTConfig

CONFIGS = Path(__file__).parents[1] / "configs"
TINY_SFT = CONFIGS / "tiny_sft.yaml"


# ------------------------------------------------------------------------------------------ config ranges
SFT_BAD = [  # (override, the message's "expected ..." part)
    ("train.max_steps=0", "int >= 1 or null, got 0"),
    ("train.max_steps=-3", "int >= 1 or null, got -3"),
    ("train.num_epochs=0", "int >= 1, got 0"),
    ("train.global_batch_size=0", "int >= 1, got 0"),
    ("train.global_batch_size=-8", "int >= 1, got -8"),
    ("train.micro_batch_size=0", "int >= 1, got 0"),
    ("optimizer.learning_rate=0", "float > 0, got 0.0"),
    ("optimizer.learning_rate=-1e-4", "float > 0, got -0.0001"),
    ("optimizer.warmup_ratio=1.5", "float in [0, 1], got 1.5"),
    ("optimizer.min_lr_ratio=-0.1", "float in [0, 1], got -0.1"),
    ("optimizer.weight_decay=-0.01", "float >= 0, got -0.01"),
    ("optimizer.adam_b1=1.0", "float in [0, 1), got 1.0"),
    ("optimizer.adam_b2=.nan", "float in [0, 1), got nan"),
    ("optimizer.adam_eps=0", "float > 0, got 0.0"),
    ("optimizer.max_grad_norm=-1", "float >= 0, got -1.0"),
    ("train.seed=-1", "int >= 0, got -1"),
    ("train.eval_every=-1", "int >= 0, got -1"),
    ("logging.log_every=0", "int >= 1, got 0"),
    ("data.max_length=1", "int >= 2, got 1"),
    ("data.eval_fraction=1.0", "float in [0, 1), got 1.0"),
    ("checkpoint.save_every=-1", "int >= 0, got -1"),
    ("checkpoint.keep_last=0", "int >= 1, got 0"),
    ("model.attention_block_size=0", "int >= 1, got 0"),
    ("model.logits_chunk_size=-1", "int >= 0, got -1"),
]

RL_BAD = [
    ("rl.prompts_per_step=0", "int >= 1, got 0"),
    ("sampling.n=0", "int >= 1, got 0"),
    ("rl.mini_batches_per_step=0", "int >= 1, got 0"),
    ("rl.ppo_epochs=0", "int >= 1, got 0"),
    ("train.micro_batch_size=0", "int >= 1, got 0"),
    ("train.max_steps=0", "int >= 1 or null, got 0"),
    ("train.num_epochs=0", "int >= 1, got 0"),
    ("sampling.max_new_tokens=0", "int >= 1, got 0"),
    ("sampling.temperature=-0.5", "float >= 0, got -0.5"),
    ("sampling.top_p=0", "float in (0, 1], got 0.0"),
    ("sampling.top_p=1.2", "float in (0, 1], got 1.2"),
    ("sampling.top_k=-1", "int >= 0, got -1"),
    ("sampling.batch_size=0", "int >= 1, got 0"),
    ("rl.clip_low=-0.2", "float >= 0 or null, got -0.2"),
    ("rl.clip_high=-0.2", "float >= 0 or null, got -0.2"),
    ("rl.clip_c=1.0", "float > 1 or null, got 1.0"),
    ("rl.loss_scale_factor=0", "float > 0 or null, got 0.0"),
    ("rl.kl_coef=-0.001", "float >= 0, got -0.001"),
    ("rl.entropy_coef=-0.001", "float >= 0 or null, got -0.001"),
    ("rl.max_generation_rounds=0", "int >= 1, got 0"),
    ("rl.overlong_buffer_len=-1", "int >= 0, got -1"),
    ("rl.overlong_penalty_factor=-1", "float >= 0, got -1.0"),
    ("reward.timeout_s=0", "float > 0, got 0.0"),
    ("reward.num_workers=0", "int >= 1 or null, got 0"),
    ("optimizer.learning_rate=0", "float > 0, got 0.0"),
    ("logging.log_every=0", "int >= 1, got 0"),
    ("data.max_prompt_length=0", "int >= 1, got 0"),
    ("data.limit_per_benchmark=0", "int >= 1 or null, got 0"),
    ("checkpoint.keep_last=0", "int >= 1, got 0"),
    ("model.attention_block_size=-512", "int >= 1, got -512"),
]


@pytest.mark.parametrize("override,expected", SFT_BAD, ids=[o for o, _ in SFT_BAD])
def test_sft_numeric_settings_are_range_checked_at_load(override, expected):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"^config key '{key}': expected {re.escape(expected)}$"):
        load_config(SFTConfig, TINY_SFT, ["model.path=/models/any", override])


@pytest.mark.parametrize("override,expected", RL_BAD, ids=[o for o, _ in RL_BAD])
def test_rl_numeric_settings_are_range_checked_at_load(override, expected):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"^config key '{key}': expected {re.escape(expected)}$"):
        load_config(RLConfig, CONFIGS / "tiny_rl.yaml", ["model.path=/models/any", override])


def test_boundary_values_and_null_are_accepted():
    config = load_config(SFTConfig, TINY_SFT, [
        "model.path=/m", "train.max_steps=1", "train.max_steps=null", "train.num_epochs=1", "optimizer.warmup_ratio=1",
        "optimizer.max_grad_norm=0", "train.eval_every=0", "data.eval_fraction=0", "checkpoint.save_every=0",
        "checkpoint.keep_last=1", "model.logits_chunk_size=0", "model.attention_block_size=1"])
    assert config.train.max_steps is None and config.model.logits_chunk_size == 0
    config = load_config(RLConfig, overrides=["model.path=/m", "validation.sampling.temperature=0", "sampling.top_p=1",
                                              "sampling.top_k=0", "rl.clip_low=0", "rl.loss_scale_factor=null",
                                              "reward.num_workers=null"])
    assert config.validation.sampling.temperature == 0.0 and config.sampling.top_p == 1.0


def _config_classes(cls, seen=None):
    seen = set() if seen is None else seen
    if cls not in seen:
        seen.add(cls)
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[field.name]):
                _config_classes(hints[field.name], seen)
    return seen


@pytest.mark.parametrize("root", [SFTConfig, RLConfig, EvalConfig, PipelineConfig])
def test_every_range_names_a_field_and_every_default_is_in_range(root):
    for cls in _config_classes(root):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        ranges = ranges_of(cls)
        assert set(ranges) <= set(fields), f"{cls.__name__}: ranges for no field: {set(ranges) - set(fields)}"
        defaults = {name: fields[name].default for name in ranges if fields[name].default is not dataclasses.MISSING}
        if defaults:  # from_dict checks the value given; the defaults must pass the same check
            hints = typing.get_type_hints(cls)
            for name, value in defaults.items():
                check_range(value, ranges[name], hints[name], f"{cls.__name__}.{name}")


def test_cli_prints_one_line_and_exits_2_on_an_out_of_range_setting(capsys, tmp_path):
    out = tmp_path / "never"
    for command, override in [("sft", "train.max_steps=0"), ("sft", "train.global_batch_size=0"),
                              ("sft", "train.num_epochs=0"), ("rl", "sampling.n=0"), ("rl", "sampling.top_p=0")]:
        code = main([command, "model.path=/nonexistent/model", f"output_dir={out}", override])
        err = capsys.readouterr().err.strip()
        assert code == 2
        key = override.partition("=")[0]
        assert err.startswith(f"sftrl-jax {command}: error: config key '{key}': expected ") and "\n" not in err
        assert not out.exists()  # refused before anything was written (or a model loaded)


def test_pipeline_stage_settings_are_checked_when_the_config_loads_naming_the_stage():
    with pytest.raises(ConfigError, match=r"stage 2 \(sft\): config key 'train.max_steps': expected int >= 1"):
        load_config(PipelineConfig, overrides=[
            "model.path=/m", "stages=[{kind: rl}, {kind: sft, settings: {train: {max_steps: 0}}}]"])
    with pytest.raises(ConfigError, match=r"stage 1 \(rl\): 'reward' is set once for the whole pipeline"):
        load_config(PipelineConfig, overrides=["model.path=/m", "stages=[{kind: rl, settings: {reward: {}}}]"])


def test_config_reference_shows_the_ranges():
    text = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    assert "| `train.max_steps` | int >= 1 or null | `None` |" in text
    assert "| `sampling.top_p` | float in (0, 1] | `1.0` |" in text


# ------------------------------------------------------------------------- no supervised tokens
@pytest.fixture(scope="module")
def no_tokenizer_model(hf_checkpoint, tmp_path_factory):
    """A model directory whose tokenizer.json / tokenizer_config.json are missing (transformers would build
    a tokenizer that turns every text into no tokens; the run is refused before it reads any data)."""
    root = tmp_path_factory.mktemp("faults")
    model_dir = make_model_dir(hf_checkpoint("qwen2_tied"), root / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_dir / name).unlink()
    return root, model_dir


def test_sft_with_no_supervised_tokens_is_an_error_before_training(no_tokenizer_model, capsys):
    root, model_dir = no_tokenizer_model
    data = write_parquet(luffy_rows(16, seed=1), root / "train.parquet")
    out = root / "sft_out"
    code = main(["sft", "--config", str(TINY_SFT), f"model.path={model_dir}", f"data.train_files=[{data}]",
                 f"output_dir={out}", "train.max_steps=2"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{model_dir}: no tokenizer files" in err and "tokenizer.json" in err  # refused before any data is read
    assert not (out / "final").exists() and not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_rl_with_prompts_of_no_tokens_is_an_error_before_training(no_tokenizer_model, capsys):
    root, model_dir = no_tokenizer_model
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {i}", "answer": str(i)}) + "\n" for i in range(8)))
    out = root / "rl_out"
    code = main(["rl", "--config", str(CONFIGS / "tiny_rl.yaml"), f"model.path={model_dir}",
                 f"data.files=[{prompts}]", f"output_dir={out}", "train.max_steps=1", "rl.prompts_per_step=2"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{model_dir}: no tokenizer files" in err  # refused before any prompt is read
    assert not (out / "final").exists() and not (out / "checkpoints").exists()


# ----------------------------------------------------------------------------------- metrics.jsonl
def _records(steps):
    return [{"step": s, "loss": 1.0 / s} for s in steps]


def test_metrics_torn_last_line_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(range(1, 5))) + '{"step": 5, "lo')
    with caplog.at_level(logging.WARNING, logger="sftrl_jax.metrics"):
        assert read_jsonl(path) == _records(range(1, 5))
    assert str(path) in caplog.text and "torn last line 5" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sftrl_jax.metrics"):
        MetricsWriter(path, truncate_after_step=3)  # what --resume does after restoring step 3
    assert read_jsonl(path) == _records(range(1, 4))
    assert path.read_text().endswith("\n") and str(path) in caplog.text


def test_metrics_corrupt_middle_line_is_reported_and_skipped(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps(r) for r in _records(range(1, 7))]
    lines[2] = lines[2][:9] + "\x00garbage"  # line 3
    lines[4] = "[1, 2]"  # line 5: JSON, but not a record
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="sftrl_jax.metrics"):
        assert read_jsonl(path) == _records([1, 2, 4, 6])
    assert f"{path}: line 3 is corrupt" in caplog.text and f"{path}: line 5 is corrupt" in caplog.text
    MetricsWriter(path, truncate_after_step=4)
    assert read_jsonl(path) == _records([1, 2, 4])


@pytest.mark.slow
def test_sft_resume_with_a_torn_metrics_line(hf_checkpoint, tmp_path, capsys):
    model_dir = make_model_dir(hf_checkpoint("qwen2_tied"), tmp_path / "model")
    data = write_parquet(luffy_rows(16, seed=2), tmp_path / "train.parquet")
    args = ["sft", "--config", str(TINY_SFT), f"model.path={model_dir}", f"data.train_files=[{data}]",
            f"output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.eval_every=0", "data.eval_fraction=0",
            "checkpoint.save_every=1"]
    assert main(args) == 0
    metrics = tmp_path / "run" / "metrics.jsonl"
    before = read_jsonl(metrics)
    assert [r["step"] for r in before] == [1, 2]
    with metrics.open("a") as f:
        f.write('{"step": 3, "loss": 0.12')  # a kill in the middle of a write
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0, capsys.readouterr().err
    assert read_jsonl(metrics) == before


# ------------------------------------------------------------------------------- generations.jsonl
def _perfect(items, n):
    return [Completion(f"\\boxed{{{item.ground_truth}}}", 5, False) for item in items for _ in range(n)]


def test_eval_keeps_every_valid_generation_around_a_corrupt_line(hf_checkpoint, tmp_path, caplog):
    model_dir = make_model_dir(hf_checkpoint("qwen2_tied"), tmp_path / "model")
    data = tmp_path / "plain.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is {i}+1?", "answer": str(i + 1)}) + "\n"
                            for i in range(6)))
    config = load_config(EvalConfig, overrides=[f"model.path={model_dir}", f"data.files=[{data}]", "sampling.n=2",
                                                "reward.num_workers=1", f"output_dir={tmp_path / 'eval'}"])
    expected = run_eval(config, generator=_perfect, progress=False)
    generations = tmp_path / "eval" / "generations.jsonl"
    lines = generations.read_text().splitlines()
    assert len(lines) == 12
    lines[5] = lines[5][: len(lines[5]) // 2]  # prompt 2, sample 1: cut in the middle of the file
    lines[-1] = lines[-1][:10]  # prompt 5, sample 1: a torn last line
    generations.write_text("\n".join(lines))

    calls = []

    def recording(items, n):
        calls.append([item.prompt_id for item in items])
        return _perfect(items, n)

    with caplog.at_level(logging.WARNING, logger="sftrl_jax.metrics"):
        resumed = run_eval(config, generator=recording, progress=False)
    assert calls == [[2, 5]]  # only the prompts whose samples were lost, not everything after line 6
    assert f"{generations}: line 6 is corrupt" in caplog.text
    assert f"{generations}: dropped a torn last line 12" in caplog.text
    assert resumed == expected
    records = [json.loads(line) for line in generations.read_text().splitlines()]
    assert sorted((r["prompt_id"], r["sample"]) for r in records) == [(p, s) for p in range(6) for s in range(2)]
