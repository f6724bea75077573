"""What both crosscheck commands share: the SFT config they run, the data in a fixed order, our side's
training run, relative distances and the report files."""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..config import load_config
from ..data.sft import tokenize_sft
from ..data.sources import load_rows
from ..metrics import plot_curves
from ..run_folder import write_text_atomic
from ..sft import SFTConfig
from ..sft.trainer import SFTAlgorithm
from ..training import run_loop

log = logging.getLogger("sftrl_jax.crosscheck")

# The accumulation semantics a run can have, by their report names, and the train.emulate_bug of each.
SEMANTICS = {"correct": "none", "openrlhf_mean_of_means": "openrlhf_mean_of_means",
             "deepspeed_offload": "deepspeed_offload", "both": "both"}

# Settings both commands impose on the config: the data in its given order, all of it for training, no packing
# (a PyTorch trainer pads each sequence to its own row), no checkpoints, metrics to a JSONL file only.
FIXED_OVERRIDES = ("data.shuffle=false", "data.pack=false", "data.eval_files=[]", "data.eval_fraction=0.0",
                   "train.eval_every=0", "train.max_flops=null", "checkpoint.save_every=0",
                   "checkpoint.async_save=false", "logging.sinks=[jsonl]", "logging.log_every=1",
                   "logging.progress=false")


def crosscheck_config(path: str, overrides: Sequence[str], extra: Sequence[str] = ()) -> SFTConfig:
    """The SFT config ``path`` with the user's ``overrides``, then :data:`FIXED_OVERRIDES` and ``extra``."""
    if path is None:
        raise ValueError("--config: an SFT config file is required")
    if not Path(path).is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    import jax

    if jax.process_count() > 1:  # the replays read whole global batches on the host
        raise ValueError("sftrl-jax crosscheck runs in one process (several devices are fine)")
    return load_config(SFTConfig, path, [*overrides, *FIXED_OVERRIDES, *extra])


def load_train_examples(config: SFTConfig, tokenizer, *, every_row: bool = False) -> list:
    """The training examples of ``config`` in file order, tokenised as the SFT trainer tokenises them.

    With ``every_row`` a row that does not become an example (a bad row, one too long to keep) is an
    error: row indices then name examples one to one."""
    data = config.data
    if not data.train_files:
        raise ValueError("data.train_files: no training data given")
    examples, stats = tokenize_sft(load_rows(data.train_files, split=data.train_split), tokenizer, data)
    skipped = stats.rows - stats.examples
    if skipped and every_row:
        raise ValueError(f"data.train_files ({', '.join(map(str, data.train_files))}): {skipped} of {stats.rows} rows "
                         f"did not become examples ({stats.summary()}); row indices of --order would not name "
                         "examples: remove those rows or raise data.max_length")
    if skipped:
        log.warning("%d of %d rows did not become examples (%s): the file order of the examples is not the row "
                    "order", skipped, stats.rows, stats.summary())
    if not examples:
        raise ValueError(f"data.train_files ({', '.join(map(str, data.train_files))}): no examples")
    return examples


class FixedExamplesSFT(SFTAlgorithm):
    """SFT on a given list of examples, walked in its order (``data.shuffle`` is false)."""

    def __init__(self, examples: list):
        super().__init__()
        self.examples = examples

    def load_examples(self, config, tokenizer):
        return self.examples, []


def run_ours(config: SFTConfig, algorithm: SFTAlgorithm, out: Path) -> tuple[list[dict], object]:
    """Our SFT run of ``config`` with ``algorithm`` in the fresh folder ``out`` (a previous crosscheck's copy
    is replaced): its per-step records and the result."""
    if out.exists():
        shutil.rmtree(out)
    config.output_dir = str(out)
    records: list[dict] = []
    result = run_loop(config, algorithm, on_step=lambda _step, record: records.append(dict(record)), progress=False)
    return records, result


def relative(a: float | None, b: float | None) -> float | None:
    """``|a - b| / |b|`` (None where either is missing; ``inf`` where ``b`` is 0 and ``a`` is not)."""
    if a is None or b is None:
        return None
    if b == 0:
        return 0.0 if a == 0 else math.inf
    return abs(a - b) / abs(b)


def mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def write_report(out: Path, markdown: str, data: dict, curves: dict[str, list[dict]], title: str,
                 plot_name: str = "curves.png") -> Path | None:
    """``report.md``, ``report.json`` and ``plot_name`` (loss and gradient norm, one line per run) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "report.json", json.dumps(data, indent=1) + "\n")
    write_text_atomic(out / "report.md", markdown)
    return plot_curves(curves, ("loss", "grad_norm"), out / plot_name, title=title)


def fmt(value: float | None, digits: int = 6) -> str:
    return "-" if value is None else f"{value:.{digits}g}"
