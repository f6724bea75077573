"""Paper A's head-to-head at small scale (``sftrl-jax repro mixed``): SFT→RL vs LUFFY vs CHORD at equal compute.

On the demo's embedded task, per seed: SFT (correct accumulation) then GRPO; the same with the SFT
stage run with the DeepSpeed-offload bug emulated (Paper A's broken baseline: 2 of 8 micro-steps
reach the optimizer); and, from the base model, LUFFY and CHORD on the same SFT rows (prompt,
ground truth, the teacher's trace as demonstration), each stopped once its counted FLOPs reach
the correct SFT→RL run's total (``train.max_flops``). Every final model is evaluated greedily on the
held-out problems. Writes ``report.json`` (``{"methods": {name: {"accuracy", "per_seed", "flops"}}}``),
``report.md`` and ``accuracy_vs_flops.png``.
"""

from __future__ import annotations

import copy
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

METHODS = ["sft_then_rl", "sft_buggy_then_rl", "luffy", "chord"]
LABELS = {"sft_then_rl": "SFT→RL (correct SFT)", "sft_buggy_then_rl": "SFT→RL (SFT with the DeepSpeed-offload bug)",
          "luffy": "LUFFY (from base)", "chord": "CHORD (from base)"}
# the emulated layout of the buggy SFT: 4 ranks x 8 micro-steps x 1 sequence = the demo's 32-row batch, so
# the bug keeps micro-steps 0 and 7 of 8 (a quarter of each batch), as in LUFFY's 8 x 8 x 1 run
BUG = {"emulate_bug": "deepspeed_offload", "emulate_ranks": 4, "emulate_micro_batch_size": 1}
# the mixed methods learn the answer format from demonstrations, as SFT does, so they get SFT's learning
# rate (the random base model gives the on-policy samples nothing to learn from at RL's)
# the toy's settings for LUFFY and CHORD; its entropy bonus is aggregated as its policy loss (token-mean), not
# over the 8-GPU micro-batches of LUFFY's runs
MIXED = {"optimizer": {"learning_rate": 3e-3, "warmup_ratio": 0.0, "lr_schedule": "constant"},
         "train": {"max_steps": 2000}, "rl": {"entropy_agg": "loss"}}
EXTRA = {"full": {"seeds": [0, 1], "sft_steps": 200, "rl_steps": 20},
         "quick": {"seeds": [0], "sft_steps": 30, "rl_steps": 2}}


def _settings(quick: bool) -> dict:
    settings = demo_settings(quick)
    extra = EXTRA["quick" if quick else "full"]
    settings["seeds"] = extra["seeds"]
    settings["sft"]["train"]["max_steps"] = extra["sft_steps"]
    settings["rl"]["train"]["max_steps"] = extra["rl_steps"]
    return settings


def _flops(output_dir: Path) -> float:
    """A run's counted FLOPs: its last record's cumulative :data:`~sftrl_jax.flops.COUNTED_FLOPS` values."""
    records = [r for r in read_jsonl(output_dir / "metrics.jsonl") if any(k in r for k in COUNTED_FLOPS)]
    return sum(records[-1].get(k, 0.0) for k in COUNTED_FLOPS) if records else 0.0


@with_compilation_cache
def run_repro_mixed(out: str | Path = "runs/repro_mixed", *, quick: bool = False, seeds: list[int] | None = None,
                    progress: bool = True) -> dict:
    start = time.time()
    settings = _settings(quick)
    out, seeds, work = begin(out, settings, seeds)
    test_file = work.prompt_files["test"]
    runs = []
    for seed in seeds:
        for buggy in (False, True):
            runs.append(_sft_then_rl(work, settings, out / f"seed{seed}", seed, buggy, progress))
        budget = runs[-2]["flops"]  # the correct SFT→RL run's total
        for method in ("luffy", "chord"):
            runs.append(_mixed(work, settings, out / f"seed{seed}", seed, method, budget, progress))
    for run in runs:
        run["accuracy"] = evaluate(Path(run["final_model"]), test_file, Path(run["dir"]) / "eval")
        log.info("%s seed %d: accuracy %.3f at %.3g FLOPs", run["method"], run["seed"], run["accuracy"], run["flops"])
    return _report(out, settings, list(seeds), runs, time.time() - start, quick, num_test=len(work.splits["test"]))


def _sft_then_rl(work, settings, run_dir: Path, seed: int, buggy: bool, progress: bool) -> dict:
    name = "sft_buggy_then_rl" if buggy else "sft_then_rl"
    tick = time.time()
    sft_settings = deep_merge(settings["sft"], {"train": BUG} if buggy else {})
    sft = run_sft(from_dict(SFTConfig, deep_merge({
        "model": {"path": str(work.base), **MODEL_OPTIONS}, "output_dir": str(run_dir / name / "sft"),
        "data": {"train_files": [str(work.sft_file)]}, "train": {"seed": seed}, "mesh": {"fsdp": -1}},
        sft_settings)), progress=progress)
    rl = run_rl(from_dict(RLConfig, deep_merge({
        "model": {"path": str(sft.final_dir), **MODEL_OPTIONS}, "output_dir": str(run_dir / name / "rl"),
        "data": {"files": [str(work.prompt_files["rl"])]}, "train": {"seed": seed}, "mesh": {"fsdp": -1}},
        settings["rl"])), progress=progress)
    return {"method": name, "seed": seed, "flops": _flops(sft.output_dir) + _flops(rl.output_dir),
            "steps": {"sft": sft.steps, "rl": rl.steps}, "seconds": time.time() - tick,
            "dir": str(run_dir / name), "final_model": str(rl.final_dir)}


def _mixed(work, settings, run_dir: Path, seed: int, method: str, budget: float, progress: bool) -> dict:
    tick = time.time()
    # CHORD as LUFFY gets its demonstrations: each prompt's own, in its group (rl.expert_source=group)
    grouped = {"expert_source": "group"} if method == "chord" else {}
    rl_settings = deep_merge(settings["rl"], deep_merge(MIXED, {"rl": {"method": method, **grouped},
                                                                "train": {"max_flops": budget}}))
    rl = run_rl(from_dict(RLConfig, deep_merge({
        "model": {"path": str(work.base), **MODEL_OPTIONS}, "output_dir": str(run_dir / method),
        "data": {"files": [str(work.sft_file)]}, "train": {"seed": seed}, "mesh": {"fsdp": -1}},
        rl_settings)), progress=progress)
    return {"method": method, "seed": seed, "flops": _flops(rl.output_dir), "steps": {"rl": rl.steps},
            "seconds": time.time() - tick, "dir": str(run_dir / method), "final_model": str(rl.final_dir)}


def _verdict(methods: dict) -> tuple[bool, bool, str]:
    """Whether Paper A's ordering (correct SFT→RL ≥ each mixed method > buggy SFT→RL) holds, whether beyond the
    seed spread, and the finding in words with each margin."""
    acc = {name: methods[name]["accuracy"] for name in METHODS}
    noise = max(methods[name]["spread"] for name in METHODS)
    mixed = ("luffy", "chord")
    holds = all(acc["sft_then_rl"] >= acc[m] > acc["sft_buggy_then_rl"] for m in mixed)
    clear = holds and all(acc["sft_then_rl"] - acc[m] > noise and acc[m] - acc["sft_buggy_then_rl"] > noise
                          for m in mixed if acc["sft_then_rl"] != acc[m])
    state = ("holds, beyond the seed spread" if clear else "holds, but not beyond the seed spread" if holds
             else "does not hold here")

    ahead = ", ".join(f"{m.upper()} {100 * (acc['sft_then_rl'] - acc[m]):+.1f}" for m in mixed)
    above = ", ".join(f"{m.upper()} {100 * (acc[m] - acc['sft_buggy_then_rl']):+.1f}" for m in mixed)
    detail = (f"correct SFT→RL minus each mixed method: {ahead} points; each mixed method minus the buggy "
              f"SFT→RL: {above} points; largest seed spread {100 * noise:.1f} points")
    return holds, clear, f"{state} ({detail})"


def _report(out: Path, settings: dict, seeds: list[int], runs: list[dict], seconds: float, quick: bool, *,
            num_test: int) -> dict:
    """Write ``report.json``, ``report.md`` and ``accuracy_vs_flops.png``; return the report."""
    methods = {}
    for name in METHODS:
        mine = [r for r in runs if r["method"] == name]
        methods[name] = {"label": LABELS[name], "accuracy": mean([r["accuracy"] for r in mine]),
                         "per_seed": [r["accuracy"] for r in mine], "spread": spread([r["accuracy"] for r in mine]),
                         "flops": mean([r["flops"] for r in mine]), "flops_per_seed": [r["flops"] for r in mine],
                         "steps_per_seed": [r["steps"] for r in mine]}
    holds, clear, verdict = _verdict(methods)
    report = {"methods": methods, "ordering_holds": holds, "ordering_beyond_spread": clear,
              "finding": f"Paper A's ordering (correct SFT→RL ≥ LUFFY, CHORD > buggy SFT→RL) {verdict}",
              "seeds": seeds, "num_test_problems": num_test, "quick": quick, "seconds": seconds,
              "settings": {"sft": settings["sft"], "rl": settings["rl"], "buggy_sft": BUG, "mixed": MIXED},
              "runs": runs}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(methods, out / "accuracy_vs_flops.png")
    (out / "report.md").write_text(_markdown(report))
    return report


def _plot(methods: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for row in methods.values():
        ax.scatter(row["flops_per_seed"], [100 * a for a in row["per_seed"]], label=row["label"], s=40)
    ax.set_xlabel("counted training FLOPs (SFT + RL: updates, log-probs, generation)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(report: dict) -> str:
    rows = "\n".join(f"| {row['label']} | {100 * row['accuracy']:.1f} | "
                     f"{', '.join(f'{100 * a:.1f}' for a in row['per_seed'])} | {100 * row['spread']:.1f} | "
                     f"{row['flops']:.3g} |" for row in report["methods"].values())
    settings = copy.deepcopy(report["settings"])
    return f"""# SFT→RL vs mixed-policy methods at equal compute (embedded task)

{report['finding']}{' (a --quick run: one seed, a few steps; a set-up check, not a result)' if report['quick'] else ''}.

| method | held-out accuracy % (mean) | per seed | seed spread (std, points) | FLOPs (mean) |
|---|---|---|---|---|
{rows}

Held-out problems: {report['num_test_problems']} (greedy, math-verify). Seeds: {report['seeds']}.
LUFFY and CHORD start from the base model and stop once their counted FLOPs reach the correct
SFT→RL run's total (`train.max_flops`); the buggy SFT emulates DeepSpeed's CPU-offload accumulation
on a 4 x 8 x 1 virtual layout (2 of 8 micro-steps reach the optimizer). Time: {report['seconds']:.0f} s.

Settings: {json.dumps(settings)}.

Files: `accuracy_vs_flops.png`, `report.json`, per-seed run folders `seed*/<method>/`.
"""
