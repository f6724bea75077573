"""What every embedded-task run shares: the task files, tokenizer and base model in one folder,
config merging, and held-out evaluation through ``run_eval``."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import shutil
import statistics
import time
from pathlib import Path
from types import ModuleType

from ..config import deep_merge, from_dict
from ..evaluation import EvalConfig, read_generations, run_eval
from ..jitted import compilation_cache
from . import task as arithmetic
from .assets import build_base_model, build_tokenizer
from .task import BENCHMARK, Problem, trace_stats, write_jsonl

log = logging.getLogger("sftrl_jax.demo")

TASK_SEED = 1234
# Model options of every embedded-task run. The embedded model has 2 layers: an unrolled layer loop
# makes its GRPO updates about a tenth faster than the scanned one (docs/design.md, "Stacked layers
# and `lax.scan`"; scripts/time_layer_loop.py).
MODEL_OPTIONS = {"scan_layers": False}


@dataclasses.dataclass
class Workspace:
    splits: dict[str, list[Problem]]
    sft_file: Path  # teacher traces (LUFFY SFT schema) of the "sft" split
    prompt_files: dict[str, Path]  # prompt/answer rows of every other split
    base: Path  # tokenizer + base model (random, or pretrained on the task's corpus), HF format
    task: ModuleType = arithmetic  # the task's module: make_splits, sft_row, prompt_row, corpus, BENCHMARK

    def sft_rows_file(self, split: str, directory: Path) -> Path:
        """Teacher traces of another split (e.g. a held-out SFT set for the probe)."""
        return write_jsonl([self.task.sft_row(p) for p in self.splits[split]], directory / f"{split}_sft.jsonl")


def build_workspace(out: Path, sizes: dict[str, int], model: dict, *, task: ModuleType = arithmetic,
                    pretrain: dict | None = None, progress: bool = False, **task_options) -> Workspace:
    """Write the task's splits under ``out/data`` and the tokenizer + base model under ``out/base_model``.

    ``task`` is the task's module (the arithmetic one, :mod:`.task`, or the CoLA-like one, :mod:`.cola_task`),
    ``task_options`` its ``make_splits`` options. ``sizes`` must contain ``"sft"``; every split (including
    ``"sft"``) is also written as prompts. With ``pretrain`` (:func:`pretrain_base`'s settings) the random
    model is pretrained on the task's plain-text corpus and the workspace's base is the result.
    """
    splits = task.make_splits(TASK_SEED, sizes, **task_options)
    data = out / "data"
    sft_file = write_jsonl([task.sft_row(p) for p in splits["sft"]], data / "sft.jsonl")
    prompt_files = {name: write_jsonl([task.prompt_row(p) for p in problems], data / f"{name}.jsonl")
                    for name, problems in splits.items() if name != "sft"}
    base = out / "base_model"
    texts = task.corpus(splits["sft"])
    if pretrain is not None:
        exclude = {p.question for problems in splits.values() for p in problems}
        documents = task.pretrain_corpus(TASK_SEED + 1, pretrain["documents"], exclude)
        pretrain_file = write_jsonl([{"text": text} for text in documents], data / "pretrain.jsonl")
        texts = texts + documents  # the tokenizer learns the corpus's words, as a real one does
    tokenizer = build_tokenizer(texts, base)
    build_base_model(base, tokenizer, **model)
    if pretrain is not None:
        base = pretrain_base(base, pretrain_file, pretrain, out / "pretrain", progress=progress)
    log.info("task %s: %s examples %s; tokenizer %d tokens; base model %s", task.BENCHMARK,
             {k: len(v) for k, v in splits.items()}, task_options or "", len(tokenizer), base)
    return Workspace(splits, sft_file, prompt_files, base, task)


def pretrain_base(init: Path, corpus_file: Path, settings: dict, out: Path, *, progress: bool = False) -> Path:
    """The model at ``init`` pretrained on ``corpus_file``'s plain-text rows (next-token loss on every token,
    ``data.text_field``); returns its final folder, ``out/final``.

    ``settings`` holds ``documents`` (the corpus's size) and the run's ``sft`` config sections. The result is
    reused while the corpus, the initial model and the settings are the same (``out/inputs.json``, which also
    records how long the pretraining took): every seed and method of an experiment starts from one pretrained
    base.
    """
    from ..fingerprint import file_sha256, model_fingerprint
    from ..sft import SFTConfig, run_sft

    inputs = {"corpus": file_sha256(corpus_file), "init": model_fingerprint(init),
              "settings": settings}
    record = out / "inputs.json"
    if (out / "final" / "config.json").exists() and record.exists() \
            and {k: v for k, v in json.loads(record.read_text()).items() if k != "seconds"} == inputs:
        log.info("pretrained base: reusing %s (same corpus, initial model and settings)", out / "final")
        return out / "final"
    shutil.rmtree(out, ignore_errors=True)
    start = time.time()
    config = from_dict(SFTConfig, deep_merge({
        "model": {"path": str(init), **MODEL_OPTIONS}, "output_dir": str(out),
        "data": {"train_files": [str(corpus_file)], "text_field": "text"}, "mesh": {"fsdp": -1}}, settings["sft"]))
    result = run_sft(config, progress=progress)
    record.write_text(json.dumps({**inputs, "seconds": time.time() - start}, indent=2) + "\n")
    return result.final_dir


def begin(out: str | Path, settings: dict, seeds: list[int] | None, **workspace_options) -> tuple[Path, list[int],
                                                                                             Workspace]:
    """An experiment's start: its folder (created), its seeds (default: the settings'), and the task's
    workspace in the folder (:func:`build_workspace` with ``workspace_options``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = build_workspace(out, settings["splits"], settings["model"], **workspace_options)
    return out, list(seeds if seeds is not None else settings["seeds"]), work


def evaluate(model_path: Path, test_file: Path, out: Path, *, max_new_tokens: int = 40) -> float:
    """Greedy held-out accuracy of ``model_path`` on ``test_file`` (math-verify grading)."""
    config = from_dict(EvalConfig, {
        "model": {"path": str(model_path), **MODEL_OPTIONS},
        "data": {"files": [str(test_file)], "benchmark_field": "data_source"},
        "sampling": {"temperature": 0.0, "max_new_tokens": max_new_tokens, "batch_size": 64},
        "reward": {"num_workers": 1}, "math_benchmarks": [BENCHMARK], "output_dir": str(out)})
    return run_eval(config, progress=False)["benchmarks"][BENCHMARK]["accuracy"]


def answer_stats(problems: list[Problem], out: Path) -> dict:
    """:func:`trace_stats` of the greedy answers :func:`evaluate` wrote to ``out/generations.jsonl``."""
    return trace_stats(problems, {r["prompt_id"]: r["response"] for r in read_generations(out / "generations.jsonl")})


def with_compilation_cache(run):
    """Run ``run(out, ...)`` inside :func:`compilation_cache` at ``<out>/xla_cache``."""

    @functools.wraps(run)
    def wrapper(*args, **kwargs):
        bound = inspect.signature(run).bind(*args, **kwargs)
        bound.apply_defaults()
        with compilation_cache(Path(bound.arguments["out"]) / "xla_cache"):
            return run(*args, **kwargs)

    return wrapper


def spread(values: list[float]) -> float:
    """Sample standard deviation over seeds (0 for one seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")
