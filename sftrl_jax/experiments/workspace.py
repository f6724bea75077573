"""What every embedded-task run shares: the task files, tokenizer and base model in one folder,
config merging, and held-out evaluation through ``run_eval``."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import statistics
from pathlib import Path
from types import ModuleType

from ..config import from_dict
from ..evaluation import EvalConfig, read_generations, run_eval
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
    base: Path  # tokenizer + random base model, HF format
    task: ModuleType = arithmetic  # the task's module: make_splits, sft_row, prompt_row, corpus, BENCHMARK

    def sft_rows_file(self, split: str, directory: Path) -> Path:
        """Teacher traces of another split (e.g. a held-out SFT set for the probe)."""
        return write_jsonl([self.task.sft_row(p) for p in self.splits[split]], directory / f"{split}_sft.jsonl")


def build_workspace(out: Path, sizes: dict[str, int], model: dict, *, task: ModuleType = arithmetic,
                    **task_options) -> Workspace:
    """Write the task's splits under ``out/data`` and the tokenizer + base model under ``out/base_model``.

    ``task`` is the task's module (the arithmetic one, :mod:`.task`, or the CoLA-like one, :mod:`.cola_task`),
    ``task_options`` its ``make_splits`` options. ``sizes`` must contain ``"sft"``; every split (including
    ``"sft"``) is also written as prompts.
    """
    splits = task.make_splits(TASK_SEED, sizes, **task_options)
    data = out / "data"
    sft_file = write_jsonl([task.sft_row(p) for p in splits["sft"]], data / "sft.jsonl")
    prompt_files = {name: write_jsonl([task.prompt_row(p) for p in problems], data / f"{name}.jsonl")
                    for name, problems in splits.items() if name != "sft"}
    base = out / "base_model"
    tokenizer = build_tokenizer(task.corpus(splits["sft"]), base)
    build_base_model(base, tokenizer, **model)
    log.info("task %s: %s examples %s; tokenizer %d tokens; base model %s", task.BENCHMARK,
             {k: len(v) for k, v in splits.items()}, task_options or "", len(tokenizer), base)
    return Workspace(splits, sft_file, prompt_files, base, task)


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


@contextlib.contextmanager
def compilation_cache(directory: Path):
    """Keep compiled XLA programs in ``directory`` while the block runs (JAX's persistent cache).

    Every seed of an embedded-task run compiles the same programs again (each ``run_sft`` /
    ``run_rl`` builds its own jitted step); with the cache the second and later seeds load them
    instead. A cache the user configured (``JAX_COMPILATION_CACHE_DIR``) is left as it is.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cache

    if jax.config.jax_compilation_cache_dir:
        yield
        return
    min_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)
        cache.reset_cache()


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
