"""``sftrl-jax split``: a deterministic held-out file carved out of a training file (sftrl_jax/data/split.py)."""

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from sft_fixtures import luffy_rows, write_parquet
from sftrl_jax.cli import main
from sftrl_jax.data.sources import load_rows
from sftrl_jax.data.split import heldout_rows, split_file


def _ids(path):
    """The rows' ``extra_info.index`` in file order."""
    if path.suffix == ".parquet":
        return [row["extra_info"]["index"] for row in pq.read_table(path).to_pylist()]
    return [json.loads(line)["extra_info"]["index"] for line in path.read_text().splitlines()]


def _jsonl(rows, path):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_split_is_deterministic_disjoint_complete_and_keeps_order(tmp_path, fmt):
    rows = luffy_rows(40)
    src = write_parquet(rows, tmp_path / "src.parquet") if fmt == "parquet" else _jsonl(rows, tmp_path / "src.jsonl")
    out = {name: tmp_path / f"{name}.{fmt}" for name in ("train", "held", "train2", "held2", "train3", "held3")}
    result = split_file(src, out["train"], out["held"], heldout=7, seed=3)
    assert (result.rows, result.train_rows, result.heldout_rows) == (40, 33, 7)
    train, held = _ids(out["train"]), _ids(out["held"])
    assert len(held) == 7 and len(train) == 33
    assert sorted(train + held) == list(range(40))  # every row in exactly one output
    assert train == sorted(train) and held == sorted(held)  # the source's order
    assert held == heldout_rows(40, 7, 3).tolist()  # the choice depends only on (rows, count, seed)

    split_file(src, out["train2"], out["held2"], heldout=7, seed=3)  # same seed: byte-identical files
    assert out["train2"].read_bytes() == out["train"].read_bytes()
    assert out["held2"].read_bytes() == out["held"].read_bytes()
    split_file(src, out["train3"], out["held3"], heldout=7, seed=4)  # another seed: another choice
    assert _ids(out["held3"]) != held


def test_parquet_rows_come_back_whole_and_readable_by_the_loaders(tmp_path, isolated_datasets_cache):
    rows = luffy_rows(12)
    src = write_parquet(rows, tmp_path / "src.parquet")
    split_file(src, tmp_path / "train.parquet", tmp_path / "held.parquet", heldout=4, seed=0)
    assert pq.read_schema(tmp_path / "held.parquet").equals(pq.read_schema(src))  # schema kept
    held = pd.read_parquet(tmp_path / "held.parquet")
    assert held.index.tolist() == list(range(4))  # no stale index from the source
    original = {row["extra_info"]["index"]: row for row in pq.read_table(src).to_pylist()}
    for row in pq.read_table(tmp_path / "held.parquet").to_pylist():
        assert row == original[row["extra_info"]["index"]]  # nested prompt/target/reward_model unchanged
    loaded = [row for _, _, row in load_rows([str(tmp_path / "held.parquet")])]  # what sft / the probe read
    assert [row["target"][0]["content"] for row in loaded] == [
        original[row["extra_info"]["index"]]["target"][0]["content"] for row in loaded]


def test_jsonl_lines_are_copied_byte_for_byte(tmp_path):
    lines = [json.dumps({"prompt": f"q{i}", "response": f"a{i}", "extra_info": {"index": i}}, indent=None)
             for i in range(10)]
    lines[3] = lines[3].replace(": ", ":")  # unusual but valid spacing survives
    src = tmp_path / "src.jsonl"
    src.write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]))  # a blank line, no final newline
    split_file(src, tmp_path / "train.jsonl", tmp_path / "held.jsonl", heldout=3, seed=1)
    out = (tmp_path / "train.jsonl").read_text().splitlines() + (tmp_path / "held.jsonl").read_text().splitlines()
    assert sorted(out) == sorted(lines)


def test_errors_name_the_file(tmp_path):
    src = write_parquet(luffy_rows(5), tmp_path / "src.parquet")
    with pytest.raises(ValueError, match=r"src\.parquet: 5 rows; --heldout 5 must leave at least one training row"):
        split_file(src, tmp_path / "a.parquet", tmp_path / "b.parquet", heldout=5)
    with pytest.raises(ValueError, match=r"--out-heldout .*b\.jsonl: the source .*src\.parquet is parquet"):
        split_file(src, tmp_path / "a.parquet", tmp_path / "b.jsonl", heldout=1)
    with pytest.raises(ValueError, match=r"source .*src\.csv: unsupported extension '\.csv'"):
        split_file(tmp_path / "src.csv", tmp_path / "a.csv", tmp_path / "b.csv", heldout=1)
    with pytest.raises(FileNotFoundError, match=r"missing\.parquet: no such file"):
        split_file(tmp_path / "missing.parquet", tmp_path / "a.parquet", tmp_path / "b.parquet", heldout=1)
    with pytest.raises(ValueError, match=r"--out-train .*src\.parquet is the source file itself"):
        split_file(src, src, tmp_path / "b.parquet", heldout=1)
    with pytest.raises(ValueError, match="the same file"):
        split_file(src, tmp_path / "a.parquet", tmp_path / "a.parquet", heldout=1)
    with pytest.raises(ValueError, match="--heldout must be at least 1"):
        split_file(src, tmp_path / "a.parquet", tmp_path / "b.parquet", heldout=0)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: cannot read as parquet"):
        split_file(bad, tmp_path / "a.parquet", tmp_path / "b.parquet", heldout=1)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "q"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl line 2: not a JSON line"):
        split_file(broken, tmp_path / "a.jsonl", tmp_path / "b.jsonl", heldout=1)
    assert not (tmp_path / "a.parquet").exists() and not (tmp_path / "a.jsonl").exists()  # nothing half-written


def test_cli_split(tmp_path, capsys):
    src = write_parquet(luffy_rows(20), tmp_path / "openr1.parquet")
    train, held = tmp_path / "data" / "sft_train.parquet", tmp_path / "data" / "heldout_sft.parquet"
    assert main(["split", str(src), "--out-train", str(train), "--out-heldout", str(held),
                 "--heldout", "5", "--seed", "0"]) == 0
    assert "(20 rows) ->" in capsys.readouterr().out and len(_ids(held)) == 5 and len(_ids(train)) == 15
    assert main(["split", str(src), "--out-train", str(train), "--out-heldout", str(held), "--heldout", "50"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sftrl-jax split: error:") and "openr1.parquet: 20 rows" in err
