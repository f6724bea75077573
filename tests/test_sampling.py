"""The sampler: greedy parity with transformers, the sampling filters, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_checkpoints import load_hf
from sftrl_jax.models import ModelConfig, ModelOptions, init_model, load_pretrained
from sftrl_jax.sampling import NonFiniteLogitsError, filter_logits, generate, sampling_layout
from sftrl_jax.sharding import decode_mesh, make_mesh

pytestmark = pytest.mark.usefixtures("module_xla_cache")  # runs of one shape compile once

PROMPTS = [[5, 17, 33, 2, 9], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [88, 3, 61]]


def hf_greedy(model, prompts, max_new_tokens, eos):
    """transformers' greedy generate on the same prompts, left-padded in one batch."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)
    return [row[width:].tolist() for row in out]


def hf_logprobs(model, prompt, tokens):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits.float()
    logp = torch.log_softmax(logits, -1)[0]
    return [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens)]


@pytest.mark.parametrize("family,scan_layers", [("qwen2_tied", True),
                                               pytest.param("llama3_rope", True, marks=pytest.mark.slow),
                                               pytest.param("qwen3_headdim", True, marks=pytest.mark.slow),
                                               pytest.param("qwen3_headdim", False, marks=pytest.mark.slow)],
                         ids=["qwen2_tied", "llama3_rope", "qwen3_headdim", "qwen3_headdim-unrolled"])
def test_greedy_matches_transformers(hf_checkpoint, family, scan_layers):
    directory = hf_checkpoint(family)
    reference = load_hf(directory)
    model, _ = load_pretrained(ModelOptions(path=str(directory), scan_layers=scan_layers), make_mesh({"fsdp": 8}))
    first = generate(model, PROMPTS, max_new_tokens=10, temperature=0, eos_token_id=[])
    eos = first[0].tokens[4]  # a token the first prompt emits: now it must stop there
    samples = generate(model, PROMPTS, max_new_tokens=10, temperature=0, eos_token_id=eos)
    expected = hf_greedy(reference, PROMPTS, 10, eos)
    assert samples[0].stop_reason == "eos" and samples[0].tokens[-1] == eos and len(samples[0].tokens) <= 5
    for prompt, sample, theirs in zip(PROMPTS, samples, expected):
        assert sample.tokens == theirs[:len(sample.tokens)]
        if sample.stop_reason == "length":
            assert len(sample.tokens) == 10 and eos not in sample.tokens
        else:
            assert sample.tokens.count(eos) == 1
        np.testing.assert_allclose(sample.logprobs, hf_logprobs(reference, prompt, sample.tokens), atol=1e-4)


def controlled_model(probs):
    """A model whose next-token distribution is ``probs`` whatever the input."""
    vocab = len(probs)
    config = ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=8, intermediate_size=8, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=4)
    model = init_model(config, mesh=make_mesh({"fsdp": 8}))
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model))
    params = jax.tree.map(jnp.zeros_like, params)
    params["embed"] = params["embed"].at[:, 0].set(1.0)  # every token embeds to e_0
    params["final_norm"] = jnp.ones_like(params["final_norm"])  # rms_norm(e_0) = sqrt(8) e_0
    params["lm_head"] = params["lm_head"].at[0].set(jnp.log(jnp.asarray(probs)) / np.sqrt(8))
    return nnx.merge(graphdef, params)


@pytest.mark.slow
def test_top_k_and_top_p_never_leave_the_allowed_set():
    probs = np.array([0.30, 0.25, 0.20, 0.10, 0.05, 0.04, 0.03, 0.03], np.float32)
    model = controlled_model(probs)
    prompts = [[1, 2, 3]] * 64
    cases = {
        "top_k=3": (dict(top_k=3), {0, 1, 2}),
        "top_p=0.5": (dict(top_p=0.5), {0, 1}),  # mass before token 2 is 0.55 >= 0.5
        # top-p acts on the top-k-renormalised distribution: mass before token 2 is 0.55/0.85 = 0.647
        "top_k=4,top_p=0.7": (dict(top_k=4, top_p=0.7), {0, 1, 2}),
    }
    for name, (kwargs, allowed) in cases.items():
        samples = generate(model, prompts, max_new_tokens=8, temperature=1.0, eos_token_id=[], seed=1, **kwargs)
        emitted = np.concatenate([s.tokens for s in samples])
        assert set(emitted.tolist()) == allowed, name  # never outside, and every allowed token appears
        renormalised = probs[sorted(allowed)] / probs[sorted(allowed)].sum()
        frequencies = np.bincount(emitted, minlength=len(probs))[sorted(allowed)] / len(emitted)
        np.testing.assert_allclose(frequencies, renormalised, atol=0.06)
        logprobs = np.concatenate([s.logprobs for s in samples])
        np.testing.assert_allclose(logprobs, np.log(renormalised)[np.searchsorted(sorted(allowed), emitted)],
                                   atol=1e-4)


@pytest.mark.parametrize("engine", ["static", "paged"])
def test_non_finite_logits_stop_generation_naming_the_prompt(engine):
    """A NaN that reaches the logits of one prompt's samples (here token 7's embedding, in memory: a weight
    file with one is refused when it loads) stops generation, naming that prompt, instead of drawing tokens
    from it; the same call without that prompt runs."""
    model = controlled_model(np.array([0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1, 1e-9], np.float32))  # 7: never drawn
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model))
    params["embed"] = params["embed"].at[7].set(jnp.nan)
    model = nnx.merge(graphdef, params)
    kwargs = dict(max_new_tokens=4, temperature=1.0, eos_token_id=[], n=2, engine=engine)
    with pytest.raises(NonFiniteLogitsError, match=r"NaN or infinite at new token 0 of a sample of prompt 1 "):
        generate(model, [[1, 2, 3], [4, 7, 5], [6, 6]], **kwargs)
    with pytest.raises(NonFiniteLogitsError, match="prompt 0 "):
        generate(model, [[7]], **{**kwargs, "temperature": 0.0})  # greedy too
    assert all(len(s.tokens) == 4 for s in generate(model, [[1, 2, 3], [6, 6]], **kwargs))


@pytest.mark.slow
def test_same_seed_same_output_and_n_samples_per_prompt(hf_checkpoint):
    model, _ = load_pretrained(hf_checkpoint("qwen2_untied"), mesh=make_mesh({"fsdp": 8}))
    kwargs = dict(max_new_tokens=8, temperature=1.0, eos_token_id=[], n=3)
    a = generate(model, PROMPTS, seed=7, **kwargs)
    b = generate(model, PROMPTS, seed=7, **kwargs)
    c = generate(model, PROMPTS, seed=8, **kwargs)
    assert [s.tokens for s in a] == [s.tokens for s in b]
    assert [s.tokens for s in a] != [s.tokens for s in c]
    assert [s.prompt_index for s in a] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len({tuple(s.tokens) for s in a[:3]}) > 1  # samples of one prompt differ
    greedy = generate(model, PROMPTS, max_new_tokens=6, temperature=0, eos_token_id=[], n=2)
    assert greedy[0].tokens == greedy[1].tokens and greedy[2].tokens == greedy[3].tokens


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "unrolled"])
def test_split_layer_weights_decode_like_the_layer_stack(hf_checkpoint, scan_layers):
    """The CPU default (per-layer weights and cache in the decode loop) samples what the stacked path does."""
    model, _ = load_pretrained(ModelOptions(path=str(hf_checkpoint("qwen2_untied")), scan_layers=scan_layers),
                               make_mesh({"fsdp": 8}))
    kwargs = dict(max_new_tokens=8, temperature=1.0, eos_token_id=[], n=3, seed=3)
    split = generate(model, PROMPTS, split_layer_weights=True, **kwargs)
    stacked = generate(model, PROMPTS, split_layer_weights=False, **kwargs)
    assert [s.tokens for s in split] == [s.tokens for s in stacked]
    np.testing.assert_allclose(np.array([s.logprobs for s in split]), np.array([s.logprobs for s in stacked]),
                               atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_sampling_layout_drops_fsdp_and_samples_what_the_training_layout_samples(hf_checkpoint, compute_dtype):
    """Weights whole on every data-parallel shard (tensor split kept), matmul weights in the compute
    dtype, norms untouched; the same tokens and log-probs as decoding from the FSDP training layout."""
    model, _ = load_pretrained(ModelOptions(path=str(hf_checkpoint("qwen2_untied")), compute_dtype=compute_dtype),
                               make_mesh({"fsdp": 4, "tensor": 2}))
    decoding = sampling_layout(model)

    def specs(m):
        return {path: (var[...].sharding.spec, var[...].dtype) for path, var in nnx.to_flat_state(nnx.state(m))}

    train, sample = specs(model), specs(decoding)
    assert any("fsdp" in str(spec) for spec, _ in train.values())  # the test model is split over fsdp
    assert not any("fsdp" in str(spec) for spec, _ in sample.values())
    assert any("tensor" in str(spec) for spec, _ in sample.values())
    for path, (_, dtype) in sample.items():
        expected = jnp.float32 if "norm" in path[-1] else jnp.dtype(compute_dtype)
        assert dtype == expected, (path, dtype)
    kwargs = dict(max_new_tokens=8, temperature=1.0, eos_token_id=[], n=2, seed=5)
    reference, resharded = generate(model, PROMPTS, **kwargs), generate(decoding, PROMPTS, **kwargs)
    assert [s.tokens for s in resharded] == [s.tokens for s in reference]
    np.testing.assert_allclose(np.array([s.logprobs for s in resharded]), np.array([s.logprobs for s in reference]),
                               atol=1e-5)


@pytest.mark.parametrize("engine", ["static", pytest.param("paged", marks=pytest.mark.slow)])
def test_tensor_parallel_decode_mesh_samples_what_the_default_layout_samples(hf_checkpoint, engine):
    """sampling.tensor_parallel=2 on a mesh of fsdp 8: the decode copy lives on the same devices reshaped to
    fsdp 4 x tensor 2, its head weights split over that tensor axis, and greedy decoding gives the default
    layout's tokens and log-probs (float32 rounding aside)."""
    model, _ = load_pretrained(str(hf_checkpoint("qwen2_untied")), mesh=make_mesh({"fsdp": 8}))
    default, parallel = sampling_layout(model), sampling_layout(model, tensor_parallel=2)
    assert dict(parallel.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert list(parallel.mesh.devices.flat) == list(model.mesh.devices.flat)
    q_proj = parallel.layers.q_proj[...]  # [layers, embed, heads 4, head_dim]
    assert q_proj.sharding.mesh == parallel.mesh and q_proj.sharding.spec[2] == "tensor"
    assert {shard.data.shape for shard in q_proj.addressable_shards} == {q_proj.shape[:2] + (2,) + q_proj.shape[3:]}
    assert default.layers.q_proj[...].addressable_shards[0].data.shape == q_proj.shape
    kwargs = dict(max_new_tokens=6, temperature=0.0, eos_token_id=[], engine=engine)
    reference, split = generate(default, PROMPTS, **kwargs), generate(parallel, PROMPTS, **kwargs)
    assert [s.tokens for s in split] == [s.tokens for s in reference]
    np.testing.assert_allclose(np.array([s.logprobs for s in split]), np.array([s.logprobs for s in reference]),
                               atol=1e-5)


def test_tensor_parallel_settings_that_do_not_fit_are_refused(hf_checkpoint):
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    assert decode_mesh(mesh, None) is mesh and decode_mesh(mesh, 2) is mesh
    assert dict(decode_mesh(mesh, 8).shape) == {"data": 1, "fsdp": 1, "tensor": 8}
    with pytest.raises(ValueError, match=r"sampling.tensor_parallel \(3\): must be a multiple of the mesh's tensor"):
        decode_mesh(mesh, 3)
    with pytest.raises(ValueError, match=r"sampling.tensor_parallel \(16\).*fsdp size \(4\) must be a multiple of 8"):
        decode_mesh(mesh, 16)
    model, _ = load_pretrained(str(hf_checkpoint("qwen2_untied")), mesh=make_mesh({"fsdp": 8}))
    with pytest.raises(ValueError, match=r"sampling.tensor_parallel \(4\): must divide the model's 4 query heads "
                                         r"and 2 kv heads"):
        sampling_layout(model, tensor_parallel=4)


def test_filter_logits_by_hand():
    logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1]]))

    def kept(**kwargs):
        return (np.asarray(filter_logits(logits, temperature=1.0, **kwargs)) > -1e29).tolist()

    assert kept(top_k=2) == [[True, True, False, False]]
    assert kept(top_p=0.5) == [[True, False, False, False]]  # mass before token 1 is 0.5, not < 0.5
    assert kept(top_p=0.8) == [[True, True, True, False]]
    assert kept(top_k=1, top_p=0.9) == [[True, False, False, False]]
    assert kept() == [[True, True, True, True]]
    np.testing.assert_allclose(filter_logits(logits, temperature=0.5), 2 * logits, rtol=1e-6)
