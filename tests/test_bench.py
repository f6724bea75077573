"""scripts/bench.py runs every code path at toy sizes (``--smoke``), so the benchmark cannot rot.

This checks that the numbers are produced and consistent, not how fast anything is: speed is
measured by running the script itself (docs/benchmarks.md), never by a timed test.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs every benchmark section at toy sizes (about 3 min on 2 cores)

ROOT = Path(__file__).parents[1]


def test_bench_smoke_covers_every_section(tmp_path):
    out = tmp_path / "bench.json"
    # one CPU device, as users run it; the tests' other XLA flags (conftest.py) kept: toy sizes compile more than run
    flags = [f for f in os.environ["XLA_FLAGS"].split() if not f.startswith("--xla_force_host_platform_device_count")]
    env = {**os.environ, "XLA_FLAGS": " ".join(flags)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    sft = results["sft"]
    # same weights, same data: the first losses agree, so both sides run the same model
    assert abs(sft["first_loss"]["jax"] - sft["first_loss"]["torch"]) < 1e-4
    assert sft["jax"]["tokens_per_s"] > 0 and sft["torch"]["tokens_per_s"] > 0 and sft["attainable_flops_per_s"] > 0
    assert results["generate"]["greedy_token_agreement"] == 1.0
    rollout = results["rollout"]  # both engines, the same samples, the figures the issue asks for
    assert rollout["identical_samples"] == 1.0 and rollout["speedup"] > 0
    for engine in ("static", "paged"):
        assert rollout[engine]["useful_tokens_per_s"] > 0 and 0 < rollout[engine]["slot_utilisation"] <= 1
    floor = results["decode_floor"]["floor_seconds_per_step"]  # every weight matrix timed, both layouts
    assert set(results["decode_floor"]["matrices"]) >= {"q_proj", "down_proj", "lm_head"}
    assert floor["x @ W"] > 0 and floor["(W^T @ x^T)^T"] > 0
    memory = results["memory"]
    assert memory["state_ratio_fsdp8_over_data8"] <= 1 / 7  # fsdp=8 shards parameters and optimizer state
    assert {"mfu", "decode", "fit7b"} <= set(results)  # accelerator code paths ran at toy sizes on CPU
