"""Carve a held-out file out of a training file, deterministically (``sftrl-jax split``).

    sftrl-jax split data/openr1.parquet --out-train data/sft_train.parquet \\
        --out-heldout data/heldout_sft.parquet --heldout 256 --seed 0

Which rows are held out depends only on the number of rows and the seed (the first ``N`` of a
seeded permutation of the row numbers), so the same file and seed always give the same split. Both
outputs keep the source's row order, every source row lands in exactly one of them, and the format
is the source's: parquet in, parquet out (the Arrow schema and its metadata kept), JSON lines in,
JSON lines out (each line copied byte for byte). A held-out slice made this way is what the
pipeline's probe reads (``probe.sft_files``) while the SFT stage trains on the rest.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl"}


@dataclasses.dataclass(frozen=True)
class SplitResult:
    source: Path
    train: Path
    heldout: Path
    rows: int  # rows of the source
    heldout_rows: int
    seed: int

    @property
    def train_rows(self) -> int:
        return self.rows - self.heldout_rows

    def summary(self) -> str:
        return (f"{self.source} ({self.rows} rows) -> {self.train} ({self.train_rows} rows), "
                f"{self.heldout} ({self.heldout_rows} rows held out, seed {self.seed})")


def heldout_rows(rows: int, count: int, seed: int) -> np.ndarray:
    """Sorted row numbers of the ``count`` held-out rows among ``rows``: the first ``count`` of a
    permutation drawn from ``numpy.random.default_rng(seed)``."""
    order = np.random.default_rng(seed).permutation(rows)
    return np.sort(order[:count])


def split_file(source: str | os.PathLike, out_train: str | os.PathLike, out_heldout: str | os.PathLike, *,
               heldout: int, seed: int = 0) -> SplitResult:
    """Write ``out_train`` and ``out_heldout`` from ``source`` (see the module docstring).

    ``heldout`` must leave at least one training row. A problem (missing or unreadable source,
    an output in another format, an output that is the source, too few rows) is a ``ValueError``
    or ``FileNotFoundError`` naming the file.
    """
    source, out_train, out_heldout = Path(source), Path(out_train), Path(out_heldout)
    fmt = _format(source, "source")
    for path, role in ((out_train, "--out-train"), (out_heldout, "--out-heldout")):
        if _format(path, role) != fmt:
            raise ValueError(f"{role} {path}: the source {source} is {fmt}; write the same format "
                             f"(a {_suffix(fmt)} file)")
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file")
    if _same(out_train, out_heldout):
        raise ValueError(f"--out-train and --out-heldout are the same file: {out_train}")
    for path, role in ((out_train, "--out-train"), (out_heldout, "--out-heldout")):
        if _same(path, source):
            raise ValueError(f"{role} {path} is the source file itself; write the split elsewhere")
    if heldout < 1:
        raise ValueError(f"--heldout must be at least 1, got {heldout}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")

    rows = _read_parquet(source) if fmt == "parquet" else _read_jsonl(source)
    count = rows.num_rows if fmt == "parquet" else len(rows)
    if heldout >= count:
        raise ValueError(f"{source}: {count} rows; --heldout {heldout} must leave at least one training row "
                         f"(at most {count - 1})")
    held = np.zeros(count, dtype=bool)
    held[heldout_rows(count, heldout, seed)] = True
    for path in (out_train, out_heldout):
        path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        _write_parquet(rows, np.flatnonzero(~held), out_train)
        _write_parquet(rows, np.flatnonzero(held), out_heldout)
    else:
        _write_jsonl([line for line, h in zip(rows, held) if not h], out_train)
        _write_jsonl([line for line, h in zip(rows, held) if h], out_heldout)
    return SplitResult(source, out_train, out_heldout, count, heldout, seed)


def _format(path: Path, role: str) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{role} {path}: unsupported extension {path.suffix!r} (expected .parquet or .jsonl)")
    return fmt


def _suffix(fmt: str) -> str:
    return next(suffix for suffix, name in FORMATS.items() if name == fmt)


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"{path}: cannot read as parquet: {err}") from None


def _read_jsonl(path: Path) -> list[bytes]:
    """The file's rows: its non-blank lines, each checked to be a JSON object, kept as raw bytes."""
    lines = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"{path} line {number}: not a JSON line ({err})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {number}: a row must be a JSON object, got {type(row).__name__}")
            lines.append(line if line.endswith(b"\n") else line + b"\n")
    return lines


def _write_parquet(table, indices: np.ndarray, path: Path) -> None:
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table.take(indices), tmp)
    os.replace(tmp, path)


def _write_jsonl(lines: list[bytes], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(lines))
    os.replace(tmp, path)
