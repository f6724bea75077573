"""Run folders that cannot be mixed up and output folders / data files that are not what they seem:
the lock, the record written after the checks, resume continuity, eval resume keyed on the model and
sampling settings, unusable output_dir, a replaced data file."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sft_fixtures import luffy_rows, make_model_dir, write_parquet
from sftrl_jax.cli import main
from sftrl_jax.config import load_config
from sftrl_jax.data.sources import load_rows
from sftrl_jax.evaluation import Completion, EvalConfig, run_eval
from sftrl_jax.run_folder import RunFolderError, RunLock
from sftrl_jax.sft import SFTConfig, run_sft

pytestmark = pytest.mark.usefixtures("module_xla_cache")  # runs of one shape compile once

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny_sft.yaml"


@pytest.fixture(scope="module")
def workdir(hf_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("run_folder")
    model_dir = make_model_dir(hf_checkpoint("qwen2_tied"), root / "model")
    data = write_parquet(luffy_rows(24, seed=9), root / "train.parquet")
    other = write_parquet(luffy_rows(24, seed=10), root / "other.parquet")
    return root, model_dir, data, other


def _args(workdir, out, *extra):
    root, model_dir, data, _ = workdir
    return ["sft", "--config", str(TINY), f"model.path={model_dir}", f"data.train_files=[{data}]",
            f"output_dir={root / out}", "train.max_steps=2", "checkpoint.save_every=1", "checkpoint.async_save=false",
            "logging.progress=false", *extra]


def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sftrl-jax ")]
    assert len(err) == 1, err  # one error line (progress bars of the data loading aside)
    return err[0]


@pytest.mark.slow
def test_a_live_run_holds_the_folder_and_a_dead_ones_lock_is_taken_over(workdir, capsys, caplog):
    root = workdir[0]
    out = root / "locked"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid,
                                               "command": "sftrl-jax sft", "started": "earlier"}))
        err = _error(capsys, _args(workdir, "locked"))
        assert f"in use by sftrl-jax sft (pid {sleeper.pid} on {socket.gethostname()}" in err
        assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert main(_args(workdir, "locked")) == 0  # the owner is gone: a stale lock
    assert "stale lock" in caplog.text and not (out / ".lock").exists()


def test_a_lock_from_another_host_names_the_file_to_delete(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "t"}))
    with pytest.raises(RunFolderError, match=r"locked by a run \(pid 1 on elsewhere.*delete .*\.lock"):
        with RunLock(tmp_path):
            pass
    free = tmp_path / "free"
    free.mkdir()
    with RunLock(free) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        # a second process on this host is refused while the first holds the lock
        second = subprocess.run([sys.executable, "-c", "from sftrl_jax.run_folder import RunLock\n"
                                 f"with RunLock({str(free)!r}): pass"], capture_output=True, text=True)
        assert second.returncode != 0 and f"in use by a run (pid {os.getpid()}" in second.stderr
    assert not lock.path.exists()


@pytest.mark.slow
def test_a_refused_start_keeps_the_record_and_resume_refuses_a_different_run(workdir, capsys):
    assert main(_args(workdir, "cont")) == 0
    record = (workdir[0] / "cont" / "config.yaml").read_text()
    # a second fresh start on the folder: refused, and the first run's record is untouched
    err = _error(capsys, _args(workdir, "cont", "optimizer.learning_rate=0.5"))
    assert "already holds checkpoints" in err
    assert (workdir[0] / "cont" / "config.yaml").read_text() == record
    # --resume with other data, seed and learning rate: refused naming each change
    other = workdir[3]
    err = _error(capsys, _args(workdir, "cont", f"data.train_files=[{other}]", "train.seed=7",
                               "optimizer.learning_rate=0.5", "train.max_steps=3", "--resume"))
    for key in ("data.train_files", "train.seed", "optimizer.learning_rate", "train.max_steps"):
        assert key in err
    assert "--force" in err and (workdir[0] / "cont" / "config.yaml").read_text() == record
    # layout-only changes are continuity-safe; --force accepts the rest
    assert main(_args(workdir, "cont", "train.max_steps=3", "logging.log_every=2", "--resume", "--force")) == 0
    assert "max_steps: 3" in (workdir[0] / "cont" / "config.yaml").read_text()


def test_eval_resume_refuses_generations_of_another_model_or_sampling(workdir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "1"}) + "\n" for i in range(4)))

    def config(*overrides):
        return load_config(EvalConfig, overrides=[f"model.path={workdir[1]}", f"data.files=[{prompts}]",
                                                  f"output_dir={tmp_path / 'eval'}", "reward.num_workers=1",
                                                  *overrides])

    def generator(items, n):
        return [Completion(r"\boxed{1}", 3, False) for _ in items for _ in range(n)]

    run_eval(config(), generator=generator, progress=False)
    with pytest.raises(RunFolderError, match=r"other settings \(sampling.temperature: 0.6 -> 1.0\)"):
        run_eval(config("sampling.temperature=1.0"), generator=generator, progress=False)
    with pytest.raises(RunFolderError, match=r"model.path: .* -> "):
        run_eval(config(f"model.path={tmp_path}"), generator=generator, progress=False)
    config_json = workdir[1] / "config.json"  # the same directory, re-exported: another file content
    config_json.write_text(config_json.read_text() + "\n")
    with pytest.raises(RunFolderError, match=r"model_files.config.json"):
        run_eval(config(), generator=generator, progress=False)
    (tmp_path / "eval" / "generations.jsonl").unlink()  # starting over is allowed
    run_eval(config(), generator=generator, progress=False)
    # settings that do not change the generations are accepted on resume
    results = run_eval(config("reward.num_workers=2", "math_benchmarks=[p]"), generator=generator, progress=False)
    assert results["benchmarks"]["p"]["prompts"] == 4


def test_an_output_dir_blocked_by_a_file_is_one_line(workdir, capsys, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    err = _error(capsys, _args(workdir, "x", f"output_dir={blocker / 'run'}"))
    assert f"{blocker} is a file, not a folder" in err


def test_an_unwritable_output_dir_is_one_line(workdir, capsys):
    # /proc refuses new entries even to root (a chmod'ed folder would not stop root, which CI runs as)
    err = _error(capsys, _args(workdir, "x", "output_dir=/proc/sftrl-jax-run"))
    assert "output_dir /proc/sftrl-jax-run: cannot write there" in err


def test_a_replaced_data_file_with_the_same_mtime_is_read_again(tmp_path, isolated_datasets_cache):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "first", "answer": "1"}) + "\n")
    stamp = os.stat(path).st_mtime_ns
    assert [row["prompt"] for _, _, row in load_rows(str(path))] == ["first"]
    path.write_text(json.dumps({"prompt": "other", "answer": "1"}) + "\n")
    os.utime(path, ns=(stamp, stamp))  # as `cp -p` or a restored backup leaves it
    assert [row["prompt"] for _, _, row in load_rows(str(path))] == ["other"]


def test_sft_config_record_only_after_the_checks(workdir):
    config = load_config(SFTConfig, TINY, [f"model.path={workdir[1]}", f"data.train_files=[{workdir[0] / 'none'}]",
                                           f"output_dir={workdir[0] / 'norecord'}"])
    with pytest.raises((FileNotFoundError, ValueError)):
        run_sft(config, progress=False)
    assert not (workdir[0] / "norecord" / "config.yaml").exists()


# The layout keys a resume ignores, per config class (the rest must match). The SFT and RL classes are
# also what each pipeline stage is built and resumed as.
_MODEL_LAYOUT = {"model.remat", "model.scan_layers", "model.attention", "model.attention_block_size",
                 "model.logits_chunk_size"}
_TRAINING_LAYOUT = {"output_dir", "checkpoint", "logging", "distributed", "mesh", "train.micro_batch_size",
                    *_MODEL_LAYOUT}
LAYOUT = {
    "sft": _TRAINING_LAYOUT,
    "rl": _TRAINING_LAYOUT | {"reward.num_workers", "reward.timeout_s"},
    "pipeline": {"output_dir", "logging", "distributed", "mesh", "reward.num_workers", "reward.timeout_s",
                 *_MODEL_LAYOUT},
    # reward.timeout_s decides which responses score 0, so it is not ignored by the evaluation's resume
    # sampling.batch_size and chunk_size decide each generation batch's random key, so they are settings too
    "eval": {"output_dir", "mesh", "distributed", "math_benchmarks", "ood_benchmarks", "reward.num_workers",
             *_MODEL_LAYOUT},
}


@pytest.mark.parametrize("kind", sorted(LAYOUT))
def test_layout_keys_come_from_the_config_fields(kind):
    from sftrl_jax.kinds import config_class
    from sftrl_jax.layout import layout_keys

    keys = layout_keys(config_class(kind))
    assert len(keys) == len(set(keys))
    assert set(keys) == LAYOUT[kind]


def test_check_continuity_ignores_only_layout_keys(tmp_path):
    import dataclasses

    from sftrl_jax.config import save_config
    from sftrl_jax.run_folder import check_continuity

    record = tmp_path / "config.yaml"
    config = load_config(SFTConfig, TINY, ["model.path=/m"])
    save_config(config, record)
    moved = dataclasses.replace(config, output_dir=str(tmp_path / "moved"), mesh={"data": 2, "fsdp": -1},
                                train=dataclasses.replace(config.train, micro_batch_size=3),
                                model=dataclasses.replace(config.model, attention="dense"))
    check_continuity(record, moved)
    other = dataclasses.replace(moved, train=dataclasses.replace(moved.train, seed=7))
    with pytest.raises(RunFolderError, match=rf"train\.seed: {config.train.seed} -> 7") as err:
        check_continuity(record, other)
    assert "micro_batch_size" not in str(err.value) and "attention" not in str(err.value)
    check_continuity(record, other, force=True)
