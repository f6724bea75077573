"""``sftrl-jax convert``: HF -> orbax -> HF, restoring onto a different mesh."""

import jax
import numpy as np
import pytest
from flax import nnx

from hf_checkpoints import read_tensors as _tensors
from sftrl_jax.checkpointing import load_model
from sftrl_jax.cli import main
from sftrl_jax.models import ModelOptions, load_pretrained, param_items
from sftrl_jax.sharding import make_mesh


def test_convert_round_trip_is_bit_exact(hf_checkpoint, tmp_path, capsys):
    source = hf_checkpoint("qwen3_headdim")
    assert main(["convert", str(source), str(tmp_path / "orbax"), "--mesh", "fsdp=8"]) == 0
    assert (tmp_path / "orbax" / "params").is_dir() and (tmp_path / "orbax" / "config.json").exists()
    assert main(["convert", str(tmp_path / "orbax"), str(tmp_path / "hf")]) == 0
    assert "wrote hf checkpoint" in capsys.readouterr().out
    original, back = _tensors(source), _tensors(tmp_path / "hf")
    assert original.keys() == back.keys()
    assert all(np.array_equal(original[k], back[k]) for k in original)
    assert (tmp_path / "hf" / "generation_config.json").exists()


@pytest.mark.slow
def test_orbax_checkpoint_restores_onto_a_different_mesh(hf_checkpoint, tmp_path):
    source = hf_checkpoint("llama3_rope")
    main(["convert", str(source), str(tmp_path / "orbax"), "--mesh", "fsdp=8", "--dtype", "bfloat16"])
    four = make_mesh({"fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
    restored, config = load_model(tmp_path / "orbax", mesh=four)
    reference, _ = load_pretrained(ModelOptions(path=str(source), dtype="bfloat16"))
    assert restored.param_dtype == np.dtype("bfloat16") and config.rope_scaling[0] == "llama3"
    assert len(restored.layers.q_proj[...].sharding.device_set) == 4
    got, want = dict(param_items(restored)), dict(param_items(reference))
    for path in want:
        assert np.array_equal(np.asarray(got[path][...]), np.asarray(want[path][...])), path
    logits = jax.jit(lambda s, ids: nnx.merge(nnx.graphdef(restored), s)(ids))(nnx.state(restored),
                                                                              np.arange(8)[None])
    assert np.isfinite(np.asarray(logits)).all()


def test_convert_errors_are_one_line_messages(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "model directory not found" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--mesh", "pipeline=2"]) == 2
    assert "unknown axis 'pipeline'" in capsys.readouterr().err
