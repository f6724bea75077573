"""CoLA (the Corpus of Linguistic Acceptability, GLUE) as an SFT and RL task: acceptability judgement.

A CoLA row is ``{sentence, label, idx}`` with label 1 (acceptable) or 0 (unacceptable); GLUE's test split
has no labels (-1). :func:`cola_rows` turns each labelled row into one row of the LUFFY layout that SFT and
RL both read (the same file feeds both stages):

- ``prompt``: one user message, :data:`QUESTION` and the sentence;
- ``target``: the assistant's answer, the label word (:data:`LABEL_WORDS`), what SFT trains on;
- ``reward_model.ground_truth``: the label word, graded by ``reward.kind: label`` (the answer's last line or
  last ``\\boxed{}``, normalised, compared exactly);
- ``data_source`` ``cola``, ``extra_info.idx`` the CoLA row's index.

Sources are whatever :func:`sftrl_jax.data.sources.load_rows` reads: ``tfds:glue/cola/train`` (TensorFlow
Datasets), the hub's ``nyu-mll/glue`` with its ``cola`` config, or a local CoLA-format file.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from collections.abc import Iterable
from pathlib import Path

from .sources import UnreadableRow, load_rows

log = logging.getLogger("sftrl_jax.data")

QUESTION = ("Is the following sentence grammatically acceptable in English? "
            "Answer with one word: acceptable or unacceptable.")
LABEL_WORDS = {0: "unacceptable", 1: "acceptable"}
BENCHMARK = "cola"


def cola_prompt(sentence: str) -> list[dict]:
    """The chat messages that ask for ``sentence``'s acceptability."""
    return [{"role": "user", "content": f"{QUESTION}\n\nSentence: {sentence.strip()}"}]


def label_word(label) -> str:
    """CoLA's 0/1 label as its word; a ValueError for anything else (GLUE's unlabelled -1 included)."""
    if isinstance(label, bool) or not isinstance(label, numbers.Real) or not math.isfinite(label) or \
            label != int(label):
        raise ValueError(f"label {label!r} is not 0 or 1")
    if int(label) not in LABEL_WORDS:
        raise ValueError(f"label {label!r} is not 0 or 1 (GLUE's test split is unlabelled: -1)")
    return LABEL_WORDS[int(label)]


def cola_row(sentence: str, label, idx: int) -> dict:
    """One labelled CoLA sentence as a row of the LUFFY layout (prompt, target, ground truth)."""
    if not isinstance(sentence, str) or not sentence.strip():
        raise ValueError("no sentence")
    word = label_word(label)
    return {"data_source": BENCHMARK, "prompt": cola_prompt(sentence),
            "target": [{"role": "assistant", "content": word}],
            "reward_model": {"style": "rule", "ground_truth": word}, "extra_info": {"idx": int(idx)}}


def cola_rows(source: str | Iterable[str], *, split: str = "train") -> tuple[list[dict], dict[str, int]]:
    """The labelled rows of a CoLA source (see the module docstring), and how many were skipped (``bad_rows``:
    unreadable, no sentence, or a label other than 0/1, each logged with its file and row)."""
    rows, skipped = [], {"bad_rows": 0}
    for name, index, row in load_rows(source, split=split):
        try:
            if isinstance(row, UnreadableRow):
                raise ValueError(row.problem)
            rows.append(cola_row(row.get("sentence"), row.get("label"), row.get("idx", index)))
        except (ValueError, TypeError) as err:
            skipped["bad_rows"] += 1
            log.warning("%s row %d: %s (skipped)", name, index, err)
    return rows, skipped


def write_rows(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write ``rows`` to ``path`` (``.parquet`` or ``.jsonl``), through a temporary file renamed into place."""
    path = Path(path)
    if path.suffix not in (".parquet", ".jsonl"):
        raise ValueError(f"{path}: write .parquet or .jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    else:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)
    return path
