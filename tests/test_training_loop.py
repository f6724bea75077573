"""The one training loop (sftrl_jax.training.run_loop): hooks, logging cadence, NaN stop, resume, metric sinks."""

import glob
import json
import struct
from pathlib import Path

import jax
import numpy as np
import pytest

from sft_fixtures import luffy_rows, make_model_dir, write_parquet
from sftrl_jax.config import load_config
from sftrl_jax.optim import apply_update
from sftrl_jax.sft import NonFiniteLossError, SFTConfig, run_sft
from sftrl_jax.training import Algorithm, Hook, run_loop

pytestmark = pytest.mark.usefixtures("module_xla_cache")  # runs of one shape compile once

TINY = Path(__file__).parents[1] / "configs" / "tiny_sft.yaml"


@pytest.fixture(scope="module")
def workdir(hf_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    model_dir = make_model_dir(hf_checkpoint("qwen2_tied"), root / "model")
    data = write_parquet(luffy_rows(24, seed=5), root / "train.parquet")
    return root, model_dir, data


def _config(workdir, out, *overrides):
    root, model_dir, data = workdir
    return load_config(SFTConfig, TINY, [f"model.path={model_dir}", f"data.train_files=[{data}]",
                                         f"output_dir={root / out}", "checkpoint.async_save=false", *overrides])


class Countdown(Algorithm):
    """A stand-in algorithm: each step scales the parameters by (1 - lr) through the real optimizer update
    and reports ``loss = steps left`` (NaN at ``nan_at``), so the loop's bookkeeping is checked exactly."""

    name, plot_name, plot_keys = "countdown", "countdown", ("loss",)

    def __init__(self, steps: int, nan_at: int | None = None):
        self.steps, self.nan_at, self.position = steps, nan_at, 0

    def setup(self, ctx):
        self.total_steps = self.steps
        return self.steps

    def build(self, ctx, state):
        optimizer = ctx.optimizer
        self.update = jax.jit(lambda s: dict(s, **dict(zip(("params", "opt_state"), apply_update(
            optimizer, s["params"], s["opt_state"], s["params"]))), step=s["step"] + 1))

    def train_step(self, state, step):
        self.position += 1
        loss = float("nan") if step + 1 == self.nan_at else float(self.total_steps - step - 1)
        return self.update(state), {"loss": loss, "grad_norm": 1.0, "position": self.position,
                                    "flops_train": 10.0 * self.position, "flops_generate": 1.0}

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, meta):
        self.position = int(meta["position"])

    def finish(self, state, step):
        return {"final_marker": 1.0}


def test_hooks_cadence_log_every_and_on_step(workdir):
    config = _config(workdir, "hooks", "logging.log_every=3", "checkpoint.save_every=2")
    seen, calls = [], []
    hooks = [Hook(lambda g, p, step: calls.append(("every2", step)) or {"every2": step}, every=2),
             Hook(lambda g, p, step: calls.append(("edges", step)) or {"edges": step}, at_start=True, at_end=True)]
    result = run_loop(config, Countdown(7), hooks=hooks, on_step=lambda step, record: seen.append(step),
                      progress=False)
    assert seen == list(range(1, 8)) and result.steps == 7
    assert calls == [("edges", 0), ("every2", 2), ("every2", 4), ("every2", 6), ("edges", 7)]
    written = [(r["step"], sorted(k for k in r if k in ("loss", "every2", "edges", "final_marker")))
               for r in result.metrics]
    # step 0: the at_start hook alone; then every log_every=3 steps, plus every step a hook ran; then finish()
    assert written == [(0, ["edges"]), (2, ["every2", "loss"]), (3, ["loss"]), (4, ["every2", "loss"]),
                       (6, ["every2", "loss"]), (7, ["edges", "loss"]), (7, ["final_marker"])]
    out = Path(config.output_dir)
    assert (out / "countdown.png").exists() and (out / "final" / "config.json").exists()
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())[-1] == 7


@pytest.mark.slow
def test_nan_stops_naming_the_last_checkpoint_and_resume_continues(workdir):
    config = _config(workdir, "nan", "checkpoint.save_every=2")
    with pytest.raises(NonFiniteLossError,
                       match=r"at step 5 \(loss=nan, grad_norm=1.0\).*Last good checkpoint: step 4"):
        run_loop(config, Countdown(6, nan_at=5), progress=False)
    resumed = Countdown(6)
    result = run_loop(config, resumed, resume=True, progress=False)
    # the algorithm's own state came back from the checkpoint (4 steps done), then 2 more ran
    assert resumed.position == 6 and result.steps == 6
    assert [r["step"] for r in result.metrics if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["position"] for r in result.metrics if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_max_flops_stops_at_the_budget_with_the_end_of_run_work_done(workdir):
    config = _config(workdir, "budget", "train.max_flops=35", "logging.log_every=100", "checkpoint.save_every=0")
    calls = []
    result = run_loop(config, Countdown(10), progress=False,
                      hooks=[Hook(lambda g, p, step: calls.append(step) or {"probe": 1.0}, at_end=True)])
    # 10 x position + 1 >= 35 first at position 4: stopped there, probed, recorded, checkpointed, exported
    assert result.steps == 4 and calls == [4]
    assert [(r["step"], "probe" in r) for r in result.metrics if "loss" in r] == [(4, True)]
    out = Path(config.output_dir)
    assert (out / "final" / "config.json").exists()
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()] == ["4"]


def _tfrecords(path: str) -> list[bytes]:
    """The records of a TFRecord file (TensorBoard's event-file framing): length, crc, data, crc."""
    data, out, at = Path(path).read_bytes(), [], 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        out.append(data[at + 12:at + 12 + length])
        at += 12 + length + 4
    return out


@pytest.mark.slow
def test_metric_sinks_jsonl_tensorboard_and_wandb_offline(workdir, monkeypatch):
    pytest.importorskip("tensorboardX")
    pytest.importorskip("wandb")
    from tensorboardX.proto import event_pb2

    monkeypatch.setenv("WANDB_SILENT", "true")
    config = _config(workdir, "sinks", "train.max_steps=3", "checkpoint.save_every=0",
                     "logging.sinks=[jsonl, plots, tensorboard, wandb]", "logging.wandb_mode=offline")
    result = run_sft(config, progress=False)
    out = Path(config.output_dir)
    losses = {r["step"]: r["loss"] for r in result.metrics if "loss" in r}
    assert sorted(losses) == [1, 2, 3] and (out / "loss.png").exists()

    (events,) = glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))
    scalars = {}
    for record in _tfrecords(events):
        event = event_pb2.Event.FromString(record)
        for value in event.summary.value:
            scalars[(value.tag, event.step)] = value.simple_value
    assert {step: scalars[("loss", step)] for step in losses} == pytest.approx(losses)

    runs = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1 and Path(runs[0]).stat().st_size > 0


@pytest.mark.slow
def test_without_the_jsonl_sink_the_result_still_holds_the_records(workdir):
    config = _config(workdir, "no_jsonl", "train.max_steps=2", "logging.sinks=[plots]")
    result = run_sft(config, progress=False)
    out = Path(config.output_dir)
    assert [r["step"] for r in result.metrics if "loss" in r] == [1, 2]
    assert not (out / "metrics.jsonl").exists() and (out / "loss.png").exists()
    assert json.loads(json.dumps(result.metrics))  # plain JSON values
    assert np.isfinite([r["loss"] for r in result.metrics if "loss" in r]).all()


def test_an_unknown_sink_is_a_config_error(workdir):
    from sftrl_jax.config import ConfigError

    with pytest.raises(ConfigError, match=r"logging.sinks\[0\]"):
        _config(workdir, "bad", "logging.sinks=[mlflow]")
