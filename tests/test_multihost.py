"""Two processes x 4 CPU devices on JAX's distributed runtime give the same training as 1 x 8.

The workers (tests/multihost_worker.py) connect through a coordinator on localhost, each reads
only its own rows of every SFT batch, and together run SFT steps and a GRPO step; the final
parameters must equal the single-process run's to float32 rounding, only process 0 writes logs
and exports, and the cooperatively written orbax checkpoint restores onto smaller meshes.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from multihost_worker import flat, run
from sft_fixtures import luffy_rows, make_model_dir, write_parquet
from sftrl_jax.checkpointing import TrainCheckpointer
from sftrl_jax.models import load_pretrained
from sftrl_jax.sharding import make_mesh

pytestmark = pytest.mark.slow  # two processes train, checkpoint and restore (minutes)

WORKER = Path(__file__).parent / "multihost_worker.py"
PROCESSES, LOCAL_DEVICES = 2, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(root: Path, *args: Path) -> list[str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SFTRL_JAX_", "JAX_COORDINATOR"))}
    # the workers' device count, with the tests' other XLA flags (conftest.py)
    flags = [f for f in os.environ["XLA_FLAGS"].split() if not f.startswith("--xla_force_host_platform_device_count")]
    env.update(XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"]),
               JAX_PLATFORMS="cpu",
               SFTRL_JAX_COORDINATOR_ADDRESS=f"localhost:{port}", SFTRL_JAX_NUM_PROCESSES=str(PROCESSES))
    procs = []
    for index in range(PROCESSES):
        log = open(root / f"worker{index}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(root), *map(str, args)],
                                      env={**env, "SFTRL_JAX_PROCESS_ID": str(index)}, stdout=log,
                                      stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1]))
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [(root / f"worker{index}.log").read_text() for index in range(PROCESSES)]
    assert codes == [0] * PROCESSES, "\n\n".join(f"--- worker {i} (exit {c})\n{text[-4000:]}"
                                                 for i, (c, text) in enumerate(zip(codes, logs)))
    return logs


def _relative_error(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-30)) for k in a)


@pytest.fixture(scope="module")
def runs(hf_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    model_dir = make_model_dir(hf_checkpoint("qwen2_tied"), root / "model")
    data = write_parquet(luffy_rows(40, seed=3), root / "train.parquet")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {i % 10}", "answer": str(i % 2)}) + "\n"
                               for i in range(64)))
    multi = root / "multi"
    multi.mkdir()
    logs = _launch(multi, model_dir, data, prompts)
    reference = run(root / "single", model_dir, data, prompts)
    return root, multi, logs, reference


def test_two_processes_train_like_one(runs):
    _, multi, logs, reference = runs
    assert all(f"process {i} of 2 (4 of 8 devices) done" in logs[i] for i in range(PROCESSES))
    for stage in ("sft", "rl"):
        per_process = [dict(np.load(multi / f"{stage}_params_process{i}.npz")) for i in range(PROCESSES)]
        assert _relative_error(per_process[1], per_process[0]) == 0.0  # every process holds the same model
        error = _relative_error(per_process[0], reference[stage])
        assert error <= 1e-5, (stage, error)
        moved = _relative_error(reference[stage], flat_model(runs[0] / "model") if stage == "sft" else
                                dict(np.load(multi / "sft_params_process0.npz")))
        assert moved > 1e-3, (stage, moved)  # the comparison is not vacuous: training changed the weights


def flat_model(directory: Path) -> dict:
    model, _ = load_pretrained(directory)
    from flax import nnx

    return flat(nnx.to_pure_dict(nnx.state(model)))


def test_only_process_zero_writes_logs_and_exports(runs):
    _, multi, _, _ = runs
    sft_records = [json.loads(line) for line in (multi / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft_records if "loss" in r] == [1, 2, 3]  # one line per step, not one per process
    assert [r["step"] for r in json.loads("[" + ",".join(
        (multi / "rl" / "metrics.jsonl").read_text().splitlines()) + "]")] == [1]
    assert (multi / "sft" / "loss.png").exists() and (multi / "rl" / "rl.png").exists()
    # the HF export gathered the weights of both processes
    exported = flat_model(multi / "rl" / "final")
    assert _relative_error(exported, dict(np.load(multi / "rl_params_process0.npz"))) == 0.0


def test_cooperative_checkpoint_restores_onto_smaller_meshes(runs):
    _, multi, _, _ = runs
    expected = dict(np.load(multi / "sft_params_process0.npz"))
    for spec, count in (({"fsdp": 4}, 4), ({"fsdp": 2, "tensor": 2}, 4), ({"fsdp": 1}, 1)):
        mesh = make_mesh(spec, devices=jax.devices()[:count])
        checkpointer = TrainCheckpointer(multi / "sft" / "checkpoints", save_every=1)
        try:
            assert checkpointer.latest_step() == 3
            restored, meta = checkpointer.restore(3, _abstract_state(multi / "sft" / "final", mesh))
        finally:
            checkpointer.close()
        assert meta["step"] == 3
        assert _relative_error(flat(restored["params"]), expected) == 0.0
        leaf = jax.tree.leaves(restored["params"])[0]
        assert leaf.sharding.mesh.devices.size == count


def _abstract_state(model_dir: Path, mesh):
    """ShapeDtypeStructs of a train state on ``mesh`` (the restore target)."""
    from sftrl_jax.config import ModelOptions, OptimizerOptions
    from sftrl_jax.optim import make_optimizer
    from sftrl_jax.training import init_train_state

    optimizer, _ = make_optimizer(OptimizerOptions(), 3)
    _, _, state, _ = init_train_state(ModelOptions(path=str(model_dir)), mesh, optimizer)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
