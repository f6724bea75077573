"""Every attention implementation computes what ``dense`` computes (values and gradients), and
``blockwise`` does so without materialising ``T x T`` scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sftrl_jax.models import ModelConfig, ModelOptions, abstract_model, init_model, resolve_attention
from sftrl_jax.models.attention import _cudnn_applies, attention
from sftrl_jax.sharding import make_mesh

B, T, H, KV, D = 3, 37, 4, 2, 16  # GQA; 37 is not a multiple of any block used below
TOLERANCE = {jnp.float32: dict(values=2e-5, grads=1e-4), jnp.bfloat16: dict(values=2e-2, grads=5e-2)}


def _segments(length=T):
    """Row 0 packed (3 segments, trailing padding), row 1 left-padded, row 2 right-padded."""
    seg = np.ones((B, length), np.int32)
    seg[0, 10:21], seg[0, 21:length - 4], seg[0, length - 4:] = 2, 3, 0
    seg[1, :7] = 0
    seg[2, length - 9:] = 0
    return jnp.asarray(seg)


def _qkv(dtype, seed=0, batch=B, q_len=T, kv_len=T, heads=H, kv_heads=KV):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, q_len, heads, D))
    k, v = rng.normal(size=(2, batch, kv_heads, kv_len, D))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _value_and_grads(q, k, v, **kwargs):
    def loss(q, k, v):
        out = attention(q, k, v, **kwargs)
        return jnp.sum(jnp.sin(out.astype(jnp.float32))), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _assert_same(got, want, dtype):
    tol = TOLERANCE[dtype]
    (out, grads), (ref_out, ref_grads) = got, want
    assert out.dtype == ref_out.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), atol=tol["values"])
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == r.dtype, name
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), atol=tol["grads"],
                                   err_msg=f"d{name}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("block_size", [8, 16, 512])
def test_blockwise_matches_dense(dtype, block_size):
    q, k, v = _qkv(dtype)
    seg = _segments()
    kw = dict(q_segment_ids=seg, kv_segment_ids=seg)
    _assert_same(_value_and_grads(q, k, v, implementation="blockwise", block_size=block_size, **kw),
                 _value_and_grads(q, k, v, implementation="dense", **kw), dtype)


@pytest.mark.slow
def test_blockwise_with_a_query_offset_matches_dense():
    """The KV-cache form: 6 queries at slots 20..25 against 37 keys, offset traced."""
    q, k, v = _qkv(jnp.float32, q_len=6)
    kv_seg = _segments()
    q_seg = kv_seg[:, 20:26]

    def run(implementation, offset):
        return _value_and_grads(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, q_offset=offset,
                                implementation=implementation, block_size=4)

    _assert_same(run("blockwise", jnp.int32(20)), run("dense", 20), jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_splash_interpreted_matches_dense(dtype):
    q, k, v = _qkv(dtype)
    seg = _segments()
    kw = dict(q_segment_ids=seg, kv_segment_ids=seg)
    _assert_same(_value_and_grads(q, k, v, implementation="splash", block_size=128, **kw),
                 _value_and_grads(q, k, v, implementation="dense", **kw), dtype)


def test_splash_rejects_what_it_cannot_serve():
    q, k, v = _qkv(jnp.float32, q_len=6)
    seg = _segments()
    with pytest.raises(ValueError, match="self-attention"):
        attention(q, k, v, q_segment_ids=seg[:, :6], kv_segment_ids=seg, q_offset=20, implementation="splash")
    q, k, v = _qkv(jnp.float32)
    with pytest.raises(ValueError, match="multiple of 128"):
        attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, implementation="splash", block_size=64)


@pytest.mark.slow
def test_cudnn_falls_back_to_blockwise_where_it_does_not_apply():
    q, k, v = _qkv(jnp.float32)
    seg = _segments()
    kw = dict(q_segment_ids=seg, kv_segment_ids=seg)
    # float32, padded/packed rows: blockwise computes it
    _assert_same(_value_and_grads(q, k, v, implementation="cudnn", platform="gpu", block_size=16, **kw),
                 _value_and_grads(q, k, v, implementation="dense", **kw), jnp.float32)
    bf16 = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
    assert _cudnn_applies(*bf16, 0, unpadded=True)
    assert not _cudnn_applies(*bf16, 0, unpadded=False)  # padding/packing: segment ids needed
    assert not _cudnn_applies(q, k, v, 0, unpadded=True)  # float32
    assert not _cudnn_applies(*bf16, jnp.int32(0), unpadded=True)  # traced offset (KV cache)


def test_cudnn_path_plumbing(monkeypatch):
    """cuDNN cannot run here (JAX checks for it while tracing): run the cudnn path (bf16, unpadded
    rows, platform gpu) with ``jax.nn.dot_product_attention`` computing by XLA instead, to check
    the layouts and flags we hand it; then try a real trace, skipped without cuDNN."""
    q, k, v = _qkv(jnp.bfloat16, q_len=32, kv_len=32)
    ones = jnp.ones((B, 32), jnp.int32)
    kw = dict(q_segment_ids=ones, kv_segment_ids=ones)
    real = jax.nn.dot_product_attention
    calls = []

    def xla_instead(*args, implementation=None, **kwargs):
        calls.append((implementation, kwargs.get("is_causal")))
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", xla_instead)
    got = _value_and_grads(q, k, v, implementation="cudnn", platform="gpu", unpadded=True, **kw)
    assert calls and calls[0] == ("cudnn", True)
    _assert_same(got, _value_and_grads(q, k, v, implementation="dense", **kw), jnp.bfloat16)
    monkeypatch.setattr(jax.nn, "dot_product_attention", real)
    try:
        jax.eval_shape(lambda q, k, v: attention(q, k, v, implementation="cudnn", platform="gpu", unpadded=True,
                                                 **kw), q, k, v)
    except RuntimeError as error:
        if "cudnn" not in str(error).lower():
            raise
        pytest.skip(f"cuDNN not installed: {error}")


def test_blockwise_sharded_on_a_mesh_matches_dense():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    batch = 4
    q, k, v = _qkv(jnp.float32, batch=batch)
    seg = jnp.concatenate([_segments(), _segments()[:1]])
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    q = put(q, PartitionSpec(("data", "fsdp"), None, "tensor", None))
    k, v = (put(x, PartitionSpec(("data", "fsdp"), "tensor", None, None)) for x in (k, v))
    seg = put(seg, PartitionSpec(("data", "fsdp"), None))
    kw = dict(q_segment_ids=seg, kv_segment_ids=seg)
    got = _value_and_grads(q, k, v, implementation="blockwise", block_size=16, mesh=mesh, **kw)
    assert got[0].sharding.spec == PartitionSpec(("data", "fsdp"), None, "tensor", None)
    _assert_same(got, _value_and_grads(q, k, v, implementation="dense", **kw), jnp.float32)


def _temp_bytes(implementation, length=2048, block=128):
    q = jax.ShapeDtypeStruct((1, length, 2, 32), jnp.float32)
    k = jax.ShapeDtypeStruct((1, 1, length, 32), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, length), jnp.int32)

    def loss(q, k, v, seg):
        out = attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, implementation=implementation,
                        block_size=block)
        return jnp.sum(out)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, k, seg).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_does_not_materialise_the_scores():
    length = 2048
    dense, blockwise = _temp_bytes("dense", length), _temp_bytes("blockwise", length)
    one_score_matrix = length * length * 4
    assert dense >= one_score_matrix  # dense holds [heads, T, T] float32 scores (and more)
    assert blockwise < one_score_matrix / 8, (blockwise, dense)


def test_resolve_attention():
    assert resolve_attention("auto", "tpu") == "splash"
    assert resolve_attention("auto", "gpu") == "cudnn"
    assert resolve_attention("auto", "cpu") == "dense"
    assert resolve_attention("blockwise", "tpu") == "blockwise"
    with pytest.raises(ValueError, match="unknown attention"):
        resolve_attention("flash", "cpu")


# ------------------------------------------------------------------------------------------ decoder
CONFIG = ModelConfig(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True)


def _decoder_batch():
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, 64, (2, 21)), jnp.int32)
    packed = np.ones((2, 21), np.int32)
    packed[0, 8:15], packed[0, 15:19], packed[0, 19:] = 2, 3, 0
    packed[1, :6] = 0  # left padding
    return ids, jnp.asarray(packed != 0, jnp.int32), jnp.asarray(packed)


def _logits_and_grads(model, ids, mask, segments):
    graphdef, params = nnx.split(model)

    @jax.jit
    def run(params):
        def loss(params):
            logits = nnx.merge(graphdef, params)(ids, attention_mask=mask, segment_ids=segments)
            logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
            picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
            return -jnp.sum(picked * mask[:, 1:]), logits

        return jax.value_and_grad(loss, has_aux=True)(params)

    (_, logits), grads = run(params)
    return logits, grads


@pytest.fixture(scope="module")
def dense_decoder_results():
    ids, mask, segments = _decoder_batch()
    reference = init_model(CONFIG, ModelOptions(path="", attention="dense"), seed=3)
    return {packed: _logits_and_grads(reference, ids, mask, segments if packed else None) for packed in (True, False)}


@pytest.mark.slow
@pytest.mark.parametrize("implementation,block,cases", [("blockwise", 16, (True, False)), ("splash", 128, (True,))])
def test_decoder_matches_dense(implementation, block, cases, dense_decoder_results):
    """Logits and the loss gradient of a tiny model, on packed + left-padded rows and left-padded rows."""
    ids, mask, segments = _decoder_batch()
    model = init_model(CONFIG, ModelOptions(path="", attention=implementation, attention_block_size=block), seed=3)
    assert model.attention == implementation
    for packed in cases:
        want_logits, want_grads = dense_decoder_results[packed]
        got_logits, got_grads = _logits_and_grads(model, ids, mask, segments if packed else None)
        np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-4)
        for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_decoder_resolves_auto_from_its_mesh():
    assert abstract_model(CONFIG).attention == "dense"  # auto on a CPU mesh
    blockwise = ModelOptions(path="", attention="blockwise", attention_block_size=64)
    assert abstract_model(CONFIG, blockwise).attention_block_size == 64
    with pytest.raises(ValueError, match="unknown attention"):
        abstract_model(CONFIG, ModelOptions(path="", attention="flash"))
