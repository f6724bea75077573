"""Bug emulation follows a virtual DeepSpeed layout (train.emulate_ranks x micro-steps x
train.emulate_micro_batch_size), not our mesh: an emulated run equals a real run with that many shards."""

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from sft_fixtures import luffy_rows, make_model_dir, write_parquet
from sftrl_jax import sharding, training
from sftrl_jax.config import ConfigError, load_config
from sftrl_jax.jitted import compilation_cache
from sftrl_jax.models import load_pretrained
from sftrl_jax.sft import SFTConfig, run_sft

TINY = Path(__file__).parents[1] / "configs" / "tiny_sft.yaml"
GLOBAL = 32  # 4 ranks x 2 sequences -> N = 4 micro-steps: DeepSpeed keeps 0 and 3 of each rank
# float32 rounding of another reduction order, relative to the update: correct runs of this set-up on 1, 4
# and 8 devices differ from each other by up to 6e-6; an emulated bug or another layout moves it by > 1e-2
TOLERANCE = 5e-5


@pytest.fixture(scope="module")
def workdir(hf_checkpoint, tmp_path_factory):
    """One global batch of data (every step sees all of it: one step shape to compile per run), the
    model, its starting parameters; compiled steps cached for the module (runs that differ only in the
    emulated bug or layout compile the same program)."""
    root = tmp_path_factory.mktemp("bug_emulation")
    model_dir = make_model_dir(hf_checkpoint("qwen2_untied"), root / "model")
    data = write_parquet(luffy_rows(GLOBAL, seed=5), root / "train.parquet")
    model, _ = load_pretrained(model_dir)
    with compilation_cache(root / "xla_cache"):
        yield root, model_dir, data, jax.device_get(nnx.to_pure_dict(nnx.state(model)))


_RUNS = {}


def train(workdir, monkeypatch, *, devices, micro_batch_size, bug="none", ranks=None, emulated_micro=None):
    """Parameters after 2 Adam steps of ``run_sft`` on a mesh of the first ``devices`` devices (memoised)."""
    key = (devices, micro_batch_size, bug, ranks, emulated_micro)
    if key not in _RUNS:
        root, model_dir, data, _ = workdir
        monkeypatch.setattr(training, "make_mesh",
                            lambda spec: sharding.make_mesh(spec, devices=jax.devices()[:devices]))
        overrides = [f"model.path={model_dir}", f"data.train_files=[{data}]",
                     f"output_dir={root / '_'.join(map(str, key))}", f"mesh.fsdp={devices}",
                     f"train.global_batch_size={GLOBAL}", f"train.micro_batch_size={micro_batch_size}",
                     "train.max_steps=2", "train.eval_every=0", "data.eval_fraction=0.0", "data.max_length=256",
                     "checkpoint.save_every=0", "checkpoint.async_save=false", "logging.sinks=[jsonl]",
                     "optimizer.warmup_ratio=0.0",
                     "optimizer.learning_rate=1e-3", f"train.emulate_bug={bug}"]
        if ranks is not None:
            overrides.append(f"train.emulate_ranks={ranks}")
        if emulated_micro is not None:
            overrides.append(f"train.emulate_micro_batch_size={emulated_micro}")
        result = run_sft(load_config(SFTConfig, TINY, overrides), progress=False)
        _RUNS[key] = jax.device_get(result.params)
    return _RUNS[key]


def relative_error(a, b, base):
    """max over parameters of ||a - b|| / ||b - base|| (error relative to the size of the update)."""
    errors = jax.tree.map(lambda x, y, z: np.linalg.norm(x - y) / max(np.linalg.norm(y - z), 1e-30), a, b, base)
    return max(jax.tree.leaves(errors))


@pytest.mark.slow
@pytest.mark.parametrize("bug", ["deepspeed_offload", "openrlhf_mean_of_means", "both"])
def test_one_device_emulating_4_ranks_equals_a_real_4_shard_run(workdir, monkeypatch, bug):
    before = workdir[3]
    # 1 device, 2 real micro-steps of 16 sequences; emulated: 4 ranks x 4 micro-steps x 2 sequences
    emulated = train(workdir, monkeypatch, devices=1, micro_batch_size=16, bug=bug, ranks=4, emulated_micro=2)
    real = train(workdir, monkeypatch, devices=4, micro_batch_size=2, bug=bug)  # 4 shards x 4 micro-steps x 2
    assert relative_error(emulated, real, before) <= TOLERANCE
    correct = train(workdir, monkeypatch, devices=1, micro_batch_size=16)
    assert relative_error(emulated, correct, before) > 1e-2  # the emulation really changes the update


@pytest.mark.slow
def test_eight_devices_emulating_2_ranks_equals_a_real_2_shard_run(workdir, monkeypatch):
    before = workdir[3]
    # 8 shards x 4 micro-steps x 1 sequence; emulated: 2 ranks x 8 micro-steps x 2 sequences
    emulated = train(workdir, monkeypatch, devices=8, micro_batch_size=1, bug="both", ranks=2, emulated_micro=2)
    real = train(workdir, monkeypatch, devices=2, micro_batch_size=2, bug="both")
    assert relative_error(emulated, real, before) <= TOLERANCE
    four_ranks = train(workdir, monkeypatch, devices=4, micro_batch_size=2, bug="both")
    assert relative_error(emulated, four_ranks, before) > 1e-2  # the virtual layout matters


def test_emulated_layout_must_divide_the_global_batch(workdir, monkeypatch):
    root, model_dir, data, _ = workdir
    base = [f"model.path={model_dir}", f"data.train_files=[{data}]", f"output_dir={root / 'bad'}",
            f"train.global_batch_size={GLOBAL}", "train.emulate_bug=deepspeed_offload"]
    with pytest.raises(ValueError, match=r"train.global_batch_size \(32\) must be a multiple of train.emulate_ranks "
                                         r"\(3\) x train.emulate_micro_batch_size \(1, from train.micro_batch_size\)"):
        run_sft(load_config(SFTConfig, TINY, [*base, "train.emulate_ranks=3"]), progress=False)
    with pytest.raises(ValueError, match=r"train.emulate_ranks \(8, the mesh default\) x "
                                         r"train.emulate_micro_batch_size \(3\)"):
        run_sft(load_config(SFTConfig, TINY, [*base, "train.emulate_micro_batch_size=3"]), progress=False)
    with pytest.raises(ConfigError, match=r"config key 'train.emulate_ranks': expected .*>= 1.*got 0"):
        load_config(SFTConfig, TINY, [*base, "train.emulate_ranks=0"])
