"""Faults: signals (SIGTERM and SIGINT as a clean stop), damaged checkpoints (resume falls back to the newest
one that restores), changed data on resume (refused unless --force), degenerate GRPO settings (refused), and
the run records a resume must not duplicate. Each test names the case."""

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

from sft_fixtures import luffy_rows, make_model_dir, write_parquet
from sftrl_jax.config import ConfigError, load_config
from sftrl_jax.optim import apply_update
from sftrl_jax.rl import RLConfig
from sftrl_jax.run_folder import RunFolderError
from sftrl_jax.sft import SFTConfig, run_sft
from sftrl_jax.signals import Stopped
from sftrl_jax.training import Algorithm, run_loop

pytestmark = pytest.mark.usefixtures("module_xla_cache")  # runs of one shape compile once

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny_sft.yaml"


# --- degenerate group-relative settings -------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, key", [
    (["sampling.n=1"], "sampling.n"),
    (["sampling.temperature=0"], "sampling.temperature"),
    (["rl.method=gspo", "sampling.n=1"], "sampling.n"),
    (["rl.method=chord", "rl.expert_data=[e.jsonl]", "sampling.n=1"], "sampling.n"),
    (["rl.method=chord", "rl.expert_data=[e.jsonl]", "sampling.temperature=0"], "sampling.temperature"),
    (["rl.method=luffy", "rl.loss_scale_factor=64", "rl.verl_ranks=8", "sampling.n=1"], "sampling.n"),
])
def test_group_of_one_or_greedy_group_is_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"config key '{key}'"):
        load_config(RLConfig, overrides=["model.path=x", *overrides])


def test_greedy_samples_beside_a_demonstration_still_train():
    # LUFFY's groups hold the prompt's demonstration, so greedy samples still differ from one member
    config = load_config(RLConfig, overrides=["model.path=x", "rl.method=luffy", "rl.loss_scale_factor=64",
                                              "rl.verl_ranks=8", "sampling.temperature=0", "sampling.n=2"])
    assert config.sampling.temperature == 0.0


# --- damaged checkpoints ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(hf_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    model_dir = make_model_dir(hf_checkpoint("qwen2_tied"), root / "model")
    data = write_parquet(luffy_rows(24, seed=5), root / "train.parquet")
    return root, model_dir, data


def _config(workdir, out, *overrides):
    root, model_dir, data = workdir
    return load_config(SFTConfig, TINY, [f"model.path={model_dir}", f"data.train_files=[{data}]",
                                         f"output_dir={root / out}", "checkpoint.async_save=false",
                                         "optimizer.lr_schedule=constant", "optimizer.warmup_ratio=0", *overrides])


class Countdown(Algorithm):
    """A stand-in algorithm: each step scales the parameters by (1 - lr) through the real optimizer update and
    counts its position, so a resume from the wrong checkpoint shows in the weights and the position."""

    name = plot_name = "countdown"

    def __init__(self, steps: int):
        self.steps, self.position = steps, 0

    def setup(self, ctx):
        self.total_steps = self.steps
        return self.steps

    def build(self, ctx, state):
        optimizer = ctx.optimizer
        self.update = jax.jit(lambda s: dict(s, **dict(zip(("params", "opt_state"), apply_update(
            optimizer, s["params"], s["opt_state"], s["params"]))), step=s["step"] + 1))

    def train_step(self, state, step):
        self.position += 1
        return self.update(state), {"loss": 1.0, "grad_norm": 1.0, "position": self.position}

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, meta):
        self.position = int(meta["position"])

    def finish(self, state, step):
        return {"final_marker": 1.0}


def _truncate_largest_array_file(step_dir: Path) -> None:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    victim = max(files, key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])


DAMAGES = {
    "truncated array file": _truncate_largest_array_file,
    "missing meta folder": lambda d: shutil.rmtree(d / "meta"),
    "missing _METADATA": lambda d: (d / "state" / "_METADATA").unlink(),
    "torn meta JSON": lambda d: (d / "meta" / "metadata").write_text('{"posi'),
    "empty step folder": lambda d: (shutil.rmtree(d), d.mkdir()),
}


@pytest.mark.parametrize("free", [{"f_favail": 10}, pytest.param({"f_bavail": 1}, marks=pytest.mark.slow)],
                         ids=["inodes", "bytes"])
def test_a_full_disk_stops_before_the_checkpoint_in_one_line(workdir, monkeypatch, free):
    # orbax's writer threads fill pages with tracebacks (or wait on a folder they could not create) when the disk
    # fills mid-save; the save is refused before it starts instead
    import os

    real = os.statvfs

    def nearly_full(path):
        stats = real(path)
        fields = {name: getattr(stats, name) for name in ("f_bavail", "f_frsize", "f_files", "f_favail")}
        fields.update(free, f_files=max(fields["f_files"], 1000))
        return type("StatVFS", (), fields)()

    monkeypatch.setattr(os, "statvfs", nearly_full)
    with pytest.raises(OSError, match=r"checkpoints: no room for the checkpoint of step 1 \(.*\); free some space, "
                                      r"then rerun with --resume"):
        run_loop(_config(workdir, f"full_{next(iter(free))}", "checkpoint.save_every=1"), Countdown(3),
                 progress=False)


@pytest.fixture(scope="module")
def reference(workdir):
    return run_loop(_config(workdir, "whole", "checkpoint.save_every=2"), Countdown(8), progress=False).params


# one damage in the fast tier, the others with the slow tests
@pytest.mark.parametrize("damage", [pytest.param(d, marks=() if d == "truncated array file" else pytest.mark.slow)
                                    for d in sorted(DAMAGES)])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(workdir, reference, damage, caplog):
    out = f"damaged_{damage.replace(' ', '_')}"
    config = _config(workdir, out, "checkpoint.save_every=2", "checkpoint.keep_last=5")
    run_loop(config, Countdown(6), progress=False)  # checkpoints 2, 4, 6
    DAMAGES[damage](Path(config.output_dir) / "checkpoints" / "6")
    caplog.set_level(logging.INFO, "sftrl_jax")
    algorithm = Countdown(8)
    result = run_loop(config, algorithm, resume=True, progress=False)
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and "checkpoints/6" in skipped[0], skipped
    assert "\n" not in skipped[0]
    assert "resumed from step 4" in caplog.text
    assert algorithm.position == 8 and result.steps == 8
    jax.tree.map(np.testing.assert_array_equal, result.params, reference)


def test_no_checkpoint_that_restores_is_one_line_naming_each(workdir):
    config = _config(workdir, "all_damaged", "checkpoint.save_every=2", "checkpoint.keep_last=5")
    run_loop(config, Countdown(4), progress=False)
    for step in (2, 4):
        shutil.rmtree(Path(config.output_dir) / "checkpoints" / str(step) / "meta")
    with pytest.raises(RuntimeError, match=r"no checkpoint in .* restores \(step 4: .*; step 2: .*\)") as err:
        run_loop(config, Countdown(6), resume=True, progress=False)
    assert "\n" not in str(err.value)


# --- SIGTERM and SIGINT -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signal_in_the_loop_stops_after_the_step_with_a_checkpoint_then_resume_is_exact(workdir, reference,
                                                                                          signum):
    config = _config(workdir, f"signalled_{signum}", "checkpoint.save_every=0")  # no checkpoint due before the end
    out = Path(config.output_dir)

    def on_step(step, record):
        if step == 3:
            os.kill(os.getpid(), signum)

    with pytest.raises(Stopped, match=rf"stopped by {signal.Signals(signum).name} after step 3 .*--resume") as err:
        run_loop(config, Countdown(8), on_step=on_step, progress=False)
    assert err.value.exit_code == 128 + signum and "\n" not in str(err.value)
    assert not (out / ".lock").exists()
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [3]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back
    algorithm = Countdown(8)
    result = run_loop(config, algorithm, resume=True, progress=False)
    assert algorithm.position == 8
    jax.tree.map(np.testing.assert_array_equal, result.params, reference)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))


# --- changed data on resume ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sft_resume_with_other_content_at_the_same_data_path_is_refused_naming_the_file(workdir, caplog):
    root, model_dir, _ = workdir
    data = write_parquet(luffy_rows(24, seed=5), root / "changing.parquet")
    config = load_config(SFTConfig, TINY, [f"model.path={model_dir}", f"data.train_files=[{data}]",
                                           f"output_dir={root / 'changed_data'}", "checkpoint.async_save=false",
                                           "train.max_steps=3", "checkpoint.save_every=1", "logging.progress=false"])

    def crash(step, record):
        if step == 2:
            raise RuntimeError("crash after step 2")

    with pytest.raises(RuntimeError, match="crash"):
        run_sft(config, on_step=crash)
    write_parquet(luffy_rows(24, seed=6), data)  # same path, other rows
    longer = config
    with pytest.raises(RunFolderError, match=rf"data.train_files {data}: content changed.*--force") as err:
        run_sft(longer, resume=True, force=False)
    assert "\n" not in str(err.value)
    assert not (root / "changed_data" / ".lock").exists()
    caplog.set_level(logging.WARNING, "sftrl_jax")
    assert run_sft(longer, resume=True, force=True).steps == 3
    assert "--force: resuming with training data that differ from the run's" in caplog.text


# --- run records on resume ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resuming_a_finished_run_does_not_repeat_its_final_record(workdir):
    config = _config(workdir, "finished", "checkpoint.save_every=2")
    run_loop(config, Countdown(3), progress=False)
    for _ in range(2):
        run_loop(config, Countdown(3), resume=True, progress=False)
    records = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "final_marker" in r] == [3]


@pytest.mark.slow
def test_the_pipeline_keeps_logging_progress_false(workdir, monkeypatch):
    import sftrl_jax.pipeline as pipeline

    root, model_dir, data = workdir
    config = load_config(pipeline.PipelineConfig, overrides=[
        f"model.path={model_dir}", f"output_dir={root / 'quiet_pipeline'}", "logging.progress=false",
        "stages=[{kind: sft}]", f"sft={{data: {{train_files: [{data}]}}, train: {{max_steps: 1}}}}"])
    seen = {}

    def fake_run_sft(stage_config, *, progress, **_):
        seen["progress"] = progress if progress is not None else stage_config.logging.progress
        raise RuntimeError("stop here")

    monkeypatch.setattr(pipeline, "run_sft", fake_run_sft)
    with pytest.raises(RuntimeError, match="stop here"):
        pipeline.run_pipeline(config)
    assert seen == {"progress": False}
