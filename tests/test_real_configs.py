"""The real models' config.json files build abstractly with the published parameter counts."""

import json
from pathlib import Path

import jax
import pytest

from sftrl_jax.models import ModelConfig, abstract_model, count_params, param_items
from sftrl_jax.sharding import make_mesh
from sftrl_jax.models.hf_io import param_sharding

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = {
    "qwen2.5-math-7b": 7_615_616_512,
    "llama-3.1-8b": 8_030_261_248,
    "qwen3-0.6b": 596_049_920,
}


def _config(name):
    return ModelConfig.from_hf_dict(json.loads((FIXTURES / f"{name}.config.json").read_text()))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_config_parameter_count(name):
    model = abstract_model(_config(name), dtype="bfloat16")
    assert count_params(model) == EXPECTED[name]
    assert all(isinstance(var.get_value(), jax.ShapeDtypeStruct) for _, var in param_items(model))  # nothing allocated


def test_family_differences_are_config_fields():
    qwen2, llama, qwen3 = _config("qwen2.5-math-7b"), _config("llama-3.1-8b"), _config("qwen3-0.6b")
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.qk_norm, qwen2.tie_word_embeddings) == (True, False, False, False)
    assert llama.rope_scaling == ("llama3", 8.0, 1.0, 4.0, 8192) and not llama.qkv_bias
    assert (qwen3.qk_norm, qwen3.tie_word_embeddings, qwen3.head_dim) == (True, True, 128)
    assert qwen3.head_dim != qwen3.hidden_size // qwen3.num_heads


def test_7b_parameters_shard_over_fsdp():
    mesh = make_mesh({"fsdp": 8})
    model = abstract_model(_config("qwen2.5-math-7b"), dtype="bfloat16", mesh=mesh)
    sharding = param_sharding(model.layers.gate_proj, mesh, model.rules)
    assert sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert sharding.shard_shape(model.layers.gate_proj.shape) == (28, 3584 // 8, 18944)
