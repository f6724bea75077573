"""The decoder computes what the PyTorch ``transformers`` model computes, for every family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_checkpoints import hf_logits, load_hf
from sftrl_jax.models import ModelOptions, init_cache, load_pretrained
from sftrl_jax.models.layers import rope_inv_freq
from sftrl_jax.sharding import make_mesh

FP32_TOLERANCE = 1e-4
# bfloat16 parameters and compute vs the float32 reference, relative to the largest |logit|.
# Measured worst case on these models is about 2%; the bound leaves room for other CPUs.
BF16_RELATIVE_TOLERANCE = 0.05


def _batch(seed=0, vocab=96):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (3, 19)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # left padding of different lengths
    mask[2, :12] = 0
    return ids, mask


@jax.jit
def _apply(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, attention_mask=mask)


def logits_of(model, ids, mask=None):
    mask = np.ones_like(ids) if mask is None else mask
    return np.asarray(_apply(*nnx.split(model), jnp.asarray(ids), jnp.asarray(mask)))


@pytest.mark.slow
def test_float32_logits_match_transformers(family, hf_checkpoint):
    directory = hf_checkpoint(family)
    reference = load_hf(directory)
    model, _ = load_pretrained(directory)
    ids, mask = _batch()

    unpadded = logits_of(model, ids)
    assert unpadded.dtype == np.float32 and unpadded.shape == (3, 19, 96)
    assert np.abs(unpadded - hf_logits(reference, ids)).max() <= FP32_TOLERANCE

    padded = logits_of(model, ids, mask)
    real = mask.astype(bool)
    assert np.abs(padded - hf_logits(reference, ids, mask))[real].max() <= FP32_TOLERANCE
    # A left-padded row computes the same logits as the same tokens unpadded.
    row_alone = logits_of(model, ids[2:3, 12:])
    np.testing.assert_allclose(padded[2, 12:], row_alone[0], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("compute_only", [False, True], ids=["bf16-params", "fp32-params-bf16-compute"])
def test_bfloat16_within_documented_tolerance(hf_checkpoint, compute_only):
    directory = hf_checkpoint("qwen3_headdim")
    reference = hf_logits(load_hf(directory), *_batch())
    model, _ = load_pretrained(ModelOptions(path=str(directory), dtype="float32" if compute_only else "bfloat16",
                                            compute_dtype="bfloat16"))
    ours = logits_of(model, *_batch())
    real = _batch()[1].astype(bool)
    error = np.abs(ours - reference)[real].max() / np.abs(reference).max()
    assert ours.dtype == np.float32
    assert error <= BF16_RELATIVE_TOLERANCE
    assert error > 0  # bf16 really was used


@pytest.mark.slow
@pytest.mark.parametrize("mesh_spec", [{"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_mesh_gives_single_device_logits(hf_checkpoint, mesh_spec):
    directory = hf_checkpoint("qwen2_untied")
    single, _ = load_pretrained(directory)
    sharded, _ = load_pretrained(directory, mesh=make_mesh(mesh_spec))
    spec = sharded.layers.gate_proj[...].sharding.spec
    assert "fsdp" in jax.tree.leaves(tuple(spec))  # the weights really are split
    assert len(sharded.layers.gate_proj[...].sharding.device_set) == 8
    ids, mask = _batch()
    np.testing.assert_allclose(logits_of(sharded, ids, mask), logits_of(single, ids, mask), atol=1e-5)


def test_kv_cache_prefill_then_decode_matches_full_forward(hf_checkpoint):
    model, config = load_pretrained(hf_checkpoint("qwen3_headdim"))
    ids, mask = _batch()
    full = logits_of(model, ids, mask)
    prompt_len = 14
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, ids, mask, cache):
        return nnx.merge(graphdef, state).prefill(ids, mask, cache)

    @jax.jit
    def decode(state, tokens, cache):
        return nnx.merge(graphdef, state).decode(tokens, cache)

    cache = init_cache(config, batch=3, max_len=24)
    logits, cache = prefill(state, ids[:, :prompt_len], mask[:, :prompt_len], cache)
    np.testing.assert_allclose(logits, full[:, prompt_len - 1], atol=1e-5)
    for t in range(prompt_len, ids.shape[1]):
        logits, cache = decode(state, jnp.asarray(ids[:, t]), cache)
        np.testing.assert_allclose(logits, full[:, t], atol=1e-5)
    assert int(cache.index) == ids.shape[1]


@pytest.mark.slow
def test_packed_segments_equal_separate_sequences(hf_checkpoint):
    model, _ = load_pretrained(hf_checkpoint("llama3_rope"))
    rng = np.random.default_rng(1)
    first, second = rng.integers(0, 96, 7), rng.integers(0, 96, 9)
    packed = np.concatenate([first, second, [0, 0]])[None].astype(np.int32)
    segments = np.array([[1] * 7 + [2] * 9 + [0, 0]], np.int32)
    mask = (segments > 0).astype(np.int32)
    graphdef, state = nnx.split(model)
    out = jax.jit(lambda s, i, m, g: nnx.merge(graphdef, s)(i, attention_mask=m, segment_ids=g))(
        state, packed, mask, segments)
    np.testing.assert_allclose(out[0, :7], logits_of(model, first[None].astype(np.int32))[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 7:16], logits_of(model, second[None].astype(np.int32))[0], atol=1e-5)


@pytest.mark.parametrize("family", ["llama3_rope", "llama_linear", "qwen2_tied"])
def test_rope_frequencies_match_transformers(hf_checkpoint, family):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    directory = hf_checkpoint(family)
    reference_model = load_hf(directory)
    _, config = load_pretrained(directory)
    expected = reference_model.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(rope_inv_freq(config), expected, rtol=1e-6)
    assert config.rope_scaling is None or config.rope_scaling[0] in ROPE_INIT_FUNCTIONS


@pytest.mark.slow
def test_remat_and_unrolled_layers_give_same_gradients(hf_checkpoint):
    """Every way of running the layer loop (scan or unrolled, with or without remat) is the same math."""
    directory = hf_checkpoint("qwen2_tied")
    ids, mask = _batch()
    reference = load_hf(directory)
    grads = {}
    variants = [("none", True), ("full", True), ("dots", True), ("none", False), ("full", False)]
    for remat, scan_layers in variants:
        model, _ = load_pretrained(ModelOptions(path=str(directory), remat=remat, scan_layers=scan_layers))
        graphdef, state = nnx.split(model)
        if not scan_layers and remat == "none":
            assert np.abs(logits_of(model, ids, mask) - hf_logits(reference, ids, mask))[mask.astype(bool)].max() \
                <= FP32_TOLERANCE

        def loss(state, graphdef=graphdef):
            logits = nnx.merge(graphdef, state)(ids, attention_mask=mask)
            return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask)

        grads[remat, scan_layers] = jax.jit(jax.grad(loss))(state)
    for variant in variants[1:]:
        for a, b in zip(jax.tree.leaves(grads["none", True]), jax.tree.leaves(grads[variant])):
            # recomputation changes float rounding only: compare relative to each tensor's scale
            assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_dense_is_the_einsum_and_its_weight_gradient_copies_no_activations():
    """``dense`` computes the einsum it replaces; compiled on CPU, its gradient moves no data.

    The 3-D einsum form made XLA:CPU copy activations into transposed layouts for the weight
    gradient (docs/benchmarks.md, SFT step); the flattened 2-D matmul needs no copy or transpose.
    """
    from sftrl_jax.models.layers import dense

    kx, kw, ko = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 8, 4, 6))
    w = jax.random.normal(kw, (4, 6, 10))
    np.testing.assert_allclose(dense(x, w, n_in=2), jnp.einsum("bthd,hde->bte", x, w), rtol=1e-5, atol=1e-5)
    h, wq = x.reshape(2, 8, 24), w.reshape(24, 2, 5)
    np.testing.assert_allclose(dense(h, wq), jnp.einsum("bte,ehd->bthd", h, wq), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="contracted axes"):
        dense(h, w)

    def loss(w, x):
        return jnp.sum(jnp.tanh(dense(x, w)) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    x3 = jax.random.normal(ko, (4, 32, 24))
    hlo = grad.lower(wq, x3).compile().as_text()
    if jax.default_backend() == "cpu":
        assert " transpose(" not in hlo and " copy(" not in hlo, hlo
    expected = jax.grad(lambda w, x: jnp.sum(jnp.tanh(jnp.einsum("bte,ehd->bthd", x, w)) ** 2), argnums=(0, 1))(wq, x3)
    for got, want in zip(grad(wq, x3), expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
