"""The shipped TPU and GPU configs compiled for their real targets on this CPU, and their table.

    python scripts/compile_configs.py                 # every run of RUNS (~15-25 min on 2 cores), then render
    python scripts/compile_configs.py --only sft_qwen # runs whose name contains this, then render
    python scripts/render_docs.py                     # re-render from the JSON files only (no compiling)

Each run is one ``sftrl-jax compile --json docs/results/compile/NAME.json`` in its own process (the
model shapes come from ``configs/models/*/config.json``: no weights are read). The table in
``docs/scaling.md`` between the ``compile-table`` markers is :func:`render_table` of those files (rows in
the order of :data:`RUNS`), rendered with every other generated block by
:mod:`sftrl_jax.tools.render_docs`, so a re-run updates the page instead of a hand edit. Compiling needs
the ``aot`` extra (``pip install -e '.[aot]'``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from . import ROOT

RESULTS = ROOT / "docs" / "results" / "compile"
MODELS = {"qwen2.5-math-7b": "Qwen2.5-Math-7B", "llama-3.1-8b": "Llama-3.1-8B", "qwen3-0.6b": "Qwen3-0.6B"}

# (result name, config, topology, extra overrides): every config in configs/tpu and configs/gpu with the
# target its header names, plus the comparisons docs/scaling.md discusses
RUNS = [
    ("tpu_sft_qwen2.5-math-7b_v5p-64", "configs/tpu/sft_qwen2.5-math-7b_v5p-64.yaml", "v5p-64", []),
    ("tpu_sft_qwen2.5-math-7b_v5p-64_dense", "configs/tpu/sft_qwen2.5-math-7b_v5p-64.yaml", "v5p-64",
     ["model.attention=dense", "model.logits_chunk_size=0"]),
    # the same comparison at one row per chip
    ("tpu_sft_qwen2.5-math-7b_v5p-64_mb1", "configs/tpu/sft_qwen2.5-math-7b_v5p-64.yaml", "v5p-64",
     ["train.micro_batch_size=1"]),
    ("tpu_sft_qwen2.5-math-7b_v5p-64_mb1_dense", "configs/tpu/sft_qwen2.5-math-7b_v5p-64.yaml", "v5p-64",
     ["train.micro_batch_size=1", "model.attention=dense", "model.logits_chunk_size=0"]),
    ("tpu_rl_qwen2.5-math-7b_v5p-64", "configs/tpu/rl_qwen2.5-math-7b_v5p-64.yaml", "v5p-64", []),
    ("tpu_rl_luffy_qwen2.5-math-7b_v5p-64", "configs/tpu/rl_luffy_qwen2.5-math-7b_v5p-64.yaml", "v5p-64", []),
    ("tpu_sft_llama-3.1-8b_v6e-64", "configs/tpu/sft_llama-3.1-8b_v6e-64.yaml", "v6e-64", []),
    ("tpu_rl_llama-3.1-8b_v6e-64", "configs/tpu/rl_llama-3.1-8b_v6e-64.yaml", "v6e-64", []),
    ("tpu_pipeline_qwen3-0.6b_sft_rl_v5p-8", "configs/tpu/pipeline_qwen3-0.6b_sft_rl_v5p-8.yaml", "v5p-8", []),
    ("tpu_pipeline_qwen3-0.6b_rl_sft_v5p-8", "configs/tpu/pipeline_qwen3-0.6b_rl_sft_v5p-8.yaml", "v5p-8", []),
    ("tpu_pipeline_qwen3-0.6b_cola_sft_rl_v5p-8", "configs/tpu/pipeline_qwen3-0.6b_cola_sft_rl_v5p-8.yaml", "v5p-8",
     []),
    ("tpu_pipeline_qwen3-0.6b_cola_rl_sft_v5p-8", "configs/tpu/pipeline_qwen3-0.6b_cola_rl_sft_v5p-8.yaml", "v5p-8",
     []),
    ("gpu_sft_qwen2.5-math-7b_8xh100", "configs/gpu/sft_qwen2.5-math-7b_8xh100.yaml", "8xh100", []),
    ("gpu_rl_qwen2.5-math-7b_8xh100", "configs/gpu/rl_qwen2.5-math-7b_8xh100.yaml", "8xh100", []),
    ("gpu_rl_luffy_qwen2.5-math-7b_8xh100", "configs/gpu/rl_luffy_qwen2.5-math-7b_8xh100.yaml", "8xh100", []),
    ("gpu_sft_llama-3.1-8b_8xh100", "configs/gpu/sft_llama-3.1-8b_8xh100.yaml", "8xh100", []),
    ("gpu_rl_llama-3.1-8b_8xh100", "configs/gpu/rl_llama-3.1-8b_8xh100.yaml", "8xh100", []),
    ("gpu_pipeline_qwen3-0.6b_sft_rl_8xh100", "configs/gpu/pipeline_qwen3-0.6b_sft_rl_8xh100.yaml", "8xh100", []),
    ("gpu_pipeline_qwen3-0.6b_rl_sft_8xh100", "configs/gpu/pipeline_qwen3-0.6b_rl_sft_8xh100.yaml", "8xh100", []),
    ("gpu_pipeline_qwen3-0.6b_cola_sft_rl_8xh100", "configs/gpu/pipeline_qwen3-0.6b_cola_sft_rl_8xh100.yaml",
     "8xh100", []),
    ("gpu_pipeline_qwen3-0.6b_cola_rl_sft_8xh100", "configs/gpu/pipeline_qwen3-0.6b_cola_rl_sft_8xh100.yaml",
     "8xh100", []),
    # the fit question the GPU benchmark could not answer without a device: the 7B SFT step on ONE H200
    ("gpu_sft_qwen2.5-math-7b_1xh200", "configs/gpu/sft_qwen2.5-math-7b_8xh100.yaml", "1xh200",
     ["mesh.fsdp=1", "mesh.tensor=1"]),
]


def model_dir(config: str) -> str:
    name = next(key for key in MODELS if key in Path(config).name)
    return f"configs/models/{MODELS[name]}"


def compile_run(name: str, config: str, topology: str, overrides: list[str]) -> None:
    """One ``sftrl-jax compile`` of ``config`` for ``topology`` in its own process, into ``RESULTS/NAME.json``
    (with the command and its wall time added)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    cmd = [sys.executable, "-m", "sftrl_jax.cli", "compile", "--config", config, "--topology", topology,
           "--json", str(out.relative_to(ROOT)), "--quiet", f"model.path={model_dir(config)}", *overrides]
    print("$ " + " ".join(cmd[2:]), flush=True)
    tick = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT)
    if not out.exists():
        raise SystemExit(f"{name}: compile failed (exit {done.returncode})")
    result = json.loads(out.read_text())
    result["command"] = "sftrl-jax " + " ".join(cmd[3:])
    result["wall_seconds"] = round(time.perf_counter() - tick, 1)
    out.write_text(json.dumps(result, indent=1) + "\n")


def run_names() -> list[str]:
    """The names of :data:`RUNS`, in order (the table's row order)."""
    return [name for name, *_ in RUNS]


def main(argv: list[str] | None = None) -> None:
    """Compile the runs (``--only SUBSTRING``: those whose name contains it); rendering is the caller's."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="compile only the runs whose name contains this")
    args = parser.parse_args(argv)
    for name, config, topology, overrides in RUNS:
        if args.only is None or args.only in name:
            compile_run(name, config, topology, overrides)


# --------------------------------------------------------------------------------------------------
# the table of docs/scaling.md


def _gb(x) -> str:
    return "–" if x is None else f"{x / 1e9:.1f}"


def _percent(x) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def _fits(f: dict) -> str:
    if f.get("refused"):
        return "**no**: the compiler refused it (temp alone exceeds HBM; args not counted)"
    return f"{'yes' if f['fits'] else '**no**'} ({_gb(f.get('headroom_bytes'))})"


def render_table(results: Path) -> str:
    """The compile table of docs/scaling.md from the JSON files under ``results/compile`` (rows in :data:`RUNS`'s
    order; a run not compiled yet says so)."""
    rows = [("| run | function | args | temp | total (+ resident) | HBM usable | fits (headroom) | "
             "TFLOP / device | GB accessed / device | GB collectives / device | roofline bound | MFU bound | "
             "XLA:TPU estimate | MFU at estimate |"),
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in run_names():
        path = results / "compile" / f"{name}.json"
        if not path.exists():
            rows.append(f"| {name} | *not compiled yet* | | | | | | | | | | | | |")
            continue
        result = json.loads(path.read_text())
        for i, f in enumerate(result["functions"]):
            label = f"`{name}` ({result['devices']} devices)" if i == 0 else ""
            mfu = f.get("mfu_bound")
            if f.get("refused"):  # only the temporaries the refusal names are known
                rows.append(f"| {label} | {f['name']} | ? | {_gb(f['temp_bytes'])} | > {_gb(f['temp_bytes'])} | "
                            f"{_gb(f.get('usable_bytes'))} | {_fits(f)} | – | – | – | – | – | – | – |")
                continue
            if f["name"].endswith("generate"):  # memory only: the decode loop has no known trip count
                rows.append(f"| {label} | {f['name']} | {_gb(f['argument_bytes'])} | {_gb(f['temp_bytes'])} | "
                            f"{_gb(f['total_bytes'])} (+{_gb(f.get('resident_bytes', 0))}) | "
                            f"{_gb(f.get('usable_bytes'))} | {_fits(f)} | – | – | – | – | – | – | – |")
                continue
            if "decode_step" in f["name"]:
                # XLA's byte count inflates in-place KV-cache updates inside the layer loop; a decode step's
                # floor is reading its arguments (weights + cache) once, plus writing and reading what it
                # all-gathers: that is the figure and the bound shown
                chip = result["chip"]
                floor = f["argument_bytes"] + 2 * f.get("collective_bytes", 0)
                bound = floor / chip["hbm_bandwidth"]
                mfu = (f.get("model_flops") or 0) / (bound * chip["peak_flops"] * result["devices"])
                f = dict(f, bytes_accessed=floor, time_bound_s=bound, mfu_bound=mfu)
            estimate, mfu_estimate = f.get("optimal_seconds"), f.get("mfu_optimal")
            rows.append(
                f"| {label} | {f['name']} | {_gb(f['argument_bytes'])} | {_gb(f['temp_bytes'])} | "
                f"{_gb(f['total_bytes'])} (+{_gb(f.get('resident_bytes', 0))}) | {_gb(f.get('usable_bytes'))} | "
                f"{_fits(f)} | {f['flops'] / 1e12:.1f} | "
                f"{f['bytes_accessed'] / 1e9:.1f} | {_gb(f.get('collective_bytes'))} | "
                f"{f.get('time_bound_s', 0):.3g} s | {_percent(mfu)} | "
                f"{'–' if estimate is None else f'{estimate:.3g} s'} | {_percent(mfu_estimate)} |")
    return "\n".join(rows) + "\n"


def render_rollouts(results: Path) -> str:
    """The modelled generation time per RL step of both sampling engines (:mod:`sftrl_jax.aot.rollout`), from the
    ``rollouts`` of the compiled RL runs, in :data:`RUNS`'s order."""
    rows = ["| run | responses (mean length, at the cap) | static: calls × rows, decode steps, time | "
            "paged: slots, attention, decode steps, time | static ÷ paged |",
            "|---|---|---|---|---|"]
    for name in run_names():
        path = results / "compile" / f"{name}.json"
        if not path.exists():
            continue
        for sampler, r in json.loads(path.read_text()).get("rollouts", {}).items():
            static, paged = r["static"], r["paged"]
            rows.append(f"| `{name}` ({sampler}) | {r['sequences']:,} × ≤ {r['cap']:,} tokens "
                        f"({r['mean_length']:,.0f}, {r['at_cap']}) | {static['calls']} × {r['rows']}, "
                        f"{static['decode_steps']:,}, {static['seconds']:.3g} s | {r['slots']}, {r['attention']}, "
                        f"{paged['decode_steps']:,}, {paged['seconds']:.3g} s | **{r['speedup']:.2f}×** |")
    return "\n".join(rows) + "\n"
