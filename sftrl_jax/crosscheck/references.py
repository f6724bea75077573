"""Per-step training logs of another framework's run, as ``[{step, loss, grad_norm}]``.

Three formats are read, chosen by the file's content and suffix:

* a Hugging Face Trainer ``trainer_state.json``: its ``log_history`` entries that have ``step`` and
  ``loss`` (the evaluation entries and the end-of-training summary have no ``loss`` and are left out);
* JSON lines (``.jsonl``), one ``{"step", "loss", "grad_norm"}`` object per line (``grad_norm`` may be
  left out or null), or a ``.json`` file holding a list of such objects;
* a Weights & Biases CSV export (``.csv``): the step column (``train/global_step``, else ``Step``,
  ``step``, ``global_step`` or ``_step``) and the one column whose name ends in ``loss`` and the one
  ending in ``grad_norm`` (``train/loss``, ``run-name - train/loss``; W&B's ``__MIN`` / ``__MAX``
  columns and evaluation columns are left out). Rows with an empty loss cell are skipped.

Steps must be positive and increasing. Every problem is one ``ValueError`` line naming the file and
the line, row or key.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

STEP_COLUMNS = ("train/global_step", "Step", "step", "global_step", "_step")


def read_reference(path: str | Path) -> list[dict]:
    """``[{"step": int, "loss": float, "grad_norm": float | None}]`` of the log file ``path``, by step."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--reference {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        steps = _read_csv(path)
    elif suffix == ".jsonl":
        steps = _read_jsonl(path)
    else:
        steps = _read_json(path)
    if not steps:
        raise ValueError(f"{path}: no training steps with a loss found")
    for before, after in zip(steps, steps[1:]):
        if after["step"] <= before["step"]:
            raise ValueError(f"{path}: {after['where']}: step {after['step']} does not come after step "
                             f"{before['step']} (steps must increase)")
    return [{k: v for k, v in s.items() if k != "where"} for s in steps]


def _number(value, path: Path, where: str, key: str, *, optional: bool = False) -> float | None:
    """``value`` as a finite float (None where ``optional`` and missing); a ValueError names the place."""
    if value is None or value == "":
        if optional:
            return None
        raise ValueError(f"{path}: {where}: no {key!r}")
    if isinstance(value, bool):
        raise ValueError(f"{path}: {where}: {key!r} is {value!r}, not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {where}: {key!r} is {value!r}, not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{path}: {where}: {key!r} is {value!r}, not a finite number")
    return number


def _step(value, path: Path, where: str, key: str = "step") -> int:
    number = _number(value, path, where, key)
    if number != int(number) or number < 1:
        raise ValueError(f"{path}: {where}: {key!r} is {value!r}, not a positive whole step number")
    return int(number)


def _entry(record, path: Path, where: str) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{path}: {where}: expected an object with step, loss, grad_norm, got {type(record).__name__}")
    return {"step": _step(record.get("step"), path, where), "loss": _number(record.get("loss"), path, where, "loss"),
            "grad_norm": _number(record.get("grad_norm"), path, where, "grad_norm", optional=True), "where": where}


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a JSON file ({err}); give a trainer_state.json, a .jsonl or a W&B .csv "
                         "export") from None
    if isinstance(data, dict):
        if "log_history" not in data:
            raise ValueError(f"{path}: a JSON object without 'log_history' (not a Hugging Face trainer_state.json)")
        history = data["log_history"]
        if not isinstance(history, list):
            raise ValueError(f"{path}: 'log_history' is a {type(history).__name__}, not a list")
        # training entries carry "loss"; evaluation ("eval_loss") and the summary ("train_loss") do not
        return [_entry(r, path, f"log_history[{i}]") for i, r in enumerate(history)
                if isinstance(r, dict) and "loss" in r]
    if isinstance(data, list):
        return [_entry(r, path, f"entry {i}") for i, r in enumerate(data)]
    raise ValueError(f"{path}: a JSON {type(data).__name__}, neither a trainer_state.json object nor a list of steps")


def _read_jsonl(path: Path) -> list[dict]:
    steps = []
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file ({err})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number}: not JSON ({err.msg})") from None
        steps.append(_entry(record, path, f"line {number}"))
    return steps


def _column(columns: list[str], suffix: str, path: Path) -> str | None:
    """The one column whose name ends in ``suffix`` (W&B's ``__MIN``/``__MAX`` and eval columns left out)."""
    found = [c for c in columns if c.strip().endswith(suffix) and "eval" not in c.lower()]
    if len(found) > 1:
        raise ValueError(f"{path}: several columns end in {suffix!r} ({', '.join(found)}); export one run's "
                         "train/loss and train/grad_norm only")
    return found[0] if found else None


def _read_csv(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
            columns = list(rows[0].keys()) if rows else []
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path}: not a readable CSV file ({err})") from None
    if not rows:
        raise ValueError(f"{path}: no rows (a W&B CSV export with a header and one row per step)")
    step_key = next((c for c in STEP_COLUMNS if c in columns), None)
    loss_key = _column(columns, "loss", path)
    if step_key is None or loss_key is None:
        missing = "a step column (" + " / ".join(STEP_COLUMNS) + ")" if step_key is None else "a '.../loss' column"
        raise ValueError(f"{path}: no {missing} among the columns {columns}")
    norm_key = _column(columns, "grad_norm", path)
    steps = []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        if not (row.get(loss_key) or "").strip():
            continue
        where = f"row {number}"
        steps.append({"step": _step(row.get(step_key), path, where, step_key),
                      "loss": _number(row[loss_key], path, where, loss_key),
                      "grad_norm": _number(row.get(norm_key), path, where, norm_key, optional=True)
                      if norm_key else None, "where": where})
    return steps
