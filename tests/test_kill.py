"""Fault injection with real signals: a training run killed (``kill -9``) between steps or while a
checkpoint is being written resumes to bit-identical final weights, and a killed evaluation resumes
with every completion kept once and none lost; SIGTERM stops a training run after its step (a checkpoint, the
lock released, one line, exit 143) and an evaluation after its chunk, and both resume exactly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from sft_fixtures import luffy_rows, make_model_dir, write_parquet

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]


# The runs share one persistent XLA cache: the first run of each kind (training, evaluation) compiles and
# the later ones load the same programs, so the runs here differ only in where they are interrupted.
# By the time a run is killed its programs are already in the cache (an uninterrupted run of the same
# kind wrote them), and a damaged entry would only make JAX compile again.
_ENV = dict(os.environ)


@pytest.fixture(scope="module")
def workdir(hf_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    _ENV.update(JAX_COMPILATION_CACHE_DIR=str(root / "xla_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    model_dir = make_model_dir(hf_checkpoint("qwen2_tied"), root / "model")
    data = write_parquet(luffy_rows(48, seed=4), root / "train.parquet")
    return root, model_dir, data


def _sft_args(workdir, out, *extra):
    root, model_dir, data = workdir
    return ["sft", "--config", str(ROOT / "configs" / "tiny_sft.yaml"), f"model.path={model_dir}",
            f"data.train_files=[{data}]", f"output_dir={root / out}", "train.max_steps=8",
            "train.global_batch_size=8", "checkpoint.save_every=1", "logging.progress=false", *extra]


def _start(args, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sftrl_jax.cli", *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, cwd=ROOT, env=_ENV)


def _finish(args, log: Path) -> None:
    process = _start(args, log)
    assert process.wait(timeout=600) == 0, log.read_text()[-3000:]


def _kill_when(process: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` is true (polled every millisecond)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the run ended before the fault could be injected"
        assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
        time.sleep(0.001)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def _weights(run: Path) -> dict:
    out = {}
    for file in sorted((run / "final").glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _steps_logged(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            pass
    return max(steps, default=0)


@pytest.fixture(scope="module")
def uninterrupted(workdir):
    _finish(_sft_args(workdir, "whole"), workdir[0] / "whole.log")
    return _weights(workdir[0] / "whole")


def _assert_identical(weights: dict, reference: dict) -> None:
    assert weights.keys() == reference.keys()
    for name in reference:
        np.testing.assert_array_equal(weights[name], reference[name], err_msg=name)


def test_kill_9_between_steps_then_resume_is_bit_identical(workdir, uninterrupted):
    run, log = workdir[0] / "killed", workdir[0] / "killed.log"
    process = _start(_sft_args(workdir, "killed"), log)
    _kill_when(process, lambda: _steps_logged(run) >= 3)
    assert not (run / "final").exists()
    _finish(_sft_args(workdir, "killed", "--resume"), workdir[0] / "killed_resume.log")
    assert "stale lock" in (workdir[0] / "killed_resume.log").read_text()  # the dead run's lock was taken over
    _assert_identical(_weights(run), uninterrupted)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))  # each step once


def test_kill_9_during_a_checkpoint_write_then_resume_is_bit_identical(workdir, uninterrupted):
    run, log = workdir[0] / "mid_save", workdir[0] / "mid_save.log"
    checkpoints = run / "checkpoints"

    def writing() -> bool:  # orbax writes a step into a temporary folder and renames it when complete
        return checkpoints.exists() and any("tmp" in p.name for p in checkpoints.iterdir()) \
            and _steps_logged(run) >= 2

    process = _start(_sft_args(workdir, "mid_save", "checkpoint.async_save=true"), log)
    _kill_when(process, writing)
    _finish(_sft_args(workdir, "mid_save", "checkpoint.async_save=true", "--resume"),
            workdir[0] / "mid_save_resume.log")
    _assert_identical(_weights(run), uninterrupted)


def test_kill_9_during_evaluation_then_resume_keeps_every_completion_once(workdir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"what is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                               for i in range(12)))

    def args(out):
        return ["eval", "--config", str(ROOT / "configs" / "eval_luffy.yaml"), f"model.path={workdir[1]}",
                f"data.files=[{prompts}]", f"output_dir={tmp_path / out}", "sampling.temperature=0",
                "sampling.max_new_tokens=6", "sampling.n=2", "chunk_size=1", "reward.num_workers=1"]

    _finish(args("whole"), tmp_path / "whole.log")
    process = _start(args("killed"), tmp_path / "killed.log")
    generations = tmp_path / "killed" / "generations.jsonl"
    _kill_when(process, lambda: generations.exists() and len(generations.read_text().splitlines()) >= 6)
    _finish(args("killed"), tmp_path / "resumed.log")

    def records(out):
        rows = [json.loads(line) for line in (tmp_path / out / "generations.jsonl").read_text().splitlines()]
        return sorted((r["prompt_id"], r["sample"], r["response"], r["score"]) for r in rows)

    assert records("killed") == records("whole")  # none lost, none twice, the same completions
    assert json.loads((tmp_path / "killed" / "results.json").read_text())["benchmarks"] == \
        json.loads((tmp_path / "whole" / "results.json").read_text())["benchmarks"]


def _signal_when(process: subprocess.Popen, signum: int, ready, timeout: float = 300) -> int:
    """Send ``signum`` to ``process`` as soon as ``ready()`` is true; its exit code."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the run ended before the signal could be sent"
        assert time.monotonic() < deadline, "timed out waiting for the moment to signal"
        time.sleep(0.01)
    process.send_signal(signum)
    return process.wait(timeout=300)


def test_sigterm_stops_training_after_the_step_and_resume_is_bit_identical(workdir, uninterrupted):
    # SIGINT takes the same path (tests/test_faults_stop_and_resume.py, in-process)
    root = workdir[0]
    run, log = root / "sigterm", root / "sigterm.log"
    rc = _signal_when(_start(_sft_args(workdir, run.name), log), signal.SIGTERM, lambda: _steps_logged(run) >= 2)
    text = log.read_text()
    assert rc == 143, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("sftrl-jax sft: stopped by SIGTERM after step ") and "--resume" in last, last
    assert not (run / ".lock").exists() and not (run / "final").exists()
    _finish(_sft_args(workdir, run.name, "--resume"), root / "sigterm_resume.log")
    assert "stale lock" not in (root / "sigterm_resume.log").read_text()
    _assert_identical(_weights(run), uninterrupted)


def test_sigterm_stops_evaluation_between_chunks_and_resumes(workdir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"what is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                               for i in range(12)))
    args = ["eval", "--config", str(ROOT / "configs" / "eval_luffy.yaml"), f"model.path={workdir[1]}",
            f"data.files=[{prompts}]", f"output_dir={tmp_path / 'out'}", "sampling.temperature=0",
            "sampling.max_new_tokens=6", "sampling.n=2", "chunk_size=1", "reward.num_workers=1"]
    generations = tmp_path / "out" / "generations.jsonl"
    rc = _signal_when(_start(args, tmp_path / "eval.log"), signal.SIGTERM,
                      lambda: generations.exists() and len(generations.read_text().splitlines()) >= 4)
    text = (tmp_path / "eval.log").read_text()
    assert rc == 143 and "Traceback" not in text, text[-3000:]
    assert "sftrl-jax eval: stopped by SIGTERM after" in text.strip().splitlines()[-1]
    assert not (tmp_path / "out" / ".lock").exists()
    _finish(args, tmp_path / "resumed.log")
    rows = [json.loads(line) for line in generations.read_text().splitlines()]
    assert sorted((r["prompt_id"], r["sample"]) for r in rows) == [(p, s) for p in range(12) for s in range(2)]
