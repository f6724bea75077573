"""Unreadable inputs are one-line errors naming the file, line or key."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from sftrl_jax.cli import main
from sftrl_jax.config import ConfigError, load_config
from sftrl_jax.data import (
    PromptDataOptions,
    SFTDataOptions,
    load_prompt_items,
    load_rows,
    tokenize_sft,
)
from sftrl_jax.data.sources import UnreadableRow
from sftrl_jax.sft import SFTConfig

pytestmark = pytest.mark.usefixtures("isolated_datasets_cache")  # fixtures: tests/conftest.py


def sft_row(answer: str = "two") -> dict:
    return {"prompt": [{"role": "user", "content": "1+1?"}], "target": [{"role": "assistant", "content": answer}],
            "reward_model": {"ground_truth": "2"}}


def cli_error(capsys, argv) -> str:
    capsys.readouterr()  # drop fixture output (checkpoint writing progress)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


# ------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("name", ["train.parquet", "train.jsonl"])
def test_an_empty_data_file_is_named(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{path}: empty file"):
        list(load_rows(str(path)))


def test_a_corrupt_parquet_file_is_named(tmp_path):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(ValueError, match=rf"{path}: cannot read as parquet"):
        list(load_rows(str(path)))


def write_lines(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_a_malformed_jsonl_line_is_a_bad_row_naming_file_and_line(tmp_path, tokenizer, caplog):
    good = json.dumps(sft_row()).encode()
    path = write_lines(tmp_path / "train.jsonl", [good, b'{"prompt": "x",', b"", good, b"[1, 2]"])
    rows = list(load_rows(str(path)))
    assert [index for _, index, _ in rows] == [0, 1, 2, 3]
    assert isinstance(rows[1][2], UnreadableRow) and "line 2 is not valid JSON" in rows[1][2].problem
    assert "line 5 is a JSON list" in rows[3][2].problem
    with pytest.raises(ValueError, match=rf"{path} row 1: line 2 is not valid JSON"):
        tokenize_sft(load_rows(str(path)), tokenizer, SFTDataOptions(on_bad_row="error"))
    with caplog.at_level(logging.WARNING, "sftrl_jax.data"):
        examples, stats = tokenize_sft(load_rows(str(path)), tokenizer, SFTDataOptions(on_bad_row="skip"))
    assert (len(examples), stats.rows, stats.bad_rows) == (2, 4, 2)
    assert f"{path} row 1: line 2 is not valid JSON" in caplog.text


def test_non_utf8_bytes_in_jsonl_are_a_bad_row_naming_file_and_line(tmp_path, tokenizer, caplog):
    good = json.dumps(sft_row()).encode()
    bad = json.dumps(sft_row("caf\u00e9")).encode().replace(b"\\u00e9", b"\xe9")  # latin-1, not UTF-8
    path = write_lines(tmp_path / "train.jsonl", [good, bad, good])
    with pytest.raises(ValueError, match=rf"{path} row 1: line 2 is not UTF-8 text \(byte 0xe9"):
        tokenize_sft(load_rows(str(path)), tokenizer, SFTDataOptions(on_bad_row="error"))
    examples, stats = tokenize_sft(load_rows(str(path)), tokenizer, SFTDataOptions(on_bad_row="skip"))
    assert (len(examples), stats.bad_rows) == (2, 1)
    # RL / eval prompts skip (and count) the same rows
    with caplog.at_level(logging.WARNING):
        items, skipped = load_prompt_items(PromptDataOptions(files=[str(path)]), tokenizer)
    assert (len(items), skipped["bad_rows"]) == (2, 1)
    assert f"{path} row 1: line 2 is not UTF-8" in caplog.text


def test_a_broken_json_array_file_is_named(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"prompt": "x"},\n  {"prompt": }\n]\n')
    with pytest.raises(ValueError, match=rf"{path}: invalid JSON at line 3"):
        list(load_rows(str(path)))


def test_a_well_formed_jsonl_file_still_goes_through_datasets(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(sft_row()).encode()] * 2)
    rows = list(load_rows(str(path)))
    assert [(source, index) for source, index, _ in rows] == [(str(path), 0), (str(path), 1)]
    assert all(isinstance(row, dict) for _, _, row in rows)


# ------------------------------------------------------------------------------------------ models
@pytest.fixture
def model_dir(hf_checkpoint, tmp_path):
    return shutil.copytree(hf_checkpoint("qwen2_tied"), tmp_path / "model")


@pytest.mark.parametrize("keep", [0, 20, 0.5])
def test_an_empty_or_truncated_safetensors_file_is_named(model_dir, tmp_path, capsys, keep):
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    err = cli_error(capsys, ["convert", str(model_dir), str(tmp_path / "out")])
    assert err.startswith(f"sftrl-jax convert: error: {weights}: not a readable safetensors file")
    assert not (tmp_path / "out").exists()


def test_a_truncated_safetensors_shard_is_named(hf_checkpoint, tmp_path, capsys):
    model_dir = shutil.copytree(hf_checkpoint("qwen2_sharded"), tmp_path / "model")
    shard = max(model_dir.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    err = cli_error(capsys, ["convert", str(model_dir), str(tmp_path / "out")])
    assert err.startswith(f"sftrl-jax convert: error: {shard}: not a readable safetensors file")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_invalid_json_in_a_model_directory_is_named(hf_checkpoint, tmp_path, capsys, name):
    model_dir = shutil.copytree(hf_checkpoint("qwen2_sharded"), tmp_path / "model")
    (model_dir / name).write_text('{"model_type": "qwen2",\n  "hidden_size": }\n')
    err = cli_error(capsys, ["convert", str(model_dir), str(tmp_path / "out")])
    assert err.startswith(f"sftrl-jax convert: error: {model_dir / name}: invalid JSON at line 2")


# ------------------------------------------------------------------------------------------ config
def test_a_duplicate_yaml_key_names_the_key_and_file(tmp_path, capsys):
    path = tmp_path / "sft.yaml"
    path.write_text("model:\n  path: /m\noptimizer:\n  learning_rate: 1.0e-5\n  weight_decay: 0.0\n"
                    "  learning_rate: 1.0e-4\n")
    with pytest.raises(ConfigError, match=rf"{path}: duplicate key 'learning_rate' at line 6 "
                                          r"\(first given at line 4"):
        load_config(SFTConfig, path)
    err = cli_error(capsys, ["sft", "--config", str(path), f"output_dir={tmp_path / 'out'}"])
    assert "duplicate key 'learning_rate'" in err and str(path) in err


def test_yaml_merge_keys_may_still_override(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("defaults: &defaults\n  max_steps: 3\n  num_epochs: 2\n"
                    "model:\n  path: /m\ntrain:\n  <<: *defaults\n  max_steps: 4\n")
    with pytest.raises(ConfigError) as info:  # "defaults" is no section; the merge itself is accepted
        load_config(SFTConfig, path)
    assert "duplicate" not in str(info.value)
