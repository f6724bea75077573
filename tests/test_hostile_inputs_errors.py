"""Ordinary mistakes get one-line errors: each test names the mistake, and the error names the file or key
and what to do (exit code 2, no traceback)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import pytest

from sft_fixtures import make_model_dir
from sftrl_jax.cli import main
from sftrl_jax.config import ConfigError, check_range, load_config
from sftrl_jax.data import load_rows
from sftrl_jax.evaluation import EvalConfig, print_table
from sftrl_jax.rewards.scoring import Reward
from sftrl_jax.run_folder import RunFolderError, check_continuity
from sftrl_jax.sft import SFTConfig

pytestmark = pytest.mark.usefixtures("isolated_datasets_cache")  # fixtures: tests/conftest.py


def cli_error(capsys, argv, *, progress: bool = False) -> str:
    """The one-line error of ``sftrl-jax argv`` (``progress``: after progress output, e.g. reading data)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    if progress:
        err = err.splitlines()[-1]
    assert "\n" not in err and err.startswith(f"sftrl-jax {argv[0]}: error: "), err
    return err


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text(f"model:\n  path: {tmp_path / 'model'}\noutput_dir: {tmp_path / 'out'}\n")
    return path


@pytest.fixture(scope="module")
def model_dir(hf_checkpoint, tmp_path_factory):
    return make_model_dir(hf_checkpoint("qwen2_tied"), tmp_path_factory.mktemp("hostile") / "model")


# ------------------------------------------------------------------------------------------ config
def test_an_override_that_is_not_valid_yaml(config_file, capsys):
    err = cli_error(capsys, ["sft", "--config", str(config_file), "train.max_steps=[1,"])
    assert "override 'train.max_steps=[1,'" in err and "not valid YAML" in err


def test_a_directory_given_as_config(tmp_path, capsys):
    err = cli_error(capsys, ["sft", "--config", str(tmp_path)])
    assert f"{tmp_path}: a directory, not a config file" in err


def test_kind_null_in_a_config_file(tmp_path, capsys):
    path = tmp_path / "sft.yaml"
    path.write_text("kind: null\nmodel:\n  path: /m\n")
    err = cli_error(capsys, ["sft", "--config", str(path)])
    assert f"{path}: config key 'kind'" in err and "None" not in err.split("got")[0] and "'sft'" in err


def test_a_binary_config_file(tmp_path, capsys):
    path = tmp_path / "sft.yaml"
    path.write_bytes(b"model:\n  path: \xd0\xff\x00\x01")
    err = cli_error(capsys, ["sft", "--config", str(path)])
    assert f"{path}: not a UTF-8 text file" in err


@pytest.mark.parametrize("override", ["reward.correct=nan", "reward.wrong=-.inf", "reward.timeout_s=.inf",
                                      "reward.correct=NaN"])
def test_a_non_finite_float_setting(override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"config key '{key}': expected (a finite number|float > 0), got"):
        load_config(EvalConfig, overrides=["model.path=/m", override])


def test_a_non_finite_value_fails_every_float_range_check():
    for value in (math.nan, math.inf, -math.inf):
        for spec in (">= 0", "> -inf", "<= inf", "[-inf, inf]"):
            with pytest.raises(ConfigError, match="config key 'k'"):
                check_range(value, spec, float, "k")


def test_an_empty_run_record_on_resume(tmp_path):
    config = load_config(SFTConfig, overrides=["model.path=/m"])
    for text in ("", "\n", "[]\n"):
        record = tmp_path / "config.yaml"
        record.write_text(text)
        with pytest.raises(RunFolderError) as info:
            check_continuity(record, config)
        message = str(info.value)
        assert "\n" not in message and f"{record}: the run's record of its settings is" in message
        assert "--force" in message and "differ" not in message  # no list of every setting as a "change"
        check_continuity(record, config, force=True)  # --force resumes without the check
    record.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(RunFolderError, match="not UTF-8 text"):
        check_continuity(record, config)


# -------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("spec", ["data/train.parqet", "data/trian.jsonl", "./train", "../data/train",
                                  "/nonexistent/train"])
def test_a_data_path_typo_is_no_such_file_not_a_hub_lookup(spec, tmp_path, monkeypatch):
    from sftrl_jax.data import sources

    def no_hub(*args, **kwargs):
        raise AssertionError(f"looked up on the hub: {args}")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sources, "_load_dataset", no_hub)
    with pytest.raises(FileNotFoundError, match=rf"{spec}: no such file"):
        list(load_rows(spec))


@pytest.mark.parametrize("spec", ["gsm8k", "openai/gsm8k", "AI-MO/NuminaMath-1.5"])
def test_hub_ids_still_go_to_the_hub(spec, tmp_path, monkeypatch):
    from sftrl_jax.data import sources

    asked = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sources, "_load_dataset", lambda *args, **kwargs: asked.append(args) or [])
    assert list(load_rows(spec)) == [] and asked == [(spec,)]


def test_tfds_without_the_extra(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails as if not installed
    err = cli_error(capsys, ["eval", f"model.path={model_dir}", "data.files=[tfds:gsm8k]",
                             f"output_dir={tmp_path / 'out'}", "reward.num_workers=1"])
    assert "tfds:gsm8k" in err and "pip install 'sftrl-jax[tfds]'" in err


# ------------------------------------------------------------------------------------ model folders
def test_a_model_folder_without_tokenizer_files(hf_checkpoint, tmp_path, capsys):
    folder = shutil.copytree(hf_checkpoint("qwen2_tied"), tmp_path / "model")  # weights and config only
    err = cli_error(capsys, ["eval", f"model.path={folder}", f"output_dir={tmp_path / 'out'}"])
    assert f"{folder}: no tokenizer files" in err and "tokenizer.json" in err and "sentencepiece" not in err


# ------------------------------------------------------------------------------- evaluation, scoring
def test_rich_markup_in_a_benchmark_name(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # wide enough that no name is cut
    metrics = {"prompts": 1, "problems": 1, "attempts": 1, "accuracy": 0.5, "avg@1": 0.5}
    results = {"grader": "math", "benchmarks": {"[bold": metrics, "a[/]b": metrics, "[red]x[/red]": metrics},
               "math_average": 0.5, "ood_average": None}
    print_table(results)
    printed = capsys.readouterr().out
    assert "[bold" in printed and "a[/]b" in printed and "[red]x[/red]" in printed


def test_a_wrong_length_reward_fn_result():
    def two_scores(responses, ground_truths, token_ids):
        return [1.0, 0.0]

    with pytest.raises(ValueError, match=r"reward_fn .*two_scores returned 2 scores for 3 responses"):
        Reward(reward_fn=two_scores).score_batch(["a", "b", "c"], ["1", "2", "3"])


def test_eval_with_an_absurd_max_new_tokens(model_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    err = cli_error(capsys, ["eval", f"model.path={model_dir}", f"data.files=[{data}]", "reward.num_workers=1",
                             "sampling.max_new_tokens=1000000000", f"output_dir={tmp_path / 'out'}"], progress=True)
    assert "sampling.max_new_tokens" in err


def test_the_sampler_refuses_buffers_past_memory_before_allocating(hf_checkpoint):
    from sftrl_jax.models import ModelOptions, load_pretrained
    from sftrl_jax.sampling import generate
    from sftrl_jax.sharding import make_mesh

    model, _ = load_pretrained(ModelOptions(path=str(hf_checkpoint("qwen2_tied")), dtype="float32"),
                               make_mesh({"fsdp": -1}))
    with pytest.raises(ValueError, match=r"sampling.max_new_tokens .*1000000000.*memory"):
        generate(model, [[1, 2, 3]], max_new_tokens=10**9)


# ------------------------------------------------------------------------------------------ start-up
NOISE = ("cudart_stub", "Unable to load CUDA", "could not determine TPU accelerator type",
         "absl::InitializeLog", "Traceback", "Jax plugin configuration error")


def test_a_cpu_run_starts_without_plugin_noise(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL")}
    run = subprocess.run([sys.executable, "-m", "sftrl_jax.cli", "convert", str(tmp_path / "missing"),
                          str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "sftrl-jax convert: error:" in run.stderr
    assert not [line for line in run.stderr.splitlines() if any(n in line for n in NOISE)], run.stderr
