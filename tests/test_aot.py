"""``sftrl-jax compile``: AOT compilation for TPU slices and GPU hosts on this CPU (needs the ``aot`` extra)."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from sftrl_jax import aot
from sftrl_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _has_libtpu() -> bool:
    from jax._src.cloud_tpu_init import get_tpu_library_path

    return get_tpu_library_path() is not None


# CI installs the aot extra (.ci/run): there a missing compiler is a failure, not a skip
IN_CI = bool(os.environ.get("CI"))
needs_libtpu = pytest.mark.skipif(not (_has_libtpu() or IN_CI), reason="libtpu not installed (pip install -e '.[aot]')")
needs_cuda_plugin = pytest.mark.skipif(importlib.util.find_spec("jax_plugins.xla_cuda12") is None and not IN_CI,
                                       reason="jax-cuda12-plugin not installed (pip install -e '.[aot]')")

TINY = {"model_type": "qwen2", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
        "bos_token_id": 0, "eos_token_id": 1}
KEYS = {"name", "fits", "argument_bytes", "output_bytes", "temp_bytes", "total_bytes", "hbm_bytes", "flops",
        "bytes_accessed"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A model directory holding only config.json (the compile never reads weights)."""
    directory = tmp_path_factory.mktemp("tiny_model")
    (directory / "config.json").write_text(json.dumps(TINY))
    return str(directory)


def _overrides(model_dir):
    return [f"model.path={model_dir}", "model.compute_dtype=bfloat16"]


def _by_name(result):
    return {f["name"]: f for f in result["functions"]}


def test_topology_names():
    assert aot.parse_topology("v5p-64").jax_name == "v5p:2x4x4"  # 64 TensorCores = 32 chips
    assert aot.parse_topology("v5p-8").jax_name == "v5p:2x2x1"
    assert aot.parse_topology("v6e-64").jax_name == "v6e:8x8"
    assert aot.parse_topology("v5e-4").jax_name == "v5e:2x2"
    assert aot.parse_topology("v5p:2x2x2").jax_name == "v5p:2x2x2"  # JAX's own names pass through
    assert aot.parse_topology("8xh100").jax_name == "1x1x8"
    assert aot.parse_topology("16xh100").jax_name == "1x2x8"  # two hosts of 8
    assert aot.parse_topology("1xh200").chip_key == "h200"
    with pytest.raises(aot.AotError, match="unknown topology 'v9z-3'.*v5p-64"):
        aot.parse_topology("v9z-3")


def test_vendored_gpu_specs_match_the_chip_table():
    for key in aot.GPU_SPECS:
        figures = aot.gpu_spec_figures(aot.gpu_spec_text(key))
        chip = aot.CHIPS[key]
        assert figures["hbm_bytes"] == chip.hbm_bytes
        assert figures["hbm_bandwidth"] == chip.hbm_bandwidth
        assert figures["peak_flops"] == pytest.approx(chip.peak_flops, rel=1e-3)  # 989 TFLOP/s bf16 dense


@pytest.mark.slow
@needs_libtpu
def test_sft_step_compiles_for_a_tpu_slice(tiny_model, tmp_path, capsys):
    out = tmp_path / "sft.json"
    assert main(["compile", "--config", str(ROOT / "configs/tiny_sft.yaml"), "--topology", "v5e-4", "--quiet",
                 "--json", str(out), *_overrides(tiny_model)]) == 0
    assert "sft/train_step" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["topology"] == "v5e-4" and result["devices"] == 4
    functions = _by_name(result)
    assert set(functions) == {"sft/train_step", "sft/eval_step"}  # tiny_sft holds out an eval split
    for f in functions.values():
        assert KEYS <= set(f)
        assert f["fits"] and f["flops"] > 0 and f["bytes_accessed"] > 0
        assert f["total_bytes"] == f["argument_bytes"] + f["output_bytes"] - f["alias_bytes"] + f["temp_bytes"] \
            + f["generated_code_bytes"]
        assert f["hbm_bytes"] == 16 * 2**30
    assert functions["sft/train_step"]["alias_bytes"] > 0  # the train state is donated


@pytest.fixture(scope="module")
def tiny_rl_on_v5e_4(tiny_model):
    """The tiny RL config compiled for v5e-4 (compiled once for the tests that read it)."""
    return aot.compile_run(ROOT / "configs/tiny_rl.yaml", "v5e-4", _overrides(tiny_model))


@pytest.mark.slow
@needs_libtpu
def test_rl_functions_compile_for_a_tpu_slice(tiny_rl_on_v5e_4):
    functions = _by_name(tiny_rl_on_v5e_4)
    assert {"rl/policy_update", "rl/logprobs", "rl/generate", "rl/prefill", "rl/decode_step"} <= set(functions)
    for f in functions.values():
        if f["name"] != "rl/sampling_layout":  # a relayout: copies, no FLOPs
            assert f["fits"] and f["flops"] > 0, f
    # the decode layout (sampling.sampling_layout) gathers no weights per token; the FSDP training layout does
    decode, decode_from_training_layout = functions["rl/decode_step"], functions["rl/decode_step[train_layout]"]
    assert decode["collective_bytes"] < decode_from_training_layout["collective_bytes"]


@pytest.mark.slow
@needs_libtpu
def test_sampling_tensor_parallel_compiles_the_sampler_on_the_decode_mesh(tiny_model, tiny_rl_on_v5e_4):
    """sampling.tensor_parallel=2 on v5e-4 (mesh fsdp 4): the sampler's programs and the modelled rollout are
    those of a (fsdp 2, tensor 2) mesh of the same chips: half the data-parallel shards, each chip reading
    about half the weights per decode step; the training step keeps its mesh."""
    default = tiny_rl_on_v5e_4
    parallel = aot.compile_run(ROOT / "configs/tiny_rl.yaml", "v5e-4",
                               [*_overrides(tiny_model), "sampling.tensor_parallel=2"])
    before, after = default["rollouts"]["rl"], parallel["rollouts"]["rl"]
    assert (before["shards"], after["shards"]) == (4, 2)
    assert after["weight_bytes"] < 0.6 * before["weight_bytes"]
    assert after["kv_bytes_per_position"] == before["kv_bytes_per_position"] / 2  # 2 kv heads over 2 chips
    functions = _by_name(parallel)
    for name in ("rl/generate", "rl/decode_step", "rl/paged_decode_step", "rl/sampling_layout"):
        assert functions[name]["fits"], name
    assert functions["rl/policy_update"]["argument_bytes"] == _by_name(default)["rl/policy_update"]["argument_bytes"]
    with pytest.raises(aot.AotError, match=r"sampling.tensor_parallel \(4\): must divide the model's 4 query "
                                           r"heads and 2 kv heads"):
        aot.compile_run(ROOT / "configs/tiny_rl.yaml", "v5e-4", [*_overrides(tiny_model), "sampling.tensor_parallel=4"])


@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("method", ["chord", "gspo"])
def test_the_compiled_update_takes_the_methods_own_inputs(tiny_model, method):
    # compile and the trainer share one declaration (rl.step.rl_functions): CHORD's per-row mu is an input
    # the compiled update reads, the same key the trainer feeds; a method without row inputs has none. CHORD's
    # expert rows (rl.expert_data, not read to compile) share the step's 32 sequences with 4 groups of 4 samples
    expert = ["rl.expert_data=[expert.jsonl]"] if method == "chord" else []
    result = aot.compile_run(ROOT / "configs/tiny_rl.yaml", "v5e-4",
                             [*_overrides(tiny_model), f"rl.method={method}", "sampling.n=4", *expert])
    update = _by_name(result)["rl/policy_update"]
    batch_inputs = {name for name in update["inputs"] if name.startswith("batch[")}
    assert {"batch['advantages']", "batch['old_logp']", "batch['response_mask']"} <= batch_inputs
    assert ("batch['chord_mu']" in batch_inputs) == (method == "chord")
    assert update["note"].startswith(f"{method}: ")


@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("topology,megacore", [("v5e-4", {None}), ("v5p-8", {"batch"})], ids=["v5e-4", "v5p-8"])
def test_paged_decode_step_compiles_the_tpu_kernel(tmp_path, monkeypatch, topology, megacore):
    """With a head_dim of 128 the paged engine's decode step on TPU runs JAX's Pallas TPU paged-attention kernel,
    and XLA:TPU compiles it: on v5e's one TensorCore per chip, and split over the slots on v5p's two (one kv
    head); the compile also models both engines' generation time per RL step."""
    from sftrl_jax import paged

    modes, choose = [], paged.tpu_megacore_mode
    monkeypatch.setattr(paged, "tpu_megacore_mode", lambda *a: modes.append(choose(*a)) or modes[-1])
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(dict(TINY, hidden_size=256, num_attention_heads=2,
                                                           num_key_value_heads=1)))
    result = aot.compile_run(ROOT / "configs/tiny_rl.yaml", topology, _overrides(str(directory)))
    assert set(modes) == megacore
    step = _by_name(result)["rl/paged_decode_step"]
    assert step["fits"] and step["note"].endswith("decode attention: pallas_tpu")
    rollout = result["rollouts"]["rl"]
    assert rollout["attention"] == "pallas_tpu" and rollout["paged"]["seconds"] > 0
    assert rollout["static"]["decode_steps"] >= rollout["paged"]["decode_steps"]


@pytest.mark.slow
@needs_cuda_plugin
def test_sft_and_rl_compile_for_a_gpu(tiny_model):
    sft = _by_name(aot.compile_run(ROOT / "configs/tiny_sft.yaml", "1xh100", _overrides(tiny_model)))
    rl = _by_name(aot.compile_run(ROOT / "configs/tiny_rl.yaml", "1xh200", _overrides(tiny_model)))
    for f in [sft["sft/train_step"], rl["rl/policy_update"], rl["rl/decode_step"], rl["rl/generate"]]:
        assert f["fits"] and f["flops"] > 0 and f["bytes_accessed"] > 0, f
    assert rl["rl/decode_step"]["usable_bytes"] == int(0.9 * aot.CHIPS["h200"].hbm_bytes)


def test_unknown_topology_is_one_line_exit_2(tiny_model, capsys):
    assert main(["compile", "--config", str(ROOT / "configs/tiny_sft.yaml"), "--topology", "v7x-9",
                 *_overrides(tiny_model)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown topology 'v7x-9'" in err[0] and "v5p-64" in err[0]


@needs_libtpu
def test_mesh_that_does_not_match_the_slice(tiny_model, capsys):
    assert main(["compile", "--config", str(ROOT / "configs/tiny_sft.yaml"), "--topology", "v5e-4", "--quiet",
                 "mesh.fsdp=8", *_overrides(tiny_model)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "does not fit v5e-4 (4 devices)" in err and "needs 8 devices" in err and "v5e-8" in err
    assert "mesh.fsdp=4" in err


def test_config_kind_detection(tmp_path):
    assert aot.detect_kind(ROOT / "configs/tiny_sft.yaml") == "sft"
    assert aot.detect_kind(ROOT / "configs/tiny_rl.yaml") == "rl"
    assert aot.detect_kind(ROOT / "configs/pipeline_qwen3-0.6b_sft_rl.yaml") == "pipeline"
    assert aot.detect_kind(ROOT / "configs/tpu/rl_qwen2.5-math-7b_v5p-64.yaml") == "rl"  # sized recipes: kind: rl
    # the kind: key decides, not the file name; an eval config has nothing to compile
    (tmp_path / "rl_named.yaml").write_text(f"base: {ROOT / 'configs/tiny_sft.yaml'}\n")
    assert aot.detect_kind(tmp_path / "rl_named.yaml") == "sft"
    with pytest.raises(aot.AotError, match="kind 'eval' has nothing to compile"):
        aot.detect_kind(ROOT / "configs/eval_luffy.yaml")
    (tmp_path / "no_kind.yaml").write_text("model: {path: /m}\n")
    with pytest.raises(aot.AotError, match="no 'kind:'"):
        aot.detect_kind(tmp_path / "no_kind.yaml")


def test_an_over_full_tpu_program_is_reported_not_fit():
    """XLA:TPU refuses an over-full program; its message's temporaries become a 'refused' row."""
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(99.31G) exceeds available HBM (95.74G).")
    assert aot._refused_temp_bytes(RuntimeError(message)) == int(99.31 * 1024 ** 3)
    assert aot._refused_temp_bytes(RuntimeError("INTERNAL: something else")) is None
