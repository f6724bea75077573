"""Evaluation on the reasoning benchmarks (``sftrl-jax eval``).

Rows in the verl/LUFFY parquet format (``data_source`` names the benchmark, ``prompt`` = chat
messages, ``reward_model.ground_truth``) or plain JSONL (``prompt``, ``answer``) become prompts
through the model's own chat template (``model.path``'s tokenizer files; ``data.remove_system_prompt``
drops a system message and the default one a template injects); the one sampler generates, stopping
at the ids of :func:`sftrl_jax.sampling.stop_token_ids` (``generation_config.json``'s included), the
one reward module grades, and every completion is appended to ``generations.jsonl`` as soon as its
chunk is graded, so an interrupted evaluation resumes without regenerating.

Scored as the reference scores it:

- a prompt longer than ``data.max_prompt_length`` is not generated; its ``n`` records score 0 with
  ``prompt_too_long: true``, so it stays in its benchmark's denominator (RL still skips such prompts);
- rows with the same prompt text and ground truth within a benchmark are one *problem*: its attempts
  are its repeated rows times ``n`` samples (LUFFY repeats AIME rows instead of sampling ``n``).

Metrics per benchmark: accuracy (mean over all attempts), ``avg@k`` (k = attempts per problem: the
mean over problems of each one's accuracy, the accuracy when every problem has k attempts), unbiased
``pass@k`` over each problem's attempts for power-of-two k up to the attempts, mean response length,
share truncated and timed out (of the generated responses), the count of over-long prompts; plus the
unweighted average accuracy over the math benchmarks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from .config import RewardOptions, RunConfig, SamplingOptions, save_config
from .data.prompts import PromptDataOptions, PromptItem, load_prompt_items
from .distributed import barrier, initialize, map_rows_across_processes
from .fingerprint import data_fingerprint, model_fingerprint
from .layout import layout, layout_keys, not_layout
from .metrics import is_writer, read_jsonl
from .run_folder import owned_folder, write_text_atomic
from .signals import Stopped, agreed, requested, signal_name, stop_requests

log = logging.getLogger("sftrl_jax.eval")

MATH_BENCHMARKS = ["aime", "aime25", "amc", "math", "minerva", "olympiad_bench"]
OOD_BENCHMARKS = ["arc_c", "gpqa", "mmlu_pro"]  # LUFFY's out-of-distribution set
AVERAGES = {"math": "math", "ood": "OOD"}  # results key prefix -> the name the table, plot and CLI print


@dataclasses.dataclass(kw_only=True)
class EvalConfig(RunConfig):
    kind: Literal["eval"] = "eval"
    data: PromptDataOptions = dataclasses.field(default_factory=PromptDataOptions)
    sampling: SamplingOptions = dataclasses.field(default_factory=SamplingOptions)
    # reward.timeout_s is no layout setting here: a response that runs out of time scores 0, so it changes
    # the scores already written
    reward: RewardOptions = dataclasses.field(default_factory=RewardOptions, metadata=not_layout("timeout_s"))
    # which benchmarks the math average is over (the generations do not depend on it)
    math_benchmarks: list[str] = layout(default_factory=lambda: list(MATH_BENCHMARKS))
    ood_benchmarks: list[str] = layout(default_factory=lambda: list(OOD_BENCHMARKS))  # ... and the OOD average
    # prompts generated and graded between two appends to generations.jsonl; each chunk is sampled from its own
    # seed (sampling.seed + its first prompt id), so the generations depend on it
    chunk_size: int = 256
    output_dir: str = layout("runs/eval")

    _ranges = {"chunk_size": ">= 1"}


@dataclasses.dataclass
class Completion:
    text: str
    num_tokens: int
    truncated: bool


# A generator returns ``n`` completions per item, item-major.
Generator = Callable[[Sequence[PromptItem], int], list[Completion]]


def model_generator(model, tokenizer, sampling: SamplingOptions, *, progress: bool = True) -> Generator:
    """The real generator: the shared sampler, decoded with the tokenizer (EOS not included in the text)."""
    from .sampling import TextSampler

    sampler = TextSampler(model, tokenizer, sampling, progress=progress)  # decode layout made once
    seed = sampling.seed if sampling.seed is not None else 0

    def run(items: Sequence[PromptItem], n: int) -> list[Completion]:
        samples, texts = sampler.sample([item.prompt_ids for item in items], seed=seed + items[0].prompt_id, n=n)
        return [Completion(text, len(sample.tokens), sample.stop_reason == "length")
                for sample, text in zip(samples, texts)]

    run.sampler = sampler  # its figures (sampler.stats) go into the summary
    return run


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k estimator: 1 - C(n - c, k) / C(n, k)."""
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


def problem_ids(items: Sequence[PromptItem]) -> list[int]:
    """For each item, the prompt id of the first item of its benchmark with the same prompt text and
    ground truth: repeated rows (LUFFY repeats AIME rows) are attempts at one problem."""
    first: dict[tuple[str, str, str], int] = {}
    return [first.setdefault((item.benchmark, item.prompt_text, item.ground_truth), item.prompt_id) for item in items]


def _mean(records: Sequence[dict], key: str) -> float:
    return sum(r[key] for r in records) / len(records) if records else 0.0


def summarize(records: Sequence[dict], math_benchmarks: Sequence[str], ood_benchmarks: Sequence[str] = ()) -> dict:
    """Per-benchmark metrics and the unweighted math and OOD averages (over the listed benchmarks present; None
    when none is) from generation records.

    A problem is a record's ``problem_id`` (its ``prompt_id`` when it has none): its attempts are all
    its records, repeated rows and ``n`` samples together. Over-long prompts (``prompt_too_long``)
    count in the accuracy, avg@k and pass@k (scored 0), not in the response length and shares.
    """
    by_benchmark: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_benchmark[record["benchmark"]].append(record)
    benchmarks = {}
    for name, rows in sorted(by_benchmark.items()):
        per_problem: dict[int, list[float]] = defaultdict(list)
        for r in rows:
            per_problem[r.get("problem_id", r["prompt_id"])].append(r["score"])
        attempts = min(len(v) for v in per_problem.values())
        generated = [r for r in rows if not r.get("prompt_too_long", False)]
        metrics = {
            "prompts": len({r["prompt_id"] for r in rows}),
            "problems": len(per_problem),
            "samples": len(rows),
            "attempts": attempts,
            "accuracy": sum(r["score"] for r in rows) / len(rows),
            f"avg@{attempts}": sum(sum(s) / len(s) for s in per_problem.values()) / len(per_problem),
            "mean_response_tokens": _mean(generated, "num_tokens"),
            "truncated_share": _mean(generated, "truncated"),
            "timed_out_share": _mean(generated, "timed_out"),
            "prompt_too_long": len({r["prompt_id"] for r in rows if r.get("prompt_too_long", False)}),
        }
        if attempts > 1:
            for k in [2**i for i in range(int(math.log2(attempts)) + 1)]:
                metrics[f"pass@{k}"] = sum(pass_at_k(len(s), int(sum(s)), k) for s in per_problem.values()) / len(
                    per_problem)
        benchmarks[name] = metrics
    out = {"benchmarks": benchmarks}
    for group, names in zip(AVERAGES, (math_benchmarks, ood_benchmarks)):
        present = [b for b in names if b in benchmarks]
        out[f"{group}_average"] = sum(benchmarks[b]["accuracy"] for b in present) / len(present) if present else None
        out[f"{group}_benchmarks"] = present
    return out


_GENERATION_FIELDS = ("prompt_id", "sample", "benchmark", "score", "num_tokens", "truncated", "timed_out")


def read_generations(path: Path) -> list[dict]:
    """Every valid record of ``generations.jsonl``; a torn or corrupt line is reported (file and line)
    and skipped, so a resumed evaluation regenerates only the prompts it leaves incomplete."""
    return read_jsonl(path, valid=lambda r: all(k in r for k in _GENERATION_FIELDS)
                      and isinstance(r["prompt_id"], int) and isinstance(r["sample"], int))


def run_eval(config: EvalConfig, *, generator: Generator | None = None, progress: bool = True,
             force: bool = False) -> dict:
    """Evaluate as configured; returns the results written to ``results.json``. ``force`` reuses the
    generations of ``output_dir`` even where they cannot be shown to match the settings
    (:func:`check_generation_settings`).

    With several processes every process generates (one SPMD program per batch) and grades its
    share of each chunk; process 0 alone writes the files.
    """
    initialize(config.distributed)
    with stop_requests(), owned_folder(config.output_dir, command="sftrl-jax eval", writer=is_writer()) as out:
        if is_writer():
            check_generation_settings(out, config, force=force)
            save_config(config, out / "config.yaml")
        return _evaluate(config, out, generator=generator, progress=progress)


def generation_settings(config: EvalConfig) -> dict:
    """What the generations in ``generations.jsonl`` depend on: the config, the content of the data files
    (:mod:`sftrl_jax.fingerprint`: the same path with other rows counts as other data) and of the model
    folder (weights, config, tokenizer and chat template files)."""
    # how prompt ids are assigned: over-long prompts are kept (scored 0), so every data row keeps its id;
    # generations made where they were skipped (other ids) lack this entry and are refused
    return {**dataclasses.asdict(config), "model_files": model_fingerprint(config.model.path),
            "data_files": data_fingerprint(config.data.files), "prompts_too_long": "scored 0"}


def check_generation_settings(out: Path, config: EvalConfig, *, force: bool = False) -> None:
    """Refuse to reuse generations made with another model, model files, data content, sampling or data
    settings (naming them), or whose settings file is missing (they cannot be checked); ``force`` reuses
    them anyway, with a warning. The config's layout settings (:func:`~sftrl_jax.layout.layout_keys`:
    where, how fast, which averages are shown) may differ."""
    from .run_folder import RunFolderError, changed_settings

    key_file, current = out / "generation_settings.json", generation_settings(config)
    generations = out / "generations.jsonl"
    if generations.exists() and generations.stat().st_size:
        if not key_file.exists():
            problem = (f"{generations} has no {key_file.name} beside it, so the model, data and sampling it was "
                       "made with cannot be checked")
        else:
            changes = changed_settings(json.loads(key_file.read_text()), json.loads(json.dumps(current)),
                                       ignore=layout_keys(type(config)))
            problem = f"{generations} was made with other settings ({'; '.join(changes)})" if changes else None
        if problem and force:
            log.warning("--force: reusing generations that may be stale: %s", problem)
        elif problem:
            raise RunFolderError(f"{problem}; use a new output_dir, delete generations.jsonl to start over, or add "
                                 "--force to reuse them")
    write_text_atomic(key_file, json.dumps(current, indent=1) + "\n")


def _evaluate(config: EvalConfig, out: Path, *, generator: Generator | None, progress: bool) -> dict:
    from .models import load_tokenizer

    tokenizer = load_tokenizer(config.model.path)  # the model's own chat template
    items, skipped = load_prompt_items(config.data, tokenizer, keep_too_long=True)
    _require_usable_prompts(config, items, skipped)
    problems = problem_ids(items)
    records = resume_generations(out / "generations.jsonl", len(items), config.sampling.n)
    for r in records:  # records without problem_id / prompt_too_long fields
        r["problem_id"] = problems[r["prompt_id"]]
        r.setdefault("prompt_too_long", False)
    done = {r["prompt_id"] for r in records}
    todo = [item for item in items if item.prompt_id not in done]
    too_long = sum(item.prompt_too_long for item in items)
    log.info("%d prompts (%d already generated, %d longer than data.max_prompt_length: scored 0), %d samples each",
             len(items), len(done), too_long, config.sampling.n)
    if todo:
        if generator is None and not all(item.prompt_too_long for item in todo):
            _require_positions_for(config, todo)
            generator = _load_generator(config, tokenizer)
        records.extend(_generate_and_grade(config, generator, todo, out / "generations.jsonl", total=len(items),
                                           problems=problems, progress=progress))
    records.sort(key=lambda r: (r["prompt_id"], r["sample"]))
    results = summarize(records, config.math_benchmarks, config.ood_benchmarks)
    results.update(grader=config.reward.kind, skipped={"bad_rows": skipped["bad_rows"]}, prompt_too_long=too_long,
                   max_prompt_length=config.data.max_prompt_length, samples_per_prompt=config.sampling.n,
                   sampling=dataclasses.asdict(config.sampling), model=config.model.path)
    sampler = getattr(generator, "sampler", None)
    if sampler is not None and sampler.stats:  # this invocation's generation (none on a resume that had none left)
        from .sampling import generation_metrics

        results["generation"] = generation_metrics(sampler.stats)
    if is_writer():
        write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
        print_table(results)
        plot_results(results, out / "accuracy.png")
    return results


def _require_usable_prompts(config: EvalConfig, items: Sequence[PromptItem], skipped: dict[str, int]) -> None:
    """Refuse data with no prompt to generate from: no usable row, none within ``data.max_prompt_length`` (all
    would score 0), or none that tokenises to anything; the files and the skip counts are named."""
    files = ", ".join(map(str, config.data.files))
    if not items:
        raise ValueError(f"data.files ({files}): no usable prompts ({skipped['bad_rows']} bad rows); nothing to "
                         "evaluate")
    too_long = sum(item.prompt_too_long for item in items)
    if too_long == len(items):
        raise ValueError(f"data.files ({files}): all {len(items)} prompts are longer than data.max_prompt_length="
                         f"{config.data.max_prompt_length} tokens ({skipped['bad_rows']} bad rows besides); nothing "
                         "to evaluate")
    if not any(item.prompt_ids for item in items):
        raise ValueError(f"data.files ({files}): all {len(items)} prompts tokenise to no tokens with the tokenizer "
                         f"of {config.model.path} (are its tokenizer.json / tokenizer_config.json missing?)")


def _require_positions_for(config: EvalConfig, items: Sequence[PromptItem]) -> None:
    """Refuse to generate past the model's ``max_position_embeddings``: the longest prompt that is generated
    plus ``sampling.max_new_tokens`` must fit (over-long prompts are not generated)."""
    from .models.config import require_positions
    from .models.hf_io import read_config

    longest = max(len(item.prompt_ids) for item in items if not item.prompt_too_long)
    require_positions(read_config(config.model.path), longest + config.sampling.max_new_tokens,
                      f"the longest prompt ({longest} tokens) + sampling.max_new_tokens")


def resume_generations(path: Path, num_items: int, n: int) -> list[dict]:
    """The complete prompts of an earlier, interrupted evaluation's ``generations.jsonl`` (rewritten to hold
    just those): a repeated (prompt, sample) counts once, and a prompt with fewer than ``n`` samples (a
    lost or corrupt line) is dropped, to be generated again."""
    unique: dict[tuple[int, int], dict] = {}
    for r in read_generations(path):
        if 0 <= r["prompt_id"] < num_items:
            unique.setdefault((r["prompt_id"], r["sample"]), r)
    counts: dict[int, int] = defaultdict(int)
    for r in unique.values():
        counts[r["prompt_id"]] += 1
    records = [r for r in unique.values() if counts[r["prompt_id"]] == n]
    barrier("sftrl_jax.eval.read_generations")  # every process has read the file before it is rewritten
    if is_writer():
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def _load_generator(config: EvalConfig, tokenizer) -> Generator:
    from .models import load_pretrained
    from .sharding import make_mesh

    model, _ = load_pretrained(config.model, make_mesh(config.mesh))
    return model_generator(model, tokenizer, config.sampling, progress=False)


def _generate_and_grade(config: EvalConfig, generator: Generator | None, todo: Sequence[PromptItem], path: Path, *,
                        total: int, problems: Sequence[int], progress: bool) -> list[dict]:
    """Generate and grade ``todo`` ``config.chunk_size`` prompts at a time, appending each chunk's records
    to ``path`` as soon as it is graded; returns the new records. An over-long prompt is not generated:
    its ``n`` records score 0 (``prompt_too_long``)."""
    from tqdm.auto import tqdm

    from .rewards import open_reward

    n = config.sampling.n
    new: list[dict] = []
    bar = tqdm(total=total, initial=total - len(todo), desc="eval", disable=not progress, dynamic_ncols=True)
    with contextlib.ExitStack() as stack:
        reward = open_reward(config.reward, stack)

        def grade(texts, truths):
            result = reward.score_batch(texts, truths)
            return np.stack([result.scores, result.timed_out], axis=1)

        for start in range(0, len(todo), config.chunk_size):
            signum = agreed(requested())  # SIGTERM/SIGINT: stop between chunks, every finished one kept
            if signum is not None:
                bar.close()
                raise Stopped(signum, f"stopped by {signal_name(signum)} after {total - len(todo) + start} of "
                                      f"{total} prompts (kept in {path}); to continue, rerun the same command")
            chunk = todo[start:start + config.chunk_size]
            fitting = [item for item in chunk if not item.prompt_too_long]
            generated: dict[int, list[tuple[Completion, np.ndarray]]] = {}
            if fitting:  # the same on every process: all of them generate and grade, or none
                completions = generator(fitting, n)
                truths = [item.ground_truth for item in fitting for _ in range(n)]
                graded = map_rows_across_processes(grade, [c.text for c in completions], truths, trailing=(2,))
                for k, item in enumerate(fitting):
                    generated[item.prompt_id] = [(completions[k * n + s], graded[k * n + s]) for s in range(n)]
            records = []
            for item in chunk:
                for s in range(n):
                    record = {"prompt_id": item.prompt_id, "sample": s, "benchmark": item.benchmark,
                              "problem_id": problems[item.prompt_id], "ground_truth": item.ground_truth}
                    if item.prompt_too_long:
                        record.update(response="", extracted_answer=None, score=0.0, num_tokens=0,
                                      truncated=False, timed_out=False, prompt_too_long=True)
                    else:
                        completion, grade_row = generated[item.prompt_id][s]
                        record.update(response=completion.text,
                                      extracted_answer=reward.answer(completion.text, item.ground_truth),
                                      score=float(grade_row[0]), num_tokens=completion.num_tokens,
                                      truncated=completion.truncated, timed_out=bool(grade_row[1]),
                                      prompt_too_long=False)
                    records.append(record)
            if is_writer():
                with path.open("a") as f:
                    f.write("".join(json.dumps(r) + "\n" for r in records))
            new.extend(records)
            bar.update(len(chunk))
    bar.close()
    return new


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"evaluation (grader: reward.kind={results['grader']})")
    columns = ["prompts", "problems", "attempts", "accuracy", "avg@k", "mean_response_tokens", "truncated_share",
               "timed_out_share", "prompt_too_long"]
    extra = sorted({k for m in results["benchmarks"].values() for k in m if k.startswith("pass@")},
                   key=lambda k: int(k[5:]))
    table.add_column("benchmark")
    for column in columns + extra:
        table.add_column(column.replace("_", " "), justify="right")
    for name, metrics in results["benchmarks"].items():
        metrics = {**metrics, "avg@k": metrics.get(f"avg@{metrics.get('attempts')}")}
        cells = [f"{metrics[c]:.3f}" if isinstance(metrics.get(c), float) else str(metrics.get(c, ""))
                 for c in columns + extra]
        table.add_row(escape(name), *cells)  # a benchmark name is data: "[bold" is text, not markup
    for key, name in AVERAGES.items():
        if results[f"{key}_average"] is not None:
            table.add_row(f"{name} average", "", "", "", f"{results[f'{key}_average']:.3f}")
    if results.get("generation"):
        g = results["generation"]
        table.caption = (f"generation ({results['sampling']['engine']} engine): {g['useful_tokens_per_s']:.1f} useful "
                         f"tokens/s, slot utilisation {g['slot_utilisation']:.1%}, peak pages in use "
                         f"{g['max_pages_in_use']}")
    Console().print(table)


def plot_results(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["benchmarks"])
    values = [100 * results["benchmarks"][b]["accuracy"] for b in names]
    averages = {f"{name} avg": results[f"{key}_average"] for key, name in AVERAGES.items()
                if results[f"{key}_average"] is not None}
    names += list(averages)
    values += [100 * value for value in averages.values()]
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(names)), 3.5))
    bars = ax.bar(names, values, color=["#dd8452" if n in averages else "#4c72b0" for n in names])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, max(100, max(values, default=0) * 1.1))
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
