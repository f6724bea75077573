"""Compile every shipped TPU and GPU config for its real target on this CPU, then render the docs.

    python scripts/compile_configs.py                 # all runs below (~15-25 min on 2 cores), then render
    python scripts/compile_configs.py --only sft_qwen # runs whose name contains this, then render
    python scripts/render_docs.py                     # re-render from the JSON files only (no compiling)

Each run is one ``sftrl-jax compile --json docs/results/compile/NAME.json`` in its own process (the
model shapes come from ``configs/models/*/config.json``: no weights are read). The table in
``docs/scaling.md`` between the ``compile-table`` markers is generated from those files by
``scripts/render_docs.py`` (the one renderer of every generated table; its rows follow ``RUNS``), so a
re-run updates the page instead of a hand edit. Needs the ``aot`` extra (``pip install -e '.[aot]'``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "compile"
MODELS = {"qwen2.5-math-7b": "Qwen2.5-Math-7B", "llama-3.1-8b": "Llama-3.1-8B", "qwen3-0.6b": "Qwen3-0.6B"}

# (result name, config, topology, extra overrides): every config in configs/tpu and configs/gpu with the
# target its header names, plus the comparisons docs/scaling.md discusses
RUNS = [
    ("tpu_sft_qwen2.5-math-7b_v5p-64", "configs/tpu/sft_qwen2.5-math-7b_v5p-64.yaml", "v5p-64", []),
    ("tpu_sft_qwen2.5-math-7b_v5p-64_dense", "configs/tpu/sft_qwen2.5-math-7b_v5p-64.yaml", "v5p-64",
     ["model.attention=dense", "model.logits_chunk_size=0"]),
    # the same comparison at one row per chip (the earlier shipped micro-batch)
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
    ("gpu_sft_qwen2.5-math-7b_8xh100", "configs/gpu/sft_qwen2.5-math-7b_8xh100.yaml", "8xh100", []),
    ("gpu_rl_qwen2.5-math-7b_8xh100", "configs/gpu/rl_qwen2.5-math-7b_8xh100.yaml", "8xh100", []),
    ("gpu_rl_luffy_qwen2.5-math-7b_8xh100", "configs/gpu/rl_luffy_qwen2.5-math-7b_8xh100.yaml", "8xh100", []),
    ("gpu_sft_llama-3.1-8b_8xh100", "configs/gpu/sft_llama-3.1-8b_8xh100.yaml", "8xh100", []),
    ("gpu_rl_llama-3.1-8b_8xh100", "configs/gpu/rl_llama-3.1-8b_8xh100.yaml", "8xh100", []),
    ("gpu_pipeline_qwen3-0.6b_sft_rl_8xh100", "configs/gpu/pipeline_qwen3-0.6b_sft_rl_8xh100.yaml", "8xh100", []),
    ("gpu_pipeline_qwen3-0.6b_rl_sft_8xh100", "configs/gpu/pipeline_qwen3-0.6b_rl_sft_8xh100.yaml", "8xh100", []),
    # the fit question the GPU benchmark could not answer without a device: the 7B SFT step on ONE H200
    ("gpu_sft_qwen2.5-math-7b_1xh200", "configs/gpu/sft_qwen2.5-math-7b_8xh100.yaml", "1xh200",
     ["mesh.fsdp=1", "mesh.tensor=1"]),
]


def model_dir(config: str) -> str:
    name = next(key for key in MODELS if key in Path(config).name)
    return f"configs/models/{MODELS[name]}"


def run(name: str, config: str, topology: str, overrides: list[str]) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="compile only the runs whose name contains this")
    args = parser.parse_args()
    for name, config, topology, overrides in RUNS:
        if args.only is None or args.only in name:
            run(name, config, topology, overrides)
    import render_docs  # scripts/render_docs.py, next to this file

    for path in render_docs.write_docs():
        print(f"rendered {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
