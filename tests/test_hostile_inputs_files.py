"""Hostile inputs for model folders, output folders and file writes.

Each test names the hostile case: code planted in a model or data folder, symbolic links planted in a run
folder, a chat template that renders forever, a conversion or evaluation aimed at a folder that holds
something else, a kill during the rewrite of a record file, and a model config too large to compile.
"""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_checkpoints import make_tokenizer
from sftrl_jax.cli import main
from sftrl_jax.run_folder import RunFolderError, owned_folder

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ code from a model or data folder
def _plant_code(directory: Path, marker: Path) -> None:
    """A module in ``directory`` that leaves ``marker`` behind if it is ever imported."""
    (directory / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                       "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")


@pytest.mark.parametrize("where", ["tokenizer_config.json", "config.json"])
def test_tokenizer_auto_map_to_code_in_the_model_folder_is_refused_without_asking(tmp_path, monkeypatch, where):
    from sftrl_jax.models import load_tokenizer

    folder, marker = make_tokenizer(tmp_path / "model"), tmp_path / "ran"
    _plant_code(folder, marker)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["tokenizer_class"] = "EvilTokenizer"
    auto_map = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    if where == "tokenizer_config.json":
        settings["auto_map"] = auto_map
    else:
        (folder / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": auto_map}))
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))  # a "yes" waiting, should anything ask
    try:  # refused, or read with transformers' own classes: either way nothing of the folder's code runs
        load_tokenizer(folder)
    except ValueError as refusal:
        assert "runs no code from a model folder" in str(refusal)
    assert not marker.exists()
    assert sys.stdin.read() == "y\n" * 10  # nothing asked


def test_data_folder_with_a_loading_script_is_refused_naming_it(tmp_path, isolated_datasets_cache):
    from sftrl_jax.data.sources import load_rows

    folder, marker = tmp_path / "data", tmp_path / "ran"
    folder.mkdir()
    (folder / "data.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (folder / "train.jsonl").write_text('{"prompt": "1+1?"}\n')
    with pytest.raises(ValueError, match=r"data: the data folder holds a loading script \(data.py\)"):
        list(load_rows(str(folder)))
    assert not marker.exists()


# ------------------------------------------------------------------ symbolic links in a run folder
@pytest.mark.parametrize("planted", ["metrics.jsonl", "config.yaml", ".lock", "final", "checkpoints/10"])
def test_symlink_planted_in_the_output_folder_is_refused(tmp_path, planted):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me\n")
    out = tmp_path / "run"
    link = out / planted
    link.parent.mkdir(parents=True)
    target = outside if planted in ("final", "checkpoints/10") else outside / "precious.txt"
    link.symlink_to(target)
    with pytest.raises(RunFolderError, match=f"{link} is a symbolic link"):
        with owned_folder(out, command="sftrl-jax sft"):
            pass
    assert (outside / "precious.txt").read_text() == "keep me\n"
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]


def test_symlink_planted_in_wandbs_own_folder_is_left_to_wandb(tmp_path):
    (tmp_path / "run" / "wandb").mkdir(parents=True)
    (tmp_path / "run" / "wandb" / "latest-run").symlink_to(tmp_path)  # wandb makes this link itself
    with owned_folder(tmp_path / "run", command="sftrl-jax sft"):
        pass


def test_rewrite_of_a_record_file_replaces_a_link_instead_of_writing_through_it(tmp_path):
    from sftrl_jax.run_folder import write_text_atomic

    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    (tmp_path / "metrics.jsonl").symlink_to(precious)
    write_text_atomic(tmp_path / "metrics.jsonl", '{"step": 1}\n')
    assert precious.read_text() == "keep me\n"
    assert not (tmp_path / "metrics.jsonl").is_symlink()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'


# ------------------------------------------------------------------ a chat template that renders forever
FOREVER = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages[0].content }}"


def test_chat_template_that_renders_forever_stops_with_one_line_naming_the_folder(tmp_path, monkeypatch):
    import transformers

    from sftrl_jax.data import sft

    folder = make_tokenizer(tmp_path / "model", chat_template=FOREVER)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    monkeypatch.setattr(sft, "TEMPLATE_TIME_LIMIT_S", 0.5)
    start = time.perf_counter()
    with pytest.raises(sft.ChatTemplateTimeout) as caught:
        sft.build_prompt_text("what is 1+1?", tokenizer)
    assert time.perf_counter() - start < 5
    message = str(caught.value)
    assert "\n" not in message and str(folder) in message and "did not finish rendering within 0.5 s" in message
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL and signal.getitimer(signal.ITIMER_REAL)[0] == 0


def test_chat_template_time_limit_costs_ordinary_rendering_next_to_nothing(tokenizer):
    from sftrl_jax.data.sft import apply_chat_template

    messages = [{"role": "user", "content": "what is 1+1?"}]

    def best(render, repeats=5, calls=200):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                render()
            times.append((time.perf_counter() - start) / calls)
        return min(times)

    plain = best(lambda: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    guarded = best(lambda: apply_chat_template(tokenizer, messages, generation_prompt=True))
    assert guarded - plain < 50e-6, (plain, guarded)  # a few microseconds of timer calls per rendering


# ------------------------------------------------------------------ convert onto something that is there
def test_convert_into_a_non_empty_folder_refuses_without_overwrite(hf_checkpoint, tmp_path, capsys):
    source = hf_checkpoint("qwen3_headdim")
    capsys.readouterr()
    destination = tmp_path / "existing_model"
    destination.mkdir()
    (destination / "config.json").write_text('{"mine": true}\n')
    assert main(["convert", str(source), str(destination)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"destination {destination} is not empty" in err and "--overwrite" in err
    assert (destination / "config.json").read_text() == '{"mine": true}\n'
    assert main(["convert", str(source), str(destination), "--overwrite"]) == 0
    assert (destination / "params").is_dir()


@pytest.mark.parametrize("blocked", ["dst", "parent"])
def test_convert_to_a_destination_that_is_a_file_fails_at_once(hf_checkpoint, tmp_path, capsys, blocked):
    source = hf_checkpoint("qwen3_headdim")
    capsys.readouterr()
    (tmp_path / "a_file").write_text("not a folder\n")
    destination = tmp_path / "a_file" if blocked == "dst" else tmp_path / "a_file" / "model"
    start = time.perf_counter()
    assert main(["convert", str(source), str(destination)]) == 2
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{tmp_path / 'a_file'} is a file, not a folder" in err
    assert (tmp_path / "a_file").read_text() == "not a folder\n"


# ------------------------------------------------------------------ a command aimed at another command's run
@pytest.mark.parametrize("theirs, mine", [("sft", "eval"), ("rl", "eval"), ("eval", "sft"), ("sft", "rl")])
def test_command_into_another_commands_run_folder_is_refused_naming_it(tmp_path, theirs, mine):
    record = f"kind: {theirs}\nmodel:\n  path: /models/m\n"
    (tmp_path / "config.yaml").write_text(record)
    with pytest.raises(RunFolderError, match=f"holds a `sftrl-jax {theirs}` run.*sftrl-jax {mine} would overwrite"):
        with owned_folder(tmp_path, command=f"sftrl-jax {mine}"):
            pass
    assert (tmp_path / "config.yaml").read_text() == record
    assert not (tmp_path / ".lock").exists()
    (tmp_path / "config.yaml").write_text(f"kind: {mine}\n")  # its own kind: the folder is usable
    with owned_folder(tmp_path, command=f"sftrl-jax {mine}"):
        pass


def test_eval_command_into_a_training_run_folder_keeps_its_record(tmp_path, capsys):
    record = "kind: sft\noutput_dir: run\n"
    (tmp_path / "config.yaml").write_text(record)
    assert main(["eval", f"output_dir={tmp_path}", f"model.path={tmp_path}", f"data.files=[{tmp_path}/x.jsonl]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "holds a `sftrl-jax sft` run" in err
    assert (tmp_path / "config.yaml").read_text() == record


# ------------------------------------------------------------------ a kill during the rewrite of a record
_KILLED_WRITER = """
import builtins, io, os, sys, time
real_open = io.open
def open_then_stall(file, mode="r", *args, **kwargs):
    handle = real_open(file, mode, *args, **kwargs)
    if "w" in mode and {name!r} in os.fspath(file):  # the file is created or truncated: a kill lands now
        real_open(sys.argv[2], "w").close()
        time.sleep(120)
    return handle
builtins.open = io.open = open_then_stall
sys.path.insert(0, {root!r})
{call}
"""


@pytest.mark.parametrize("name, call", ids=["metrics", "generations"], argvalues=[
    ("metrics.jsonl", "from sftrl_jax.metrics import MetricsWriter; MetricsWriter(sys.argv[1], truncate_after_step=3)"),
    ("generations.jsonl", "from pathlib import Path; from sftrl_jax.evaluation import resume_generations; "
                          "resume_generations(Path(sys.argv[1]), 2, 1)"),
])
def test_kill_during_the_rewrite_of_a_record_file_keeps_its_records(tmp_path, name, call):
    path, stalled = tmp_path / name, tmp_path / "stalled"
    if name == "metrics.jsonl":
        text = "".join(json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in range(1, 6))
    else:
        text = "".join(json.dumps({"prompt_id": i, "sample": 0, "response": "r", "score": 1.0,
                                   "problem_id": i, "data_source": "d", "ground_truth": "1"}) + "\n" for i in range(3))
    path.write_text(text)
    script = _KILLED_WRITER.format(name=name, root=str(ROOT), call=call)
    child = subprocess.Popen([sys.executable, "-c", script, str(path), str(stalled)],
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        deadline = time.monotonic() + 60
        while not stalled.exists():
            assert child.poll() is None and time.monotonic() < deadline, "the rewrite never started"
            time.sleep(0.05)
        child.kill()  # kill -9 in the middle of the rewrite
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    assert path.read_text() == text


# ------------------------------------------------------------------ a model config too large to compile
def _has_libtpu() -> bool:
    from jax._src.cloud_tpu_init import get_tpu_library_path

    return get_tpu_library_path() is not None


@pytest.mark.skipif(not (_has_libtpu() or os.environ.get("CI")), reason="libtpu not installed (the aot extra)")
@pytest.mark.parametrize("absurd", [{"num_hidden_layers": 10 ** 6},
                                    {"hidden_size": 10 ** 7, "intermediate_size": 10 ** 7}], ids=["layers", "hidden"])
def test_compile_of_an_absurd_model_config_refuses_in_seconds(tmp_path, capsys, absurd):
    tiny = {"model_type": "qwen2", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 1}
    (tmp_path / "config.json").write_text(json.dumps({**tiny, **absurd}))
    start = time.perf_counter()
    assert main(["compile", "--config", str(ROOT / "configs/tiny_sft.yaml"), "--topology", "v5e-4", "--quiet",
                 f"model.path={tmp_path}", "model.compute_dtype=bfloat16"]) == 2
    assert time.perf_counter() - start < 30
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{tmp_path / 'config.json'}: the model's weights alone take at least" in err
    assert "more than the 69 GB of HBM of all 4 devices of v5e-4" in err
