"""Hugging Face import/export: round trips, sharded files, tokenizer files, and error messages."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from hf_checkpoints import hf_logits, load_hf, make_hf_model, make_tokenizer, read_tensors as _tensors
from sftrl_jax.models import ModelOptions, load_pretrained, load_tokenizer, param_items, save_pretrained
from sftrl_jax.models.hf_io import SafetensorsReader
from sftrl_jax.sharding import make_mesh


def _assert_same_params(a, b):
    pa, pb = dict(param_items(a)), dict(param_items(b))
    assert pa.keys() == pb.keys()
    for path in pa:
        x, y = np.asarray(pa[path][...]), np.asarray(pb[path][...])
        assert x.dtype == y.dtype and np.array_equal(x, y), path


@pytest.mark.parametrize("family", ["qwen2_tied", "llama3_rope", "qwen3_headdim"])
def test_export_loads_in_transformers_with_identical_logits(hf_checkpoint, tmp_path, family):
    source = hf_checkpoint(family)
    model, _ = load_pretrained(source, mesh=make_mesh({"fsdp": 8}))
    save_pretrained(model, tmp_path)
    original, exported = _tensors(source), _tensors(tmp_path)
    assert original.keys() == exported.keys()
    for name in original:
        assert np.array_equal(original[name], exported[name]), name
    ids = np.random.default_rng(0).integers(0, 96, (2, 11))
    np.testing.assert_array_equal(hf_logits(load_hf(tmp_path), ids), hf_logits(load_hf(source), ids))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_import_export_import_is_bit_exact(tmp_path, dtype):
    source = tmp_path / "source"
    hf = make_hf_model("qwen2_untied", seed=3)
    hf.to(getattr(torch, dtype)).save_pretrained(source)
    first, _ = load_pretrained(ModelOptions(path=str(source), dtype=dtype))
    save_pretrained(first, tmp_path / "exported")
    second, _ = load_pretrained(ModelOptions(path=str(tmp_path / "exported"), dtype=dtype))
    _assert_same_params(first, second)
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["torch_dtype"] == dtype
    with safe_open(str(tmp_path / "exported" / "model.safetensors"), "numpy") as f:
        assert str(f.get_tensor("lm_head.weight").dtype) == dtype


def test_sharded_checkpoint_in_and_out(hf_checkpoint, tmp_path):
    source = hf_checkpoint("qwen2_sharded")
    assert (source / "model.safetensors.index.json").exists()
    model, _ = load_pretrained(source)
    save_pretrained(model, tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0].startswith("model-00001-of-")
    assert not (tmp_path / "model.safetensors").exists()
    total = sum(a.nbytes for a in _tensors(tmp_path).values())
    assert index["metadata"]["total_size"] == total
    ids = np.arange(12).reshape(1, 12)
    np.testing.assert_array_equal(hf_logits(load_hf(tmp_path), ids), hf_logits(load_hf(source), ids))


def test_tokenizer_files_travel_with_the_weights(hf_checkpoint, tmp_path):
    source = tmp_path / "with_tokenizer"
    shutil.copytree(hf_checkpoint("qwen3_headdim"), source)
    make_tokenizer(source)
    model, _ = load_pretrained(source)
    save_pretrained(model, tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).exists(), name
    tokenizer = load_tokenizer(tmp_path / "out")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "1+1?"}], tokenize=False,
                                        add_generation_prompt=True)
    assert text == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


# ------------------------------------------------------------------------------------ errors
def _copy(hf_checkpoint, tmp_path, family="qwen2_untied"):
    target = tmp_path / family
    shutil.copytree(hf_checkpoint(family), target)
    return target


def _rewrite_weights(directory, edit):
    tensors = _tensors(directory)
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def test_unsupported_model_type_names_itself_and_the_supported_ones(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt_neox'.*supported: qwen2, llama, qwen3"):
        load_pretrained(directory)


def test_missing_tensor_is_named(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint, tmp_path)
    _rewrite_weights(directory, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(KeyError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_pretrained(directory)


def test_unexpected_tensor_is_named(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint, tmp_path)
    _rewrite_weights(directory, lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(KeyError, match=r"unexpected tensor 'model.layers.0.self_attn.extra.weight'"):
        load_pretrained(directory)


def test_shape_mismatch_names_tensor_and_shapes(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint, tmp_path)
    _rewrite_weights(directory, lambda t: t.update({"model.norm.weight": np.ones(63, np.float32)}))
    with pytest.raises(ValueError, match=r"tensor 'model.norm.weight' has shape \(63,\), expected \(64,\)"):
        load_pretrained(directory)


def test_missing_directory_and_files_are_named(hf_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found: .*nowhere"):
        load_pretrained(tmp_path / "nowhere")
    directory = _copy(hf_checkpoint, tmp_path)
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors or model.safetensors.index.json in .*"):
        load_pretrained(directory)
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config.json not found in model directory"):
        load_pretrained(directory)
    sharded = _copy(hf_checkpoint, tmp_path, "qwen2_sharded")
    (sharded / "model-00002-of-00006.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard .*model-00002-of-00006.safetensors .*not found"):
        load_pretrained(sharded)
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        load_tokenizer(tmp_path / "nowhere")


def test_unsupported_rope_and_sliding_window_are_refused(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn",
                                                                                     "factor": 4.0}}))
    with pytest.raises(ValueError, match="RoPE scaling type 'yarn' is not supported"):
        load_pretrained(directory)
    (directory / "config.json").write_text(json.dumps({**config, "use_sliding_window": True, "sliding_window": 16,
                                                       "layer_types": ["full_attention", "sliding_attention"]}))
    with pytest.raises(ValueError, match=r"config.json: sliding_window 16 applies to layer 1 of 2 .*"
                                         r"sliding-window attention is not supported"):
        load_pretrained(directory)


def test_loading_streams_one_tensor_at_a_time(hf_checkpoint, monkeypatch):
    """Each HF tensor is read exactly once and placed before the next read (no host copy of the model)."""
    from sftrl_jax.models import hf_io

    events = []
    real_get, real_place = hf_io.SafetensorsReader.get, hf_io.place
    monkeypatch.setattr(hf_io.SafetensorsReader, "get", lambda self, n: events.append(("read", n)) or real_get(self, n))
    monkeypatch.setattr(hf_io, "place", lambda host, s: events.append(("place", host.shape)) or real_place(host, s))
    load_pretrained(hf_checkpoint("qwen2_untied"), mesh=make_mesh({"fsdp": 8}))
    kinds = [e[0] for e in events]
    assert kinds == ["read", "place"] * (len(kinds) // 2)
    reads = [e[1] for e in events if e[0] == "read"]
    assert len(reads) == len(set(reads)) == len(SafetensorsReader(hf_checkpoint("qwen2_untied")).names())
    assert jax.device_count() == 8


def test_a_tokenizer_that_needs_code_from_its_folder_is_refused_without_running_it(tmp_path, monkeypatch):
    import io
    import json

    from hf_checkpoints import make_tokenizer

    directory = make_tokenizer(tmp_path / "tok")
    marker = tmp_path / "ran"
    (directory / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                       "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]})
    config_path.write_text(json.dumps(config))
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 10))  # a prompt answered yes must not happen
    with pytest.raises(ValueError, match="runs no code from a model folder"):
        load_tokenizer(directory)
    assert not marker.exists()
