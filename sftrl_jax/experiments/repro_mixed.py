"""Paper A's head-to-head at small scale (``sftrl-jax repro mixed``): SFT→RL vs the mixed-policy methods at equal
compute, from a base model that can learn from its own samples.

The base (``--base pretrained``, the default) is the demo-size model pretrained on the task's plain-text corpus
(:func:`~sftrl_jax.experiments.task.pretrain_corpus`: arithmetic facts and word problems with bare answers, no
chat template, no ``<think>`` traces, no ``\\boxed{}``), made once and shared by every seed and method. From it,
per seed:

- ``sft_then_rl``: SFT on the teacher traces (correct accumulation), then GRPO;
- ``sft_buggy_then_rl``, ``sft_both_bugs_then_rl``: the same with the SFT run under the emulated DeepSpeed-offload
  bug, and under both bugs (the published baselines);
- ``luffy``, ``chord``: from the base on the same SFT rows (the teacher traces are the demonstrations, as LUFFY's
  are its SFT data set's), with their published defaults where the toy allows (``MIXED``);
- ``zero_rl``: GRPO from the base on the RL prompts;
- ``sft_then_rl_truncated``: the correct SFT, then only ``truncated_rl_steps`` GRPO steps (Paper A: "even with just
  50 RL steps ... fewer FLOPs"); it reports its own FLOPs.

Every other run stops at the correct SFT→RL run's counted FLOPs (``train.max_flops``). The RL stages validate
greedily on the held-out problems every ``curve_every`` steps, which gives the accuracy-against-FLOPs curves.
``--base random`` runs the same comparison from the random base model (a variant: its own samples teach it
nothing). Writes ``report.json`` (``base_accuracy``, ``seeds``, ``methods: {name: {accuracy, per_seed, flops,
...}}``, ``verdicts: {name: {holds, margin, spread, ...}}``), ``report.md`` and ``accuracy_vs_flops.png``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..config import deep_merge, from_dict
from ..flops import COUNTED_FLOPS
from ..metrics import read_jsonl
from ..rl import RLConfig, run_rl
from ..sft import SFTConfig, run_sft
from .demo import demo_settings
from .workspace import MODEL_OPTIONS, begin, evaluate, mean, spread, with_compilation_cache

log = logging.getLogger("sftrl_jax.demo")

METHODS = ["sft_then_rl", "sft_buggy_then_rl", "sft_both_bugs_then_rl", "luffy", "chord", "zero_rl",
           "sft_then_rl_truncated"]
LABELS = {"sft_then_rl": "SFT→RL (correct SFT)", "sft_buggy_then_rl": "SFT→RL (SFT with the DeepSpeed-offload bug)",
          "sft_both_bugs_then_rl": "SFT→RL (SFT with both bugs)", "luffy": "LUFFY", "chord": "CHORD",
          "zero_rl": "zero RL (GRPO from the base)", "sft_then_rl_truncated": "SFT→RL, truncated RL"}
MIXED_METHODS = ("luffy", "chord")
BUGGY = ("sft_buggy_then_rl", "sft_both_bugs_then_rl")
# The emulated layout of the buggy SFTs: 4 ranks x 8 micro-steps x 1 sequence = the demo's 32-row batch, so the
# DeepSpeed-offload bug keeps micro-steps 0 and 7 of 8 (a quarter of each batch), as in LUFFY's 8 x 8 x 1 run;
# "both" also averages the per-micro-step loss means (OpenRLHF before its fix).
LAYOUT = {"emulate_ranks": 4, "emulate_micro_batch_size": 1}
SFT_BUGS = {"sft_then_rl": None, "sft_buggy_then_rl": {"emulate_bug": "deepspeed_offload", **LAYOUT},
            "sft_both_bugs_then_rl": {"emulate_bug": "both", **LAYOUT}}
# LUFFY and CHORD with their published defaults (sftrl_jax/rl/methods) on the RL stage's settings, except:
# - the demo's RL settings name the advantage and the aggregation (GRPO's std-normalised advantages, token-mean)
#   for every RL run; the mixed methods drop them, so LUFFY's (no std, seq-mean-token-sum-norm) and CHORD's apply;
# - LUFFY's entropy term is the token mean of verl's micro-batches over its 8 GPUs (rl.verl_ranks), and its summed
#   token losses are divided by its padded response length times those 8 ranks (rl.loss_scale_factor); the toy
#   runs on one rank (verl_ranks: 1, where the step fits one micro-batch), so the constant is its own padded
#   response length (sampling.max_new_tokens).
# CHORD's expert rows are drawn from the SFT data set (rl.expert_data, its default source).
MIXED = {"luffy": {"rl": {"method": "luffy", "verl_ranks": 1}}, "chord": {"rl": {"method": "chord"}}}
ZERO_RL: dict = {}  # GRPO from the base: the RL stage's own settings
# The pretrained base: the demo-size model, next-token loss on the task's plain-text corpus (a fresh tokenizer
# learns the corpus's words); settings (with the corpus's size) are part of the cache key of the made base.
PRETRAIN = {"documents": 20000,
            "sft": {"train": {"global_batch_size": 64, "max_steps": 1000},
                    "optimizer": {"learning_rate": 3e-3, "warmup_ratio": 0.05, "lr_schedule": "cosine",
                                  "weight_decay": 0.0},
                    "data": {"max_length": 64}}}
# The demo's SFT and RL settings, with 300 SFT steps (the SFT model's arithmetic is reliable from about there)
# and 16 prompts per RL step (the run's time is about six times the FLOP budget per seed; this keeps it in 45
# minutes on 2 CPU cores).
EXTRA = {"full": {"seeds": [0, 1, 2], "sft_steps": 300, "rl_steps": 20, "rl_prompts_per_step": 16,
                  "truncated_rl_steps": 4, "curve_every": 10, "pretrain_documents": 20000, "pretrain_steps": 1000},
         "quick": {"seeds": [0], "sft_steps": 4, "rl_steps": 2, "rl_prompts_per_step": 4, "truncated_rl_steps": 1,
                   "curve_every": 5, "pretrain_documents": 1000, "pretrain_steps": 30}}
BASES = ("pretrained", "random")


def _settings(quick: bool, base: str) -> dict:
    import jax

    if base not in BASES:
        raise ValueError(f"--base {base!r}: choose one of {', '.join(BASES)}")
    extra = EXTRA["quick" if quick else "full"]
    settings = demo_settings(quick, rl_prompts_per_step=extra["rl_prompts_per_step"])
    settings.update(seeds=extra["seeds"], base=base, truncated_rl_steps=extra["truncated_rl_steps"],
                    curve_every=extra["curve_every"])
    settings["sft"]["train"]["max_steps"] = extra["sft_steps"]
    settings["rl"]["train"]["max_steps"] = extra["rl_steps"]
    if base == "pretrained":
        pretrain = deep_merge(PRETRAIN, {"documents": extra["pretrain_documents"],
                                         "sft": {"train": {"max_steps": extra["pretrain_steps"]}}})
        train = pretrain["sft"]["train"]
        train["micro_batch_size"] = max(train["global_batch_size"] // jax.device_count(), 1)
        settings["pretrain"] = pretrain
    return settings


def _flops(output_dir: Path) -> float:
    """A run's counted FLOPs: its last record's cumulative :data:`~sftrl_jax.flops.COUNTED_FLOPS` values."""
    records = [r for r in read_jsonl(output_dir / "metrics.jsonl") if any(k in r for k in COUNTED_FLOPS)]
    return sum(records[-1].get(k, 0.0) for k in COUNTED_FLOPS) if records else 0.0


def _curve(output_dir: Path, offset: float) -> list[list[float]]:
    """``[[flops, accuracy], ...]`` of an RL run's validations (greedy held-out accuracy, ``val_score``), its
    FLOPs at each validated step plus ``offset`` (the FLOPs spent before the run, e.g. its SFT stage)."""
    records = read_jsonl(output_dir / "metrics.jsonl")
    spent = {0: 0.0}
    for r in records:
        if any(k in r for k in COUNTED_FLOPS):
            spent[r["step"]] = sum(r.get(k, 0.0) for k in COUNTED_FLOPS)
    return [[offset + spent.get(r["step"], 0.0), r["val_score"]] for r in records if "val_score" in r]


@with_compilation_cache
def run_repro_mixed(out: str | Path = "runs/repro_mixed", *, quick: bool = False, seeds: list[int] | None = None,
                    base: str = "pretrained", progress: bool = True) -> dict:
    start = time.time()
    settings = _settings(quick, base)
    out, seeds, work = begin(out, settings, seeds, pretrain=settings.get("pretrain"), progress=progress)
    # the pretraining's own time, also when this run reused a base made before (``pretrain/inputs.json``)
    record = out / "pretrain" / "inputs.json"
    pretrain_seconds = json.loads(record.read_text())["seconds"] if base == "pretrained" else 0.0
    test_file = work.prompt_files["test"]
    base_accuracy = evaluate(work.base, test_file, out / "eval_base")
    log.info("base model (%s): held-out accuracy %.3f", base, base_accuracy)
    runs = []
    for seed in seeds:
        run_dir = out / f"seed{seed}"
        sft_runs = {name: _sft_then_rl(work, settings, run_dir, seed, name, progress) for name in SFT_BUGS}
        runs.extend(sft_runs.values())
        correct = sft_runs["sft_then_rl"]
        runs.append(_truncated(work, settings, run_dir, seed, correct, progress))
        for method in (*MIXED_METHODS, "zero_rl"):
            runs.append(_from_base(work, settings, run_dir, seed, method, correct["flops"], progress))
    for run in runs:
        run["accuracy"] = evaluate(Path(run["final_model"]), test_file, Path(run["dir"]) / "eval")
        log.info("%s seed %d: accuracy %.3f at %.3g FLOPs", run["method"], run["seed"], run["accuracy"], run["flops"])
    return _report(out, settings, list(seeds), runs, base_accuracy, time.time() - start, quick,
                   num_test=len(work.splits["test"]), pretrain_seconds=pretrain_seconds)


def _rl_config(work, settings: dict, model: Path, output_dir: Path, seed: int, data: Path, extra: dict) -> RLConfig:
    """The RL stage's config: the demo's RL settings, validation on the held-out problems (greedy, every
    ``curve_every`` steps, none kept), then ``extra``."""
    validation = {"files": [str(work.prompt_files["test"])], "every": settings["curve_every"], "at_start": True,
                  "keep_best": False, "sampling": {"temperature": 0.0, "max_new_tokens": 40, "batch_size": 64}}
    return from_dict(RLConfig, deep_merge(deep_merge({
        "model": {"path": str(model), **MODEL_OPTIONS}, "output_dir": str(output_dir),
        "data": {"files": [str(data)]}, "train": {"seed": seed}, "mesh": {"fsdp": -1}, "validation": validation},
        settings["rl"]), extra))


def _sft_then_rl(work, settings: dict, run_dir: Path, seed: int, name: str, progress: bool) -> dict:
    tick = time.time()
    bug = SFT_BUGS[name]
    sft = run_sft(from_dict(SFTConfig, deep_merge({
        "model": {"path": str(work.base), **MODEL_OPTIONS}, "output_dir": str(run_dir / name / "sft"),
        "data": {"train_files": [str(work.sft_file)]}, "train": {"seed": seed}, "mesh": {"fsdp": -1}},
        deep_merge(settings["sft"], {"train": bug} if bug else {}))), progress=progress)
    sft_flops = _flops(sft.output_dir)
    rl = run_rl(_rl_config(work, settings, sft.final_dir, run_dir / name / "rl", seed, work.prompt_files["rl"], {}),
                progress=progress)
    return {"method": name, "seed": seed, "flops": sft_flops + _flops(rl.output_dir), "sft_flops": sft_flops,
            "steps": {"sft": sft.steps, "rl": rl.steps}, "seconds": time.time() - tick, "dir": str(run_dir / name),
            "sft_model": str(sft.final_dir), "final_model": str(rl.final_dir),
            "curve": _curve(rl.output_dir, sft_flops)}


def _truncated(work, settings: dict, run_dir: Path, seed: int, correct: dict, progress: bool) -> dict:
    """GRPO for ``truncated_rl_steps`` steps from the correct SFT run's model."""
    tick = time.time()
    name = "sft_then_rl_truncated"
    steps = settings["truncated_rl_steps"]
    rl = run_rl(_rl_config(work, settings, Path(correct["sft_model"]), run_dir / name, seed, work.prompt_files["rl"],
                           {"train": {"max_steps": steps}, "validation": {"every": steps}}), progress=progress)
    return {"method": name, "seed": seed, "flops": correct["sft_flops"] + _flops(rl.output_dir),
            "steps": {"sft": correct["steps"]["sft"], "rl": rl.steps}, "seconds": time.time() - tick,
            "dir": str(run_dir / name), "final_model": str(rl.final_dir),
            "curve": _curve(rl.output_dir, correct["sft_flops"])}


def _from_base(work, settings: dict, run_dir: Path, seed: int, method: str, budget: float, progress: bool) -> dict:
    """LUFFY or CHORD on the SFT rows, or zero RL on the RL prompts, from the base until ``budget`` FLOPs."""
    tick = time.time()
    if method == "zero_rl":
        data, extra = work.prompt_files["rl"], ZERO_RL
    else:
        data, extra = work.sft_file, MIXED[method]
        # their published defaults replace the RL stage's advantage and aggregation settings
        extra = deep_merge(extra, {"rl": {"norm_adv_by_std": None, "agg_mode": None}})
        if method == "luffy":
            extra = deep_merge(extra, {"rl": {"loss_scale_factor": settings["rl"]["sampling"]["max_new_tokens"]}})
        if method == "chord":
            extra = deep_merge(extra, {"rl": {"expert_data": [str(work.sft_file)]}})
    rl = run_rl(_rl_config(work, settings, work.base, run_dir / method, seed, data,
                           deep_merge(extra, {"train": {"max_flops": budget, "max_steps": 100_000}})),
                progress=progress)
    return {"method": method, "seed": seed, "flops": _flops(rl.output_dir), "steps": {"rl": rl.steps},
            "seconds": time.time() - tick, "dir": str(run_dir / method), "final_model": str(rl.final_dir),
            "curve": _curve(rl.output_dir, 0.0)}


def _per_seed(runs: list[dict], method: str, key: str = "accuracy") -> list[float]:
    return [r[key] for r in sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])]


def _verdict(claim: str, margins_per_seed: list[float], holds: bool, compared: str) -> dict:
    """A claim's verdict: ``margin`` the mean over seeds of the per-seed margin (accuracy points as a fraction;
    positive = the claim's direction), ``spread`` that margin's std over seeds, ``beyond_spread`` whether the
    margin is larger than its spread (never, with one seed: there is no spread to compare with)."""
    margin, noise = mean(margins_per_seed), spread(margins_per_seed)
    return {"claim": claim, "holds": bool(holds), "margin": margin, "spread": noise,
            "beyond_spread": bool(len(margins_per_seed) > 1 and abs(margin) > noise),
            "per_seed": margins_per_seed, "compared": compared}


def verdicts(methods: dict) -> dict:
    """The three claims, judged on the mean accuracies; margins are paired per seed (each seed's runs share
    its data order) between the methods the means single out."""
    acc = {name: row["accuracy"] for name, row in methods.items()}
    seeds = {name: row["per_seed"] for name, row in methods.items()}

    def diff(a: str, b: str) -> list[float]:
        return [x - y for x, y in zip(seeds[a], seeds[b])]

    weakest_mixed = min(MIXED_METHODS, key=acc.get)
    best_mixed = max(MIXED_METHODS, key=acc.get)
    best_buggy = max(BUGGY, key=acc.get)
    truncated = "sft_then_rl_truncated"
    cheaper = methods[truncated]["flops"] < min(methods[m]["flops"] for m in MIXED_METHODS)
    return {
        "mixed_beat_buggy": _verdict(
            "LUFFY and CHORD beat the buggy SFT→RL baselines (the published claim)",
            diff(weakest_mixed, best_buggy), acc[weakest_mixed] > acc[best_buggy],
            f"{weakest_mixed} (the weaker mixed method) minus {best_buggy} (the stronger buggy baseline)"),
        "sft_rl_at_least_best_mixed": _verdict(
            "correct SFT→RL is at least as good as the best mixed method (Paper A)",
            diff("sft_then_rl", best_mixed), acc["sft_then_rl"] >= acc[best_mixed],
            f"sft_then_rl minus {best_mixed} (the better mixed method)"),
        "truncated_beats_mixed": _verdict(
            "SFT→RL truncated to a few RL steps beats the mixed methods at fewer FLOPs (Paper A)",
            diff(truncated, best_mixed), acc[truncated] > acc[best_mixed] and cheaper,
            f"{truncated} minus {best_mixed} (the better mixed method); fewer FLOPs than both: {cheaper}"),
    }


def _finding(name: str, verdict: dict) -> str:
    state = ("holds" if verdict["holds"] else "does not hold") + (
        ", beyond the seed spread" if verdict["beyond_spread"] else
        ", within the seed spread" if len(verdict["per_seed"]) > 1 else " (one seed: no spread)")
    return (f"- {verdict['claim']}: {state} (margin {100 * verdict['margin']:+.1f} ± {100 * verdict['spread']:.1f} "
            f"points over seeds; {verdict['compared']})")


def _report(out: Path, settings: dict, seeds: list[int], runs: list[dict], base_accuracy: float, seconds: float,
            quick: bool, *, num_test: int, pretrain_seconds: float) -> dict:
    """Write ``report.json``, ``report.md`` and ``accuracy_vs_flops.png``; return the report."""
    methods = {}
    for name in METHODS:
        per_seed = _per_seed(runs, name)
        methods[name] = {"label": LABELS[name], "accuracy": mean(per_seed), "per_seed": per_seed,
                         "spread": spread(per_seed), "flops": mean(_per_seed(runs, name, "flops")),
                         "flops_per_seed": _per_seed(runs, name, "flops"),
                         "steps_per_seed": _per_seed(runs, name, "steps"),
                         "curve_per_seed": _per_seed(runs, name, "curve")}
    judged = verdicts(methods)
    zero = methods["zero_rl"]["curve_per_seed"]
    findings = [f"- {_base_finding(settings['base'], base_accuracy, zero)}"]
    findings += [_finding(name, v) for name, v in judged.items()]
    report = {"base": settings["base"], "base_accuracy": base_accuracy, "seeds": seeds, "methods": methods,
              "verdicts": judged, "findings": findings, "num_test_problems": num_test, "quick": quick,
              "seconds": seconds, "pretrain_seconds": pretrain_seconds,
              "settings": {**settings, "sft_bugs": SFT_BUGS, "mixed": MIXED, "zero_rl": ZERO_RL}, "runs": runs}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(methods, base_accuracy, out / "accuracy_vs_flops.png")
    (out / "report.md").write_text(_markdown(report))
    return report


def _base_finding(base: str, accuracy: float, zero_curves: list[list[list[float]]]) -> str:
    """The base model's held-out accuracy and what zero RL makes of it (first and last validation, mean over
    seeds)."""
    firsts = [c[0][1] for c in zero_curves if c]
    lasts = [c[-1][1] for c in zero_curves if c]
    return (f"the {base} base model answers {100 * accuracy:.1f} % of the held-out problems; GRPO from it (zero RL) "
            f"goes from {100 * mean(firsts):.1f} % to {100 * mean(lasts):.1f} % (mean over seeds) within the budget")


def _plot(methods: dict, base_accuracy: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for index, row in enumerate(methods.values()):
        color = f"C{index}"
        for curve in row["curve_per_seed"]:
            if curve:
                ax.plot([p[0] for p in curve], [100 * p[1] for p in curve], color=color, alpha=0.35, lw=1)
        ax.scatter(row["flops_per_seed"], [100 * a for a in row["per_seed"]], color=color, label=row["label"], s=30)
    ax.axhline(100 * base_accuracy, color="grey", ls=":", lw=1, label="base model")
    ax.set_xlabel("counted training FLOPs (SFT + RL: updates, log-probs, generation)")
    ax.set_ylabel("held-out accuracy (%, greedy)")
    ax.set_title("curves: validation during RL (per seed); points: final models")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(report: dict) -> str:
    rows = "\n".join(f"| {row['label']} | {100 * row['accuracy']:.1f} | "
                     f"{', '.join(f'{100 * a:.1f}' for a in row['per_seed'])} | {100 * row['spread']:.1f} | "
                     f"{row['flops']:.3g} |" for row in report["methods"].values())
    settings = report["settings"]
    quick = " (a --quick run: one seed, a few steps; a set-up check, not a result)" if report["quick"] else ""
    return f"""# SFT→RL vs mixed-policy methods at equal compute (embedded task, {report['base']} base){quick}

{chr(10).join(report['findings'])}

| method | held-out accuracy % (mean) | per seed | seed spread (std, points) | FLOPs (mean) |
|---|---|---|---|---|
{rows}

Held-out problems: {report['num_test_problems']} (greedy, math-verify). Seeds: {report['seeds']}. Every run except the
truncated SFT→RL stops once its counted FLOPs reach the correct SFT→RL run's total (`train.max_flops`). The buggy
SFTs emulate DeepSpeed's CPU-offload accumulation (and, for "both bugs", OpenRLHF's mean of micro-batch means) on
a 4 x 8 x 1 virtual layout. Time: {report['seconds']:.0f} s (making the pretrained base took
{report['pretrain_seconds']:.0f} s; a run that reuses it from its folder skips that).

Settings: {json.dumps(settings)}.

Files: `accuracy_vs_flops.png`, `report.json`, per-seed run folders `seed*/<method>/`.
"""
