"""``sftrl-jax crosscheck logs``: which accumulation semantics does someone else's SFT run have?

The reference run's per-step loss and gradient norm (:mod:`.references`) are put next to four replays
of its first steps in JAX, one per semantics -- correct (global-token mean), ``openrlhf_mean_of_means``,
``deepspeed_offload`` and ``both`` -- each on the reference's layout (ranks x micro-steps x sequences,
``--layout``), with the same data in the same order. The bugs are the SFT trainer's emulations
(``train.emulate_bug`` on the virtual layout ``train.emulate_ranks`` / ``train.emulate_micro_batch_size``,
:mod:`sftrl_jax.sft.step`).

Each replay reports the loss its stack would log: a mean-of-means stack logs the mean over
(micro-step, rank) groups of each group's token mean, the others the global-token mean (the DeepSpeed
defect drops gradients, not the forward losses of the middle micro-steps). A reference step logged every
``k > 1`` steps is compared as Hugging Face Trainer logs it: the loss averaged over the steps since the
previous logged step, the gradient norm of the logged step itself.

Distances are mean relative differences over the logged steps, ``mean |replay - reference| / |reference|``,
of the loss and of the gradient norm; a candidate's score is the larger of the two. The verdict is the
candidate with the smallest score if that score is within the tolerance, else ``none``; the margin is
the second-best score minus the best.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..jitted import compilation_cache
from ..models import load_tokenizer
from ..sft.step import sequence_nll, virtual_layout
from ..sharding import data_parallel_size, make_mesh
from . import DEFAULT_TOLERANCE
from .common import (
    SEMANTICS,
    FixedExamplesSFT,
    crosscheck_config,
    fmt,
    load_train_examples,
    mean,
    relative,
    run_ours,
    write_report,
)
from .references import read_reference

log = logging.getLogger("sftrl_jax.crosscheck")

_LAYOUT = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_layout(text: str) -> tuple[int, int, int]:
    """``"8x8x1"`` -> ``(ranks, micro_steps, micro_batch_size)``."""
    match = _LAYOUT.match(text or "")
    if not match or min(int(g) for g in match.groups()) < 1:
        raise ValueError(f"--layout {text!r}: expected RANKSxMICROSxBATCH with positive whole numbers, e.g. 8x8x1 "
                         "(8 data-parallel ranks x 8 micro-steps x 1 sequence per rank per micro-step)")
    ranks, micros, batch = (int(g) for g in match.groups())
    return ranks, micros, batch


def resolve_layout(text: str | None, config, config_path: str) -> tuple[int, int, int]:
    """The reference's layout: ``--layout``, checked against the config's ``train.global_batch_size``, or by
    default ``train.emulate_ranks`` (else 1) x N x ``train.emulate_micro_batch_size`` (else
    ``train.micro_batch_size``)."""
    train = config.train
    if text is None:
        ranks = train.emulate_ranks or 1
        micro = train.emulate_micro_batch_size or train.micro_batch_size
        if train.global_batch_size % (ranks * micro):
            raise ValueError(f"{config_path}: train.global_batch_size ({train.global_batch_size}) is not a multiple of "
                             f"{ranks} ranks x {micro} sequences; give the reference's layout with --layout")
        return ranks, train.global_batch_size // (ranks * micro), micro
    ranks, micros, batch = parse_layout(text)
    if ranks * micros * batch != train.global_batch_size:
        raise ValueError(f"--layout {text}: {ranks} x {micros} x {batch} = {ranks * micros * batch} sequences per "
                         f"optimizer step, but train.global_batch_size is {train.global_batch_size} ({config_path}); "
                         "they must agree (override train.global_batch_size=... or fix --layout)")
    return ranks, micros, batch


def read_order(path: str, rows: int, needed: int) -> list[int]:
    """The JSON list of row indices in ``path``: every entry a row of the ``rows`` training rows, at least
    ``needed`` of them."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--order {file}: no such file")
    try:
        order = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--order {file}: not JSON ({err})") from None
    if not isinstance(order, list):
        raise ValueError(f"--order {file}: expected a JSON list of row indices, got a {type(order).__name__}")
    for position, index in enumerate(order):
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"--order {file}: entry {position} is {index!r}, not a row index")
        if not 0 <= index < rows:
            raise ValueError(f"--order {file}: entry {position} is {index}, outside the {rows} rows of "
                             f"data.train_files (indices 0 to {rows - 1})")
    if len(order) < needed:
        raise ValueError(f"--order {file}: {len(order)} row indices, fewer than the {needed} the replayed steps "
                         "consume")
    return order


def _row_stats(graphdef, params, batch):
    """Per row of a ``[rows, length]`` batch: the summed nll of its supervised tokens, and their count."""
    nll, mask = sequence_nll(graphdef, params, batch)
    return jnp.sum(nll * mask, axis=-1), jnp.sum(mask, axis=-1)


def logged_loss(nll: np.ndarray, tokens: np.ndarray, semantics: str, *, ranks: int, micro_batch_size: int) -> float:
    """The loss a stack with ``semantics`` logs for one global batch whose examples (in batch order) have
    summed nll ``nll`` over ``tokens`` supervised tokens: the mean over (micro-step, rank) groups of each
    group's token mean under a mean-of-means loss, else the global-token mean."""
    if semantics in ("openrlhf_mean_of_means", "both"):
        micro_step, rank, n = virtual_layout(len(nll), ranks, micro_batch_size)
        group = micro_step * ranks + rank
        sums = np.bincount(group, weights=nll, minlength=n * ranks)
        counts = np.bincount(group, weights=tokens, minlength=n * ranks)
        return float(np.mean(sums / np.maximum(counts, 1.0)))
    return float(nll.sum() / max(tokens.sum(), 1.0))


class ReplaySFT(FixedExamplesSFT):
    """SFT on fixed examples that also records, per step, the loss the replayed semantics' stack logs
    (from the parameters before the update, on the same global batch)."""

    def __init__(self, examples: list, semantics: str, *, ranks: int, micro_batch_size: int):
        super().__init__(examples)
        self.semantics, self.ranks, self.virtual_micro = semantics, ranks, micro_batch_size

    def build(self, ctx, state):
        super().build(ctx, state)
        self.row_stats = jax.jit(functools.partial(_row_stats, ctx.graphdef))

    def train_step(self, state, step):
        position = self.batcher.state_dict()
        host = self.batcher.next()  # the batch the step below takes (the position is put back)
        self.batcher.load_state_dict(position)
        keys = ("input_ids", "labels", "label_mask", "segment_ids", "positions")
        stats = [jax.device_get(self.row_stats(state["params"], {k: host[k][i] for k in keys}))
                 for i in range(host["input_ids"].shape[0])]
        # [micro_steps, rows] flattened row-major is the global batch's example order (unpacked layout_step)
        nll = np.concatenate([s[0] for s in stats]).astype(np.float64)
        tokens = np.concatenate([s[1] for s in stats]).astype(np.float64)
        state, metrics = super().train_step(state, step)
        metrics["loss_logged"] = logged_loss(nll, tokens, self.semantics, ranks=self.ranks,
                                             micro_batch_size=self.virtual_micro)
        return state, metrics


def replay(config_path: str, overrides, *, layout: tuple[int, int, int], steps: int, out: Path, examples: list,
           ordered: bool = False, semantics=tuple(SEMANTICS)) -> dict[str, list[dict]]:
    """``{semantics: [{"step", "loss", "grad_norm"}]}``: ``steps`` SFT steps of the config under each
    accumulation semantics on ``layout`` (``(ranks, micro_steps, micro_batch_size)``) over ``examples`` in
    their order (``ordered``: the order of ``--order``, else the file's). ``loss`` is what that semantics'
    stack logs."""
    ranks, micros, micro = layout
    size = ranks * micros * micro
    base = crosscheck_config(config_path, overrides, [f"train.global_batch_size={size}", f"train.max_steps={steps}"])
    if steps * size > len(examples):
        where = "--order lists" if ordered else "data.train_files has"
        raise ValueError(f"{where} {len(examples)} examples, fewer than the {steps} steps x {size} sequences the "
                         "replay needs (the replay does not go past one epoch)")
    shards = data_parallel_size(make_mesh(base.mesh))
    real_micro = base.train.micro_batch_size  # how our mesh splits the step; the semantics do not depend on it
    if size % (real_micro * shards):
        if size % shards:
            raise ValueError(f"a global batch of {size} sequences does not split over the mesh's {shards} "
                             "data-parallel shards; use a mesh whose data-parallel size (mesh.data x mesh.fsdp) "
                             "divides it (e.g. give devices to mesh.tensor) or fewer devices")
        real_micro = size // shards
    curves = {}
    with compilation_cache(out / "xla_cache"):  # the replays compile the same programs
        for name in semantics:
            extra = [f"train.global_batch_size={size}", f"train.max_steps={steps}",
                     f"train.micro_batch_size={real_micro}", f"train.emulate_bug={SEMANTICS[name]}"]
            if name != "correct":
                extra += [f"train.emulate_ranks={ranks}", f"train.emulate_micro_batch_size={micro}"]
            config = crosscheck_config(config_path, overrides, extra)
            log.info("replaying %d steps as %s on %d ranks x %d micro-steps x %d sequences", steps, name, ranks,
                     micros, micro)
            records, _ = run_ours(config, ReplaySFT(examples, name, ranks=ranks, micro_batch_size=micro),
                                  out / f"replay_{name}")
            curves[name] = [{"step": r["step"], "loss": r["loss_logged"], "grad_norm": r["grad_norm"],
                             "true_loss": r["loss"]} for r in records]
    return curves


def compare(reference: list[dict], curves: dict[str, list[dict]], *, tolerance: float = DEFAULT_TOLERANCE,
            micro_steps: int | None = None) -> dict:
    """Distances of each replay from the reference, the verdict and the per-step table (``report.json``)."""
    by_step = {name: {r["step"]: r for r in records} for name, records in curves.items()}
    rows, previous = [], 0
    for entry in reference:
        row = {"step": entry["step"], "loss_reference": entry["loss"], "grad_norm_reference": entry["grad_norm"]}
        for name, steps in by_step.items():
            window = [steps[s]["loss"] for s in range(previous + 1, entry["step"] + 1)]
            row[f"loss_{name}"] = sum(window) / len(window)
            row[f"grad_norm_{name}"] = steps[entry["step"]]["grad_norm"]
        rows.append(row)
        previous = entry["step"]
    candidates = {}
    for name in curves:
        loss = [relative(r[f"loss_{name}"], r["loss_reference"]) for r in rows]
        norm = [relative(r[f"grad_norm_{name}"], r["grad_norm_reference"]) for r in rows]
        loss_distance, norm_distance = mean(loss), mean(norm)
        candidates[name] = {"loss_distance": loss_distance, "grad_norm_distance": norm_distance,
                            "loss_max_distance": max(loss),
                            "grad_norm_max_distance": max((v for v in norm if v is not None), default=None),
                            "score": max(loss_distance, norm_distance if norm_distance is not None else 0.0)}
    ranked = sorted(candidates, key=lambda n: candidates[n]["score"])
    best = ranked[0]
    best_score = candidates[best]["score"]
    second = ranked[1] if len(ranked) > 1 else None
    result = {"steps": rows, "candidates": candidates,
              "verdict": best if best_score <= tolerance else "none", "best": best, "second": second,
              "margin": None if second is None else candidates[second]["score"] - best_score,
              "tolerance": tolerance, "grad_norm_ratio": _norm_ratios(rows, micro_steps)}
    return result


def _norm_ratios(rows: list[dict], micro_steps: int | None) -> dict | None:
    """Order-free evidence: the reference's gradient norm over the correct replay's, step by step (about 1
    for correct and mean-of-means runs, about 2/N for the DeepSpeed defect on N micro-steps)."""
    ratios = [r["grad_norm_reference"] / r["grad_norm_correct"] for r in rows
              if r.get("grad_norm_reference") is not None and r.get("grad_norm_correct")]
    if not ratios:
        return None
    replayed = [r["grad_norm_deepspeed_offload"] / r["grad_norm_correct"] for r in rows
                if r.get("grad_norm_deepspeed_offload") is not None and r.get("grad_norm_correct")]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "deepspeed_offload_replay_median": statistics.median(replayed) if replayed else None,
            "two_over_n": None if not micro_steps else min(1.0, 2 / micro_steps)}


def run_logs(config_path: str, reference_path: str, *, layout: str | None = None, order_path: str | None = None,
             out: str | Path = "runs/crosscheck_logs", steps: int | None = None, tolerance: float = DEFAULT_TOLERANCE,
             overrides=()) -> dict:
    """``sftrl-jax crosscheck logs``: replay, compare, and write ``report.md``, ``report.json`` and
    ``curves.png`` to ``out``. Returns the report's data."""
    out = Path(out)
    reference = read_reference(reference_path)
    if steps is not None:
        reference = [r for r in reference if r["step"] <= steps]
        if not reference:
            raise ValueError(f"{reference_path}: no logged step within the first {steps}")
    config = crosscheck_config(config_path, overrides)
    ranks, micros, micro = resolve_layout(layout, config, config_path)
    last = reference[-1]["step"]
    examples = load_train_examples(config, load_tokenizer(config.model.path), every_row=order_path is not None)
    if order_path is not None:
        examples = [examples[i] for i in read_order(order_path, len(examples), last * ranks * micros * micro)]
    curves = replay(config_path, overrides, layout=(ranks, micros, micro), steps=last, out=out, examples=examples,
                    ordered=order_path is not None)
    result = compare(reference, curves, tolerance=tolerance, micro_steps=micros)
    result.update({"reference_file": str(reference_path), "layout": {"ranks": ranks, "micro_steps": micros,
                                                                      "micro_batch_size": micro},
                   "order": str(order_path) if order_path else "file order", "replayed_steps": last})
    plot = {"reference": [{"step": r["step"], "loss": r["loss_reference"], "grad_norm": r["grad_norm_reference"]}
                          for r in result["steps"]],
            **{name: [{"step": r["step"], "loss": r[f"loss_{name}"], "grad_norm": r[f"grad_norm_{name}"]}
                      for r in result["steps"]] for name in curves}}
    write_report(out, _markdown(result), result, plot, title="reference run vs JAX replays")
    return result


def _markdown(result: dict) -> str:
    layout = result["layout"]
    n = layout["micro_steps"]
    lines = [
        "# crosscheck logs: which accumulation does the reference run have?", "",
        f"Reference `{result['reference_file']}`: {len(result['steps'])} logged steps up to step "
        f"{result['replayed_steps']}; layout {layout['ranks']} ranks x {n} micro-steps x "
        f"{layout['micro_batch_size']} sequences; data order: {result['order']}.", "",
        f"**Verdict: {result['verdict']}**" + (
            f" (score {fmt(result['candidates'][result['best']]['score'], 3)} within the tolerance "
            f"{result['tolerance']:g}; next best {result['second']} by a margin of {fmt(result['margin'], 3)})"
            if result["verdict"] != "none" else
            f" -- no candidate within the tolerance {result['tolerance']:g} (closest: {result['best']}, score "
            f"{fmt(result['candidates'][result['best']]['score'], 3)}; margin to {result['second']} "
            f"{fmt(result['margin'], 3)})"), "",
        "| semantics | loss distance | grad-norm distance | max loss distance | max grad-norm distance |",
        "|---|---|---|---|---|"]
    for name, c in result["candidates"].items():
        lines.append(f"| {name} | {fmt(c['loss_distance'], 3)} | {fmt(c['grad_norm_distance'], 3)} | "
                     f"{fmt(c['loss_max_distance'], 3)} | {fmt(c['grad_norm_max_distance'], 3)} |")
    best_score = result["candidates"][result["best"]]["score"]
    if result["margin"] is not None and result["margin"] < best_score:
        lines += ["", f"The margin is smaller than the best score itself: {result['best']} and {result['second']} are "
                  "about equally close, so the logs do not tell them apart (more steps, or the exact data order, "
                  "would)."]
    lines += ["", "Distances are mean relative differences over the logged steps, mean |replay - reference| / "
              "|reference|; a candidate's score is the larger of its loss and grad-norm distances, and it matches "
              "when that score is within the tolerance (`--tolerance`). A float32 reference replayed in float32 "
              "agrees to about 1e-6; bfloat16 or other kernels add their rounding to every candidate alike.", "",
              "| step | loss (reference) | " + " | ".join(f"loss ({c})" for c in result["candidates"]) +
              " | grad norm (reference) | " + " | ".join(f"grad norm ({c})" for c in result["candidates"]) + " |",
              "|---" * (3 + 2 * len(result["candidates"])) + "|"]
    for r in result["steps"]:
        lines.append(f"| {r['step']} | {fmt(r['loss_reference'])} | "
                     + " | ".join(fmt(r[f"loss_{c}"]) for c in result["candidates"])
                     + f" | {fmt(r['grad_norm_reference'])} | "
                     + " | ".join(fmt(r[f"grad_norm_{c}"]) for c in result["candidates"]) + " |")
    ratio = result["grad_norm_ratio"]
    lines += ["", "## What the comparison needs", "",
              "The replay is exact only with the reference's data order: the same examples in the same optimizer "
              "steps, and within a step on the same micro-steps and ranks (that decides which examples the "
              "DeepSpeed defect drops and which tokens share a mean under mean-of-means). By default the examples "
              "are taken in the data file's order (a reference run with shuffling disabled); `--order FILE` gives "
              "the row indices in the order the reference consumed them. It also needs the same model, chat "
              "template, loss mask and optimizer settings as the config; a run in bfloat16 differs from the "
              "float32 replay by more than rounding.", "",
              "Without the order the loss curves are not comparable step by step, but the gradient-norm ratio "
              "still tells the DeepSpeed defect apart: it keeps 2 of the N micro-steps of every rank, so its norm "
              f"is about 2/N of the correct one's (here N = {n}: 2/N = "
              f"{fmt(ratio['two_over_n'] if ratio else None, 3)}), while a correct or mean-of-means run's norm is "
              "about the correct one's (mean-of-means moves it by the spread of the micro-batches' token counts)."]
    if ratio:
        lines += ["", f"Reference grad norm / correct replay's: median {fmt(ratio['median'], 4)} (min "
                  f"{fmt(ratio['min'], 4)}, max {fmt(ratio['max'], 4)}); the DeepSpeed replay's own ratio: median "
                  f"{fmt(ratio['deepspeed_offload_replay_median'], 4)}."]
    lines += ["", "A loss logged every k > 1 steps is compared as Hugging Face Trainer logs it: the mean of the "
              "losses since the previous logged step; the gradient norm is that of the logged step.", ""]
    return "\n".join(lines)
