"""The paged engine (continuous batching over a paged KV cache) against the static sampler, the reference:
greedy parity with transformers, the same sampled tokens and log-probs whatever the slots, page size,
batch size and device count, per-request limits, stop reasons, pages given back, bad settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sampling import PROMPTS, hf_greedy, hf_logprobs

from hf_checkpoints import load_hf
from sftrl_jax import paged
from sftrl_jax.config import SamplingOptions
from sftrl_jax.models import load_pretrained
from sftrl_jax.sampling import generate
from sftrl_jax.sharding import make_mesh

# prompts of several page counts (page size 4: 2, 3, 1, 1 and 5 pages; all but one end mid-page)
LONG_PROMPTS = PROMPTS + [[7]] + [[60 + i for i in range(19)]]
LIMITS = [7, 13, 3, 9, 5]


def model_on(hf_checkpoint, devices: int, family: str = "qwen2_untied"):
    mesh = make_mesh({"fsdp": devices}, devices=jax.devices()[:devices])
    return load_pretrained(str(hf_checkpoint(family)), mesh=mesh)[0]


def same_samples(a, b, atol=2e-5):
    assert [s.prompt_index for s in a] == [s.prompt_index for s in b]
    assert [s.tokens for s in a] == [s.tokens for s in b]
    assert [s.stop_reason for s in a] == [s.stop_reason for s in b]
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=atol)


@pytest.mark.slow
def test_paged_greedy_matches_transformers(hf_checkpoint):
    directory = hf_checkpoint("qwen2_tied")
    model = model_on(hf_checkpoint, 8, "qwen2_tied")
    reference = load_hf(directory)
    eos = hf_greedy(reference, PROMPTS, 10, [])[0][4]  # a token the first prompt emits: it must stop there
    stats = {}
    samples = generate(model, PROMPTS, max_new_tokens=10, temperature=0, eos_token_id=eos, engine="paged",
                       max_slots=2, page_size=4, stats=stats)
    expected = hf_greedy(reference, PROMPTS, 10, eos)
    assert samples[0].stop_reason == "eos" and samples[0].tokens[-1] == eos and len(samples[0].tokens) <= 5
    for prompt, sample, theirs in zip(PROMPTS, samples, expected):
        assert sample.tokens == theirs[:len(sample.tokens)]
        assert len(sample.tokens) == 10 or sample.stop_reason == "eos"
        np.testing.assert_allclose(sample.logprobs, hf_logprobs(reference, prompt, sample.tokens), atol=1e-4)
    assert stats["useful_tokens"] == sum(len(s.tokens) for s in samples) and stats["max_pages_in_use"] > 0
    assert 0 < stats["slot_utilisation"] <= 1


@pytest.mark.slow
def test_paged_samples_what_static_samples(hf_checkpoint, tokenizer, monkeypatch):
    """float32: the same tokens (and log-probs within rounding) from both engines whatever the slots, page
    size and pool size; per-request limits and stop ids end sequences; every page is back at the end; the
    sampler of RL, evaluation and the probe reads the engine settings."""
    pools = []
    real = paged.PagePool

    def recording(num_pages):
        pools.append(real(num_pages))
        return pools[-1]

    monkeypatch.setattr(paged, "PagePool", recording)
    model = model_on(hf_checkpoint, 1)
    free = generate(model, LONG_PROMPTS, max_new_tokens=LIMITS, temperature=1.0, eos_token_id=[], n=2, seed=4)
    assert [len(s.tokens) for s in free] == list(np.repeat(LIMITS, 2))
    assert all(s.stop_reason == "length" for s in free) and free[2].tokens != free[3].tokens
    stop = free[2].tokens[3]  # a token sample 0 of prompt 1 draws at index 3
    kwargs = dict(max_new_tokens=LIMITS, temperature=1.0, eos_token_id=[stop, 95], n=2, seed=4)
    static = generate(model, LONG_PROMPTS, batch_size=2, **kwargs)
    assert static[2].stop_reason == "eos" and static[2].tokens[-1] == stop and len(static[2].tokens) <= 4
    for sample, limit in zip(static, np.repeat(LIMITS, 2)):
        assert len(sample.tokens) <= limit
        assert (sample.stop_reason == "length") == (len(sample.tokens) == limit and sample.tokens[-1] not in (stop, 95))
    stats = {}
    # a pool of 11 free pages: the largest sequence takes 7 (the 11-token prompt's 3 pages, its own copy of the
    # last one and 3 more for its 13 tokens), so not every slot can run at once
    same_samples(static, generate(model, LONG_PROMPTS, engine="paged", max_slots=3, page_size=4, num_pages=12,
                                  stats=stats, **kwargs))
    assert len(pools) == 1 and pools[0].in_use == 0 and 0 < pools[0].peak <= 11
    assert stats["max_pages_in_use"] == pools[0].peak
    # the gather path (the default on CPU is the pool path)
    same_samples(static, generate(model, LONG_PROMPTS, engine="paged", max_slots=8, page_size=16,
                                  paged_attention="gather", **kwargs))
    assert pools[1].in_use == 0
    # three slots growing in a pool of seven free pages: sequences are preempted and recomputed, with the same
    # tokens
    short = dict(kwargs, max_new_tokens=[13, 13, 13])
    stats = {}
    same_samples(generate(model, PROMPTS, **short), generate(model, PROMPTS, engine="paged", max_slots=3, page_size=4,
                                                             num_pages=8, stats=stats, **short))
    assert stats["preemptions"] > 0 and pools[2].in_use == 0

    from sftrl_jax.sampling import TextSampler

    options = SamplingOptions(n=2, max_new_tokens=6, temperature=1.0, engine="paged", max_slots=3, page_size=4)
    sampler = TextSampler(model, tokenizer, options)
    samples, texts = sampler.sample(PROMPTS, seed=3)
    same_samples(generate(model, PROMPTS, max_new_tokens=6, temperature=1.0, n=2, seed=3,
                          eos_token_id=sampler.stop_ids), samples)
    assert len(texts) == 6 and sampler.stats["useful_tokens"] == sum(len(s.tokens) for s in samples)
    assert sampler.stats["max_pages_in_use"] > 0


@pytest.mark.slow
def test_samples_identical_across_batch_sizes_and_devices(hf_checkpoint):
    """float32: the static engine's samples do not depend on the batch size, and neither engine's on the
    device count (the reference: one device, batch size 1)."""
    kwargs = dict(max_new_tokens=LIMITS, temperature=1.0, eos_token_id=[], n=2, seed=5)
    reference = generate(model_on(hf_checkpoint, 1), LONG_PROMPTS, batch_size=1, **kwargs)
    for devices in (2, 8):
        model = model_on(hf_checkpoint, devices)
        same_samples(reference, generate(model, LONG_PROMPTS, batch_size=4, **kwargs))
        same_samples(reference, generate(model, LONG_PROMPTS, engine="paged", max_slots=5, page_size=8, **kwargs))


def test_bad_engine_settings_name_the_setting(hf_checkpoint):
    model = model_on(hf_checkpoint, 1)
    run = lambda **kw: generate(model, [[1, 2, 3]], max_new_tokens=40, engine="paged", **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"^sampling.page_size must be a power of two.*got 24$"):
        run(page_size=24)
    with pytest.raises(ValueError, match=r"^sampling.max_slots must be >= 1, got 0$"):
        run(max_slots=0)
    with pytest.raises(ValueError, match=r"^sampling.num_pages \(3\) cannot hold one sequence"):
        run(page_size=16, num_pages=3)
    with pytest.raises(ValueError, match=r"^sampling.engine: expected one of static \| paged, got 'fast'$"):
        generate(model, [[1, 2, 3]], max_new_tokens=4, engine="fast")


def _random_pools(seed: int, kv_heads: int = 2, pages: int = 48, page_size: int = 4, dim: int = 16):
    keys = jax.random.split(jax.random.key(seed), 2)
    return tuple(jax.random.normal(k, (kv_heads, pages, page_size, dim)).astype(jnp.bfloat16) for k in keys)


@pytest.mark.slow
@pytest.mark.parametrize("kernel,devices", [("pallas_tpu", 1), ("pallas_tpu", 8), ("pallas_gpu", 1),
                                            ("pallas_gpu", 8)])
def test_kernel_attention_matches_the_gather_path(hf_checkpoint, kernel, devices):
    """JAX's Pallas TPU and GPU paged-attention kernels (interpret mode here) against the portable gather path on
    the same pages: each slot's first ``lengths`` tokens through its page-table row, GQA (4 query heads over 2
    kv heads), keys and values bfloat16 (the TPU kernel's compute dtype), on one device and with slots and
    pages split over 8 data-parallel shards."""
    model = model_on(hf_checkpoint, devices)
    slots, bound = 8, 4
    pool_k, pool_v = _random_pools(0)
    shard_pages = pool_k.shape[1] // devices
    # each slot's pages from its own shard's block (ids local to the shard), in a scrambled order
    table = np.stack([np.random.default_rng(s).permutation(np.arange(1, shard_pages))[:bound] % shard_pages
                      for s in range(slots)]).astype(np.int32)
    lengths = np.array([1, 3, 4, 5, 8, 13, 16, 9], np.int32)
    q = jax.random.normal(jax.random.key(1), (slots, 1, 4, 16), jnp.float32)
    if devices > 1:
        pool_k, pool_v = (jax.device_put(p, paged.pool_sharding(model, slots, p.shape)) for p in (pool_k, pool_v))
    out = jax.jit(lambda q, k, v, n, t: paged.kernel_attention(model, n, t, kernel)(q, k, v))(q, pool_k, pool_v,
                                                                                                  lengths, table)
    # the GPU kernel computes in the pools' dtype: bfloat16 queries and probabilities
    np.testing.assert_allclose(np.asarray(out), _gathered_attention(q, pool_k, pool_v, table, lengths, devices),
                               atol=2e-6 if kernel == "pallas_tpu" else 2e-2)


def test_megacore_mode_splits_the_kv_heads_or_else_the_slots():
    assert paged.tpu_megacore_mode(1, slots=8, kv_heads=2) is None  # v5e, v6e: one TensorCore
    assert paged.tpu_megacore_mode(2, slots=8, kv_heads=2) == "kv_head"  # v4, v5p: equal halves of the heads
    assert paged.tpu_megacore_mode(2, slots=8, kv_heads=1) == "batch"
    assert paged.tpu_megacore_mode(2, slots=7, kv_heads=1) is None
    assert paged.tensor_cores(type("M", (), {"mesh": make_mesh({"fsdp": 8})})()) == 1  # CPU devices


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads,devices,mode", [(2, 1, "kv_head"), (1, 1, "batch"), (1, 8, "batch")])
def test_tpu_kernel_on_two_tensor_cores_matches_the_gather_path(hf_checkpoint, monkeypatch, kv_heads, devices,
                                                                  mode):
    """The TPU kernel split over a megacore chip's two TensorCores (v4, v5p; interpret mode here) gives the gather
    path's attention: split over the kv heads (2), or over the slots where a device holds one kv head (16 slots
    on 1 device, 2 per shard on 8)."""
    model = model_on(hf_checkpoint, devices)
    monkeypatch.setattr(paged, "tensor_cores", lambda _: 2)
    chosen = []
    choose = paged.tpu_megacore_mode
    monkeypatch.setattr(paged, "tpu_megacore_mode", lambda *a: chosen.append(choose(*a)) or chosen[-1])
    slots, bound = 16, 4
    pool_k, pool_v = _random_pools(2, kv_heads=kv_heads)
    shard_pages = pool_k.shape[1] // devices
    table = np.stack([np.random.default_rng(s).permutation(np.arange(1, shard_pages))[:bound] % shard_pages
                      for s in range(slots)]).astype(np.int32)
    lengths = np.random.default_rng(3).integers(1, bound * 4 + 1, slots).astype(np.int32)
    q = jax.random.normal(jax.random.key(4), (slots, 1, 4, 16), jnp.float32)
    if devices > 1:
        pool_k, pool_v = (jax.device_put(p, paged.pool_sharding(model, slots, p.shape)) for p in (pool_k, pool_v))
    out = jax.jit(lambda q, k, v, n, t: paged.kernel_attention(model, n, t, "pallas_tpu")(q, k, v))(
        q, pool_k, pool_v, lengths, table)
    assert chosen == [mode]
    np.testing.assert_allclose(np.asarray(out), _gathered_attention(q, pool_k, pool_v, table, lengths, devices),
                               atol=2e-6)


def _gathered_attention(q, pool_k, pool_v, table, lengths, devices):
    """The reference: each slot's pages gathered from its shard's block of the pools (the gather path's keys and
    values), then dense attention masked to the slot's length."""
    from sftrl_jax.models.attention import attention

    slots, bound = table.shape
    kv, pages, page_size, dim = pool_k.shape
    per_shard, shard_pages = slots // devices, pages // devices
    expected = []
    for s in range(slots):
        block = slice((s // per_shard) * shard_pages, (s // per_shard + 1) * shard_pages)
        k, v = (np.asarray(p[:, block].astype(jnp.float32))[:, table[s]].reshape(kv, bound * page_size, dim)
                for p in (pool_k, pool_v))
        valid = (np.arange(bound * page_size) < lengths[s]).astype(np.int32)[None]
        expected.append(attention(q[s:s + 1], jnp.asarray(k)[None], jnp.asarray(v)[None],
                                  q_segment_ids=np.ones((1, 1), np.int32), kv_segment_ids=valid,
                                  q_offset=bound * page_size - 1))
    return np.concatenate(expected)


@pytest.mark.parametrize("devices", [1, 8])
def test_pool_attention_matches_the_gather_path(hf_checkpoint, devices):
    """The CPU path (one pass over the whole pool, a softmax assembled per slot from its pages) against the
    gather path on the same pages: pairs of samples of one prompt share its first two pages (ranks 0 and 1)
    and then read two pages each of their own, lengths ending inside shared and own pages, an idle slot on
    the scratch page, a page with no reader, GQA (4 query heads over 2 kv heads), bfloat16 keys and values
    computed in float32; on one device and with slots and pages split over 8 data-parallel shards."""
    model = model_on(hf_checkpoint, devices)
    slots, bound = (8 if devices == 1 else 2 * devices), 4
    pool_k, pool_v = _random_pools(2, pages=96)
    shard_pages, per_shard = pool_k.shape[1] // devices, slots // devices
    table = np.zeros((slots, bound), np.int32)
    for shard in range(devices):
        free = np.random.default_rng(shard).permutation(np.arange(1, shard_pages))
        for pair in range(per_shard // 2):
            shared, (a, b) = free[:2], (free[2:4], free[4:6])
            free = free[6:]
            first = shard * per_shard + 2 * pair
            table[first], table[first + 1] = np.concatenate([shared, a]), np.concatenate([shared, b])
    ranks = np.arange(slots, dtype=np.int32) % 2
    lengths = np.resize(np.array([1, 3, 7, 8, 9, 16, 13, 5], np.int32), slots)
    idle = slots - 1 if devices == 1 else slots - 2  # no pair partner reads its scratch page
    table[idle], lengths[idle], ranks[idle] = 0, 1, 0
    q = jax.random.normal(jax.random.key(3), (slots, 1, 4, 16), jnp.float32)
    if devices > 1:
        pool_k, pool_v = (jax.device_put(p, paged.pool_sharding(model, slots, p.shape)) for p in (pool_k, pool_v))
    for readers in (2, 3):  # as many readers per page as samples per prompt, or more
        attend = jax.jit(lambda q, k, v, n, t, r: paged.pool_attention(model, n, t, r, readers)(q, k, v))  # noqa: B023
        out = attend(q, pool_k, pool_v, lengths, table, ranks)
        np.testing.assert_allclose(np.asarray(out), _gathered_attention(q, pool_k, pool_v, table, lengths, devices),
                                   atol=2e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["pallas_tpu", "pallas_gpu"])
def test_paged_engine_samples_the_same_with_a_kernel(hf_checkpoint, kernel):
    """The engine with a Pallas kernel (interpret mode) and with the gather path on a bfloat16 model, slots and
    pages over two data-parallel shards: the same tokens and stop reasons, and log-probs within float32
    rounding (TPU kernel: both attend over the same bfloat16 keys and values in float32) or bfloat16
    rounding (GPU kernel: bfloat16 queries and probabilities)."""
    from sftrl_jax.models.options import ModelOptions

    kwargs = dict(max_new_tokens=[6, 9, 4], temperature=1.0, eos_token_id=[], n=2, seed=6, engine="paged",
                  max_slots=4, page_size=4)
    mesh = make_mesh({"fsdp": 2}, devices=jax.devices()[:2])
    model = load_pretrained(ModelOptions(path=str(hf_checkpoint("qwen2_untied")), dtype="bfloat16"), mesh=mesh)[0]
    gather = generate(model, PROMPTS, paged_attention="gather", **kwargs)
    same_samples(gather, generate(model, PROMPTS, paged_attention=kernel, **kwargs),
                 atol=1e-4 if kernel == "pallas_tpu" else 5e-2)


def test_paged_attention_setting_is_checked():
    assert paged.resolve_paged_attention("auto", "tpu", 128) == "pallas_tpu"
    assert paged.resolve_paged_attention("auto", "tpu", 64) == "gather"  # the TPU lowering needs 128-lane blocks
    assert paged.resolve_paged_attention("auto", "gpu", 128) == "pallas_gpu"
    assert paged.resolve_paged_attention("auto", "cpu", 128) == "pool"
    assert paged.resolve_paged_attention("pallas_gpu", "cpu", 24) == "pallas_gpu"  # interpreted
    with pytest.raises(ValueError, match=r"^sampling.paged_attention: pallas_tpu runs on TPU .* not on GPU"):
        paged.resolve_paged_attention("pallas_tpu", "gpu", 128)
    with pytest.raises(ValueError, match=r"^sampling.paged_attention: pallas_tpu needs a head_dim that is a "
                                         r"multiple of 128, the model's is 64"):
        paged.resolve_paged_attention("pallas_tpu", "tpu", 64)
    with pytest.raises(ValueError, match=r"^sampling.paged_attention: expected auto \| pool \| gather \| pallas_tpu"):
        paged.resolve_paged_attention("flash", "cpu", 64)
