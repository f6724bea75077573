"""What a person watches: metrics JSONL, PNG curves, and a progress bar. Only process 0 writes."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import jax


def is_writer() -> bool:
    return jax.process_index() == 0


class MetricsWriter:
    """Appends one JSON object per line; numbers are converted to plain Python floats/ints."""

    def __init__(self, path: str | os.PathLike, *, truncate_after_step: int | None = None):
        self.path = Path(path)
        if is_writer():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if truncate_after_step is not None and self.path.exists():
                # Drop records of steps after the restored checkpoint (they will be redone); a run
                # starting from step 0 starts a fresh file.
                kept = [line for line in self.path.read_text().splitlines()
                        if truncate_after_step > 0 and line.strip()
                        and json.loads(line).get("step", 0) <= truncate_after_step]
                self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not is_writer():
            return
        clean = {k: (v.item() if hasattr(v, "item") else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(records: Sequence[dict] | Mapping[str, Sequence[dict]], keys: Iterable[str],
                path: str | os.PathLike, *, x: str = "step", title: str = "",
                boundaries: Sequence[float] = (), log_keys: Iterable[str] = ()) -> Path | None:
    """One panel per key present in ``records`` (y against ``x``); stage ``boundaries`` as lines;
    ``log_keys`` on a logarithmic y axis (a loss that falls by orders of magnitude, then moves a little).

    ``records`` may also map a label to each run's records: one line per run, with a legend.
    """
    if not is_writer():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = dict(records) if isinstance(records, Mapping) else {"": records}
    keys = [k for k in keys if any(k in r and r[k] is not None and math.isfinite(r[k])
                                   for run in series.values() for r in run)]
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.6 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        for label, run in series.items():
            points = [(r[x], r[key]) for r in run if key in r and r[key] is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None,
                    label=label or None)
        if len(series) > 1:
            ax.legend(fontsize=8)
        ax.set_ylabel(key)
        if key in set(log_keys):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        for b in boundaries:
            ax.axvline(b, color="grey", linestyle="--", linewidth=1)
    axes[-1, 0].set_xlabel(x)
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
