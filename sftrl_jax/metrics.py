"""What a person watches: metrics JSONL, PNG curves, and a progress bar. Only process 0 writes."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import jax

from .run_folder import write_text_atomic

log = logging.getLogger("sftrl_jax.metrics")


def is_writer() -> bool:
    return jax.process_index() == 0


def read_jsonl(path: str | os.PathLike, *, valid: Callable[[dict], bool] | None = None) -> list[dict]:
    """The JSON-object records of a journal file, one per line; bad lines are skipped, never fatal.

    A journal is appended to as a run goes, so a kill can leave its last line cut off: a bad LAST
    line is dropped with a warning. A bad line elsewhere (not JSON, not an object, or refused by
    ``valid``) is reported with its line number and skipped; every valid record is kept.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            record, problem = None, f"not JSON ({err.msg})"
        else:
            problem = "not a JSON object" if not isinstance(record, dict) else (
                "missing fields" if valid is not None and not valid(record) else None)
        if problem is None:
            records.append(record)
        elif i == last:
            log.warning("%s: dropped a torn last line %d (%s; an interrupted write)", path, i + 1, problem)
        else:
            log.warning("%s: line %d is corrupt (%s); skipped it, kept the other records", path, i + 1, problem)
    return records


class MetricsWriter:
    """Appends one JSON object per line; numbers are converted to plain Python floats/ints."""

    def __init__(self, path: str | os.PathLike, *, truncate_after_step: int | None = None):
        self.path = Path(path)
        if is_writer():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if truncate_after_step is not None and self.path.exists():
                # Drop records of steps after the restored checkpoint (they will be redone), and any
                # torn or corrupt line (read_jsonl reports them); a run starting from step 0 starts a
                # fresh file.
                kept = [record for record in read_jsonl(self.path)
                        if truncate_after_step > 0 and record.get("step", 0) <= truncate_after_step]
                write_text_atomic(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def write(self, record: dict) -> None:
        if not is_writer():
            return
        clean = {k: (v.item() if hasattr(v, "item") else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")


class TensorBoardSink:
    """Scalars as TensorBoard event files in ``directory`` (``tensorboardX``: the ``tensorboard`` extra)."""

    def __init__(self, directory: Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ImportError("logging.sinks has 'tensorboard' but tensorboardX is not installed: "
                              "pip install 'sftrl-jax[tensorboard]'") from None
        self.writer = SummaryWriter(str(directory))

    def write(self, record: dict) -> None:
        for key, value in _scalars(record):
            self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Weights & Biases run (``wandb``: the ``wandb`` extra); ``mode="offline"`` writes it under
    ``directory/wandb`` without a network (``wandb sync`` uploads it later)."""

    def __init__(self, directory: Path, *, project: str, mode: str, name: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise ImportError("logging.sinks has 'wandb' but wandb is not installed: pip install 'sftrl-jax[wandb]'") \
                from None
        self.run = wandb.init(project=project, mode=mode, dir=str(directory), name=name, config=config,
                              settings=wandb.Settings(silent=True, console="off"))

    def write(self, record: dict) -> None:
        self.run.log(dict(_scalars(record)), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


def _scalars(record: dict):
    """The finite numeric values of a record, other than the step."""
    for key, value in record.items():
        value = value.item() if hasattr(value, "item") else value
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield key, float(value)


class MetricSinks:
    """Every sink ``logging.sinks`` names, written together; process 0 only.

    ``jsonl`` is ``output_dir/metrics.jsonl`` (resume drops records after the restored step);
    ``plots`` draws ``plot_keys`` into ``output_dir/<plot_name>.png`` when the run ends (from the
    whole ``metrics.jsonl`` when it is kept, so a resumed run plots every step).
    """

    def __init__(self, options, out: Path, *, resume_step: int, plot_name: str, plot_keys: Sequence[str],
                 title: str, config: dict | None = None):
        self.options, self.out, self.plot_name, self.plot_keys, self.title = options, out, plot_name, plot_keys, title
        self.records: list[dict] = []
        self.sinks: list = []
        if not is_writer():
            return
        if "jsonl" in options.sinks:
            self.sinks.append(MetricsWriter(out / "metrics.jsonl", truncate_after_step=resume_step))
        if "tensorboard" in options.sinks:
            self.sinks.append(TensorBoardSink(out / "tensorboard"))
        if "wandb" in options.sinks:
            self.sinks.append(WandbSink(out, project=options.wandb_project, mode=options.wandb_mode, name=out.name,
                                        config=config or {}))

    def write(self, record: dict) -> None:
        self.records.append(record)
        for sink in self.sinks:
            sink.write(record)

    def history(self) -> list[dict]:
        """Every record of the run: ``metrics.jsonl`` when it is kept (earlier sessions of a resumed run too)."""
        return read_jsonl(self.out / "metrics.jsonl") if "jsonl" in self.options.sinks else list(self.records)

    def close(self) -> list[dict]:
        """Close the sinks, draw the plots; returns :meth:`history`."""
        for sink in self.sinks:
            if hasattr(sink, "close"):
                sink.close()
        self.sinks = []
        records = self.history()
        if "plots" in self.options.sinks:
            plot_curves(records, self.plot_keys, self.out / f"{self.plot_name}.png", title=self.title)
        return records


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
