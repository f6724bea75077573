"""The real models' config.json files build abstractly with the published parameter counts, and the shipped
YAML configs (configs/**/*.yaml) declare their kind, load, and compose from their bases."""

import json
from pathlib import Path

import jax
import pytest
import yaml

from sftrl_jax.config import ConfigError
from sftrl_jax.models import ModelConfig, ModelOptions, abstract_model, count_params, param_items
from sftrl_jax.models.hf_io import param_sharding
from sftrl_jax.sharding import make_mesh

FIXTURES = Path(__file__).parent / "fixtures"
BF16 = ModelOptions(path="", dtype="bfloat16")
EXPECTED = {
    "qwen2.5-math-7b": 7_615_616_512,
    "llama-3.1-8b": 8_030_261_248,
    "qwen3-0.6b": 596_049_920,
}


def _config(name):
    return ModelConfig.from_hf_dict(json.loads((FIXTURES / f"{name}.config.json").read_text()))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_config_parameter_count(name):
    model = abstract_model(_config(name), BF16)
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
    model = abstract_model(_config("qwen2.5-math-7b"), BF16, mesh)
    sharding = param_sharding(model.layers.gate_proj, mesh, model.rules)
    assert sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert sharding.shard_shape(model.layers.gate_proj.shape) == (28, 3584 // 8, 18944)


# ------------------------------------------------------------------------------- the shipped YAML configs
ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(ROOT.glob("configs/**/*.yaml"))


def _classes():
    from sftrl_jax.kinds import KINDS, config_class

    return {kind: config_class(kind) for kind in KINDS}


def _leaves(mapping, prefix=""):
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_configs_are_found():
    names = {str(p.relative_to(ROOT / "configs")) for p in SHIPPED}
    assert {"tiny_sft.yaml", "tiny_rl.yaml", "eval_luffy.yaml", "tpu/rl_qwen2.5-math-7b_v5p-64.yaml",
            "gpu/pipeline_qwen3-0.6b_sft_rl_8xh100.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_shipped_config_declares_its_kind_and_loads_with_that_class(path):
    from sftrl_jax.config import config_kind, load_config

    kind = config_kind(path)
    assert kind in _classes(), f"{path}: no kind: (directly or through its base:)"
    assert yaml.safe_load(path.read_text()).get("kind") == kind  # stated in the file itself, first key
    first_key = next(line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    assert first_key == f"kind: {kind}"
    classes = _classes()
    config = load_config(classes[kind], path, ["model.path=/m"])  # some leave model.path to the command line
    assert config.kind == kind
    for other, cls in classes.items():  # the other commands refuse it, naming the right one
        if other != kind:
            with pytest.raises(ConfigError, match=f"run it with `sftrl-jax {kind}`"):
                load_config(cls, path, ["model.path=/m"])


SIZED = [p for p in SHIPPED if "base" in yaml.safe_load(p.read_text())]


def test_sized_recipes_have_a_base():
    # every sized recipe states only its differences from a general config; a general config may also be a
    # variant of another (LUFFY's on the SFT->RL baseline's verl settings)
    assert {p.relative_to(ROOT / "configs").parts[0] for p in SIZED} >= {"tpu", "gpu"}
    assert all(p in SIZED for p in SHIPPED if p.parent.name in ("tpu", "gpu"))


@pytest.mark.parametrize("path", SIZED, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_sized_recipe_is_its_base_plus_what_it_states(path):
    from sftrl_jax.config import config_kind, deep_merge, from_dict, load_config, read_yaml

    own = yaml.safe_load(path.read_text())
    base_path = path.parent / own.pop("base")
    assert base_path.resolve().parent == (ROOT / "configs").resolve()  # a general config in configs/
    assert config_kind(base_path) == config_kind(path) == own.pop("kind")
    base = read_yaml(base_path)
    # it states only what differs from its base
    base_leaves = dict(_leaves(base))
    same = [key for key, value in _leaves(own) if key in base_leaves and base_leaves[key] == value]
    assert not same, f"{path.name} repeats its base's values: {same}"
    assert own, "a sized recipe that changes nothing"
    # and resolves to exactly its base with those settings merged in
    assert read_yaml(path) == deep_merge(base, own)
    cls = _classes()[config_kind(path)]
    expected = from_dict(cls, deep_merge(base, {**own, "model": {"path": "/m"}}))
    assert load_config(cls, path, ["model.path=/m"]) == expected
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"Base: {base_path.relative_to(path.parent)}" in line for line in header)


def test_sized_recipe_resolves_to_base_plus_overrides():
    from sftrl_jax.config import load_config
    from sftrl_jax.rl import RLConfig

    sized = load_config(RLConfig, ROOT / "configs/tpu/rl_qwen2.5-math-7b_v5p-64.yaml")
    base = load_config(RLConfig, ROOT / "configs/rl_qwen2.5-math-7b.yaml", [
        "train.micro_batch_size=1", "sampling.batch_size=128", "sampling.tensor_parallel=4", "mesh.fsdp=32",
        "output_dir=runs/rl_qwen2.5-math-7b_v5p-64"])
    assert sized == base
    assert sized.mesh == {"data": 1, "fsdp": 32, "tensor": 1}  # a mapping merges key by key
    assert (sized.sampling.n, sized.optimizer.learning_rate, sized.reward.require_think) == (8, 1e-6, True)


@pytest.mark.parametrize("old,new", [("rl.group_size", "sampling.n"), ("rl.learning_rate", "optimizer.learning_rate"),
                                     ("rl.generation_batch_size", "sampling.batch_size"),
                                     ("rl.require_think", "reward.require_think"), ("rl.seed", "train.seed"),
                                     ("rl.log_every", "logging.log_every")])
def test_an_old_rl_key_names_its_new_name(old, new):
    from sftrl_jax.config import MOVED_KEYS, load_config
    from sftrl_jax.rl import RLConfig

    assert MOVED_KEYS[old] == new
    with pytest.raises(ConfigError, match=f"config key '{old}' is now '{new}'"):
        load_config(RLConfig, ROOT / "configs/tiny_rl.yaml", ["model.path=/m", f"{old}=1"])


def test_old_keys_in_a_file_and_in_a_pipeline_name_their_new_names(tmp_path):
    from sftrl_jax.config import load_config
    from sftrl_jax.pipeline import PipelineConfig
    from sftrl_jax.sft import SFTConfig

    old_sft = tmp_path / "old_sft.yaml"
    old_sft.write_text("kind: sft\nmodel: {path: /m}\ntrain: {learning_rate: 1.0e-5}\n")
    with pytest.raises(ConfigError, match="'train.learning_rate' is now 'optimizer.learning_rate'"):
        load_config(SFTConfig, old_sft)
    with pytest.raises(ConfigError, match=r"stage 1 \(rl\): config key 'rl.group_size' is now 'sampling.n'"):
        load_config(PipelineConfig, overrides=["model.path=/m", "stages=[{kind: rl}]", "rl={rl: {group_size: 4}}"])
    with pytest.raises(ConfigError, match="'probe.temperature' is now 'probe.sampling.temperature'"):
        load_config(PipelineConfig, overrides=["model.path=/m", "stages=[{kind: sft}]", "probe.temperature=0.5"])


def test_a_base_cycle_is_an_error_naming_the_files(tmp_path):
    from sftrl_jax.config import config_kind, load_config
    from sftrl_jax.sft import SFTConfig

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text("kind: sft\nbase: sub/b.yaml\n")
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nmodel: {path: /m}\n")
    with pytest.raises(ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(SFTConfig, tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="cycle"):
        config_kind(tmp_path / "sub" / "b.yaml")
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(SFTConfig, tmp_path / "self.yaml")


# ------------------------------------------------------------------ LUFFY's recipe in the full-scale configs
MODEL_DIRS = ROOT / "configs" / "models"
FULL_SCALE = [p for p in SHIPPED if p.name.startswith(("sft_", "rl_", "pipeline_"))]


def _hf(name):
    return json.loads((MODEL_DIRS / name / "config.json").read_text())


def test_16k_think_is_stock_qwen_with_longer_rope():
    """LUFFY's base model: stock Qwen2.5-Math-7B with rope_theta 40000 and 16384 positions, same weights."""
    stock, think = _hf("Qwen2.5-Math-7B"), _hf("Qwen2.5-Math-7B-16k-think")
    assert {k for k in stock.keys() | think.keys() if stock.get(k) != think.get(k)} == {
        "max_position_embeddings", "rope_theta"}
    assert (think["max_position_embeddings"], think["rope_theta"]) == (16384, 40000)
    model = abstract_model(ModelConfig.from_hf_dict(think), BF16)
    assert count_params(model) == EXPECTED["qwen2.5-math-7b"]


def _loaded(path):
    from sftrl_jax.config import config_kind, load_config

    return load_config(_classes()[config_kind(path)], path, ["model.path=/m"])


def _model_dir(path) -> str:
    """The configs/models directory of the model a full-scale config names (the Qwen 7B: LUFFY's 16k-think)."""
    name = path.name
    if "qwen2.5-math-7b" in name:
        return "Qwen2.5-Math-7B-16k-think"
    return "Llama-3.1-8B" if "llama-3.1-8b" in name else "Qwen3-0.6B"


def _positions_needed(config) -> dict[str, int]:
    from sftrl_jax.pipeline import stage_config

    if config.kind == "sft":
        return {"data.max_length": config.data.max_length}
    if config.kind == "rl":
        return {"data.max_prompt_length + sampling.max_new_tokens":
                config.data.max_prompt_length + config.sampling.max_new_tokens}
    needed = {"probe.max_length": config.probe.max_length,
              "probe.max_prompt_length + probe.sampling.max_new_tokens":
                  config.probe.max_prompt_length + config.probe.sampling.max_new_tokens}
    for index in range(len(config.stages)):
        for key, value in _positions_needed(stage_config(config, index, "/m")).items():
            needed[f"stage {index + 1} {key}"] = value
    return needed


@pytest.mark.parametrize("path", FULL_SCALE, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_full_scale_configs_fit_their_models_positions(path):
    from sftrl_jax.models.config import require_positions

    model = ModelConfig.from_hf_dict(_hf(_model_dir(path)))
    for key, needed in _positions_needed(_loaded(path)).items():
        require_positions(model, needed, key)  # raises past max_position_embeddings


def test_stock_qwen_refuses_luffys_sft_rows():
    from sftrl_jax.models.config import require_positions

    config = _loaded(ROOT / "configs/sft_qwen2.5-math-7b.yaml")
    assert config.model.path == "/m"  # the file names the 16k-think copy; the override replaced it
    assert "16k-think" in yaml.safe_load((ROOT / "configs/sft_qwen2.5-math-7b.yaml").read_text())["model"]["path"]
    with pytest.raises(ValueError, match=r"data.max_length \(16384\) exceeds the model's max_position_embeddings "
                                         r"\(4096\)"):
        require_positions(ModelConfig.from_hf_dict(_hf("Qwen2.5-Math-7B")), config.data.max_length, "data.max_length")


@pytest.mark.parametrize("path", FULL_SCALE, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_full_scale_headers_say_whose_settings_they_are(path):
    header = " ".join(line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#"))
    assert "BRIEF section 6" not in header and "Reference" not in header and "papers' recipe" not in header
    if "pipeline_qwen3-0.6b" in path.name:
        assert "Paper B publishes no" in header or "settings ours: Paper B publishes none" in header
    else:
        assert "LUFFY's public" in header


@pytest.mark.parametrize("model", ["qwen2.5-math-7b", "llama-3.1-8b"])
def test_luffys_settings(model):
    sft = _loaded(ROOT / f"configs/sft_{model}.yaml")
    opt = sft.optimizer
    assert (opt.learning_rate, opt.warmup_ratio, opt.lr_schedule, opt.min_lr_ratio) == (5e-5, 0.1, "cosine", 0.1)
    assert (opt.adam_b1, opt.adam_b2, opt.weight_decay, opt.max_grad_norm) == (0.9, 0.95, 0.0, 1.0)  # OpenRLHF's
    assert (sft.train.global_batch_size, sft.train.num_epochs, sft.data.max_length, sft.data.pack) == \
        (64, 3, 16384, True)
    assert (sft.train.emulate_bug, sft.train.emulate_ranks, sft.train.emulate_micro_batch_size) == ("none", 8, 1)
    assert sft.data.think_prefix == ("prompt" if model.startswith("qwen") else "keep")  # Llama's: ours
    rl = _loaded(ROOT / f"configs/rl_{model}.yaml")
    assert (rl.optimizer.learning_rate, rl.optimizer.lr_schedule, rl.optimizer.weight_decay) == (1e-6, "constant", 0.01)
    assert (rl.optimizer.adam_b1, rl.optimizer.adam_b2, rl.optimizer.max_grad_norm) == (0.9, 0.999, 1.0)  # verl's
    assert (rl.rl.prompts_per_step, rl.sampling.n, rl.rl.mini_batches_per_step, rl.rl.ppo_epochs) == (128, 8, 2, 1)
    assert (rl.data.max_prompt_length, rl.sampling.max_new_tokens, rl.sampling.temperature) == (1024, 8192, 1.0)
    # loss_remove_token_mean: token sum / (8192 padded response length x 8 GPUs, whose gradients FSDP averages)
    assert (rl.rl.agg_mode, rl.rl.loss_scale_factor) == ("seq-mean-token-sum-norm", 8192 * 8)
    assert (rl.rl.norm_adv_by_std, rl.rl.kl_coef, rl.rl.entropy_coef) == (False, 0.0, 0.001)
    assert (rl.rl.clip_low, rl.rl.clip_high) == (0.2, 0.2) and rl.rl.clip_c > 4.9e8  # no dual clip below exp(20)
