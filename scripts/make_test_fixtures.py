"""Cut the small slice of the LUFFY evaluation parquet files that the tests read (tests/fixtures/luffy-eval/).

    python scripts/make_test_fixtures.py [--source ../shared/data/luffy-eval] [--out tests/fixtures/luffy-eval]

The source is the verl/LUFFY evaluation set kept beside the checkout (``../shared/data/luffy-eval``). Per
benchmark (``data_source``) it keeps the first few distinct problems (AIME and AMC repeat each problem several
times) plus the first few whose ground truth is not a plain number (fractions, intervals, tuples, expressions:
the ones math-verify has to parse), in file order. The rows are taken with pyarrow and written back with the
source's exact schema and metadata (pandas index included), so a slice reads like the original. Deterministic:
running it again on the same source writes the same rows.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "luffy-eval"
OUT = ROOT / "tests" / "fixtures" / "luffy-eval"

# file -> (first distinct problems per benchmark, extra problems per benchmark whose answer is not a number)
FILES = {
    "valid.parquet": (4, 6),  # aime, amc, math, minerva, olympiad_bench
    "valid.all.parquet": (2, 0),  # the same five plus aime25
    "valid.gpqa.parquet": (4, 0),  # multiple choice, ground truth a letter
    "valid.arc_c.parquet": (4, 0),
}
NUMBER = re.compile(r"-?\d+(\.\d+)?")


def _rows(table, first: int, non_number: int) -> list[int]:
    """Row positions to keep, in file order."""
    sources = table.column("data_source").to_pylist()
    truths = [r["ground_truth"].strip() for r in table.column("reward_model").to_pylist()]
    problems = [messages[-1]["content"] for messages in table.column("prompt").to_pylist()]
    keep: list[int] = []
    for benchmark in dict.fromkeys(sources):
        seen: set[str] = set()
        distinct = []
        for i, source in enumerate(sources):
            if source == benchmark and problems[i] not in seen:
                seen.add(problems[i])
                distinct.append(i)
        keep += distinct[:first]
        keep += [i for i in distinct[first:] if not NUMBER.fullmatch(truths[i])][:non_number]
    return sorted(keep)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (first, non_number) in FILES.items():
        table = pq.read_table(args.source / name)
        part = table.take(_rows(table, first, non_number))
        pq.write_table(part, args.out / name, compression="zstd")
        counts = {}
        for source in part.column("data_source").to_pylist():
            counts[source] = counts.get(source, 0) + 1
        size = (args.out / name).stat().st_size
        print(f"{name}: {part.num_rows} of {table.num_rows} rows {counts} ({size} bytes)")


if __name__ == "__main__":
    main()
