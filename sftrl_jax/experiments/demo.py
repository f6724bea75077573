"""``sftrl-jax demo``: base -> SFT -> GRPO -> evaluation on the embedded task, offline on a CPU.

Everything goes through the library's normal entry points (``run_sft``, ``run_rl``, ``run_eval``)
with configs built from the dictionaries below, so the demo exercises exactly the code a real run
uses. Training seeds vary the data order and the rollouts; the task, tokenizer and base model are
fixed, so the spread across training seeds is what the acceptance margins are compared with.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

from ..config import deep_merge, from_dict
from ..metrics import plot_curves, read_jsonl
from ..rl import RLConfig, run_rl
from ..sft import SFTConfig, run_sft
from .task import teacher_accuracy
from .workspace import MODEL_OPTIONS, TASK_SEED, answer_stats, begin, evaluate, mean, spread, with_compilation_cache

log = logging.getLogger("sftrl_jax.demo")

FULL = {
    "splits": {"sft": 2000, "rl": 2000, "test": 200},
    "model": {"hidden_size": 128, "num_layers": 2, "intermediate_size": 384},
    "seeds": [0, 1],
    "sft": {"train": {"global_batch_size": 32, "micro_batch_size": 32, "max_steps": 400},
            "optimizer": {"learning_rate": 3e-3, "warmup_ratio": 0.1, "lr_schedule": "cosine", "weight_decay": 0.0},
            "data": {"max_length": 128}},
    "rl": {"rl": {"prompts_per_step": 32, "mini_batches_per_step": 2, "ppo_epochs": 1, "norm_adv_by_std": True,
                  "agg_mode": "token-mean"},
           "train": {"micro_batch_size": 128, "max_steps": 40},
           "optimizer": {"learning_rate": 2e-4},
           "sampling": {"n": 8, "max_new_tokens": 40, "temperature": 1.0, "batch_size": 32},
           "reward": {"num_workers": 1}},
}
QUICK = copy.deepcopy(FULL)
QUICK.update(splits={"sft": 1000, "rl": 400, "test": 64}, seeds=[0])
QUICK["sft"]["train"].update(max_steps=150)
QUICK["rl"]["train"].update(max_steps=3)
QUICK["rl"]["rl"].update(prompts_per_step=8, mini_batches_per_step=1, ppo_epochs=1)


def demo_settings(quick: bool, *, rl_prompts_per_step: int | None = None) -> dict:
    """The run settings, with micro-batches sized to the local devices (one micro-step per update);
    ``rl_prompts_per_step`` replaces the RL stage's prompts per step."""
    import jax

    settings = copy.deepcopy(QUICK if quick else FULL)
    if rl_prompts_per_step is not None:
        settings["rl"]["rl"]["prompts_per_step"] = rl_prompts_per_step
    devices = jax.device_count()
    train = settings["sft"]["train"]
    train["micro_batch_size"] = max(train["global_batch_size"] // devices, 1)
    rl = settings["rl"]
    rl["train"]["micro_batch_size"] = max(rl["rl"]["prompts_per_step"] * rl["sampling"]["n"]
                                          // rl["rl"]["mini_batches_per_step"] // devices, 1)
    return settings


@with_compilation_cache
def run_demo(out: str | Path = "runs/demo", *, quick: bool = False, seeds: list[int] | None = None,
             progress: bool = True) -> dict:
    start = time.time()
    settings = demo_settings(quick)
    out, seeds, work = begin(out, settings, seeds)
    splits, sft_file, base = work.splits, work.sft_file, work.base
    rl_file, test_file = work.prompt_files["rl"], work.prompt_files["test"]

    timings = {}
    tick = time.time()
    base_accuracy = evaluate(base, test_file, out / "eval_base")
    timings["eval_base"] = time.time() - tick
    runs = []
    for seed in seeds:
        run_dir = out / f"seed{seed}"
        tick = time.time()
        sft_cfg = from_dict(SFTConfig, deep_merge({
            "model": {"path": str(base), **MODEL_OPTIONS}, "output_dir": str(run_dir / "sft"),
            "data": {"train_files": [str(sft_file)]}, "train": {"seed": seed}, "mesh": {"fsdp": -1}}, settings["sft"]))
        sft = run_sft(sft_cfg, progress=progress)
        sft_seconds = time.time() - tick
        sft_accuracy = evaluate(sft.final_dir, test_file, run_dir / "eval_sft")
        tick = time.time()
        rl_cfg = from_dict(RLConfig, deep_merge({
            "model": {"path": str(sft.final_dir), **MODEL_OPTIONS}, "output_dir": str(run_dir / "rl"),
            "data": {"files": [str(rl_file)]}, "train": {"seed": seed}, "mesh": {"fsdp": -1}}, settings["rl"]))
        rl = run_rl(rl_cfg, progress=progress)
        rl_seconds = time.time() - tick
        rl_accuracy = evaluate(rl.final_dir, test_file, run_dir / "eval_rl")
        answers = {stage: answer_stats(splits["test"], run_dir / f"eval_{stage}") for stage in ("sft", "rl")}
        runs.append({"seed": seed, "sft_accuracy": sft_accuracy, "rl_accuracy": rl_accuracy, "answers": answers,
                     "sft_seconds": sft_seconds, "rl_seconds": rl_seconds, "sft_dir": str(sft.output_dir),
                     "rl_dir": str(rl.output_dir), "final_model": str(rl.final_dir)})
        log.info("seed %d: base %.3f -> SFT %.3f -> SFT+RL %.3f", seed, base_accuracy, sft_accuracy, rl_accuracy)

    report = _report(out, settings, seeds, base_accuracy, runs, len(splits["test"]), time.time() - start, quick,
                     teacher=teacher_accuracy(splits["sft"]))
    return report


def _report(out: Path, settings: dict, seeds, base_accuracy: float, runs: list[dict], num_test: int, seconds: float,
            quick: bool, teacher: float) -> dict:
    """Write ``report.json``, the first seed's curves and ``metrics.jsonl``, and ``report.md``; return the report."""
    sft = [r["sft_accuracy"] for r in runs]
    rl = [r["rl_accuracy"] for r in runs]
    sft_mean, rl_mean = mean(sft), mean(rl)
    seed_spread = max(spread(sft), spread(rl))
    report = {
        "base_accuracy": base_accuracy, "sft_accuracy": sft_mean, "rl_accuracy": rl_mean,
        "sft_accuracy_per_seed": sft, "rl_accuracy_per_seed": rl, "seed_spread_std": seed_spread,
        "margin_sft_over_base": sft_mean - base_accuracy, "margin_rl_over_sft": rl_mean - sft_mean,
        "accepted": bool(sft_mean - base_accuracy > seed_spread and rl_mean - sft_mean > seed_spread
                         and all(s > base_accuracy for s in sft) and all(r > s for r, s in zip(rl, sft))),
        "teacher_accuracy_on_sft_data": teacher, "num_test_problems": num_test, "seeds": list(seeds), "seconds": seconds, "quick": quick,
        "runs": runs, "settings": settings, "final_model": runs[0]["final_model"],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _write_curves(out, runs[0])
    (out / "report.md").write_text(_report_markdown(report))
    return report


def _write_curves(out: Path, first: dict) -> None:
    """Plot the ``first`` seed's SFT loss and GRPO reward, and copy both stages' metrics to ``metrics.jsonl``."""
    sft_records = read_jsonl(Path(first["sft_dir"]) / "metrics.jsonl")
    rl_records = read_jsonl(Path(first["rl_dir"]) / "metrics.jsonl")
    plot_curves(sft_records, ["loss"], out / "sft_loss.png", title=f"SFT loss (seed {first['seed']})")
    plot_curves(rl_records, ["reward_mean", "accuracy"], out / "rl_reward.png",
                title=f"GRPO reward and rollout accuracy (seed {first['seed']})")
    metrics_out = out / "metrics.jsonl"
    metrics_out.write_text("".join(json.dumps({"stage": "sft", **r}) + "\n" for r in sft_records)
                           + "".join(json.dumps({"stage": "rl", **r}) + "\n" for r in rl_records))


def _per_seed_rows(runs: list[dict], base_accuracy: float) -> str:
    """The per-seed accuracy and timing table's rows (markdown)."""
    return "\n".join(f"| {r['seed']} | {100 * base_accuracy:.1f} | {100 * r['sft_accuracy']:.1f} | "
                     f"{100 * r['rl_accuracy']:.1f} | {r['sft_seconds']:.0f} | {r['rl_seconds']:.0f} |" for r in runs)


def _answer_rows(runs: list[dict]) -> str:
    """The wrong-answer table's rows (markdown): per seed and stage, two-step stops and wrong arithmetic steps."""
    return "\n".join(
        f"| {r['seed']} | {stage} | {a['stopped_after_two_steps']} / {a['three_step_problems']} | "
        f"{a['wrong_steps']} / {a['steps']} |"
        for r in runs for stage, a in (("SFT", r["answers"]["sft"]), ("SFT→RL", r["answers"]["rl"])))


def _report_markdown(report: dict) -> str:
    """``report.md``'s text, from the report :func:`_report` returns."""
    runs, settings, first = report["runs"], report["settings"], report["runs"][0]
    base_accuracy, sft_mean, rl_mean = report["base_accuracy"], report["sft_accuracy"], report["rl_accuracy"]
    seed_spread, teacher = report["seed_spread_std"], report["teacher_accuracy_on_sft_data"]
    num_test, seconds, quick = report["num_test_problems"], report["seconds"], report["quick"]
    per_seed = _per_seed_rows(runs, base_accuracy)
    verdict = "PASSED" if report["accepted"] else "NOT MET"
    answers = _answer_rows(runs)
    text = f"""# sftrl-jax demo report

Task: arithmetic word problems (2-3 steps, integer answer), generated from seed {TASK_SEED};
{num_test} held-out test problems, disjoint from the SFT and RL problems. Greedy decoding,
math-verify grading of `\\boxed{{}}`. The SFT traces come from an imperfect teacher whose boxed
answer is right on {100 * teacher:.1f}% of the SFT problems (it skips the last of three operations half the time). Base model: a randomly initialised Llama-family decoder
({settings['model']}; `base_model/`, HF format). Total time {seconds:.0f} s{' (quick mode)' if quick else ''}.

| | base | SFT | SFT→RL |
|---|---|---|---|
| held-out accuracy (mean over {len(runs)} seed{'s' if len(runs) > 1 else ''}) | {100 * base_accuracy:.1f}% | {100 * sft_mean:.1f}% | {100 * rl_mean:.1f}% |

Per training seed:

| seed | base % | SFT % | SFT→RL % | SFT s | RL s |
|---|---|---|---|---|---|
{per_seed}

Seed-to-seed spread (largest std over seeds of the SFT and SFT→RL accuracies): {100 * seed_spread:.1f} points.
Margins: SFT − base = {100 * report['margin_sft_over_base']:.1f} points; SFT→RL − SFT =
{100 * report['margin_rl_over_sft']:.1f} points. Acceptance (each margin larger than the spread, and
the order holds for every seed): **{verdict}**.

How the held-out answers go wrong (greedy, `seed*/eval_*/generations.jsonl`): three-operation
problems answered after two steps, the teacher's slip that SFT copies and GRPO can unlearn; and
written steps whose arithmetic is wrong.

| seed | model | three-step problems stopped after two steps | wrong arithmetic steps |
|---|---|---|---|
{answers}

Settings: SFT {json.dumps(settings['sft'])}; RL {json.dumps(settings['rl'])}.

Files: `sft_loss.png`, `rl_reward.png` (seed {first['seed']}), `metrics.jsonl`, per-seed run folders
(`seed*/sft`, `seed*/rl` with checkpoints and `final/`), evaluation outputs (`eval_*`,
`seed*/eval_*`), and the final model `{first['final_model']}` (loads in `transformers`).
"""
    return text
