"""The modelled generation time of the two sampling engines (``sftrl_jax.aot.rollout``) on cases worked by hand."""

import numpy as np
import pytest

from sftrl_jax.aot.rollout import lognormal_lengths, modelled_rollout, paged_engine, static_engine


def test_lengths_are_capped_with_a_mean_of_a_third_of_the_cap():
    lengths = lognormal_lengths(4096, 300, np.random.default_rng(0))
    assert lengths.min() >= 1 and lengths.max() == 300
    assert lengths.mean() == pytest.approx(100, rel=0.02)


def test_static_engine_waits_for_each_batch_s_longest_response():
    # batches [3, 5] and [2, 2]: 4 and 1 decode steps (prefill draws each first token), every step reading
    # both rows' whole caches (10 positions each)
    assert static_engine(np.array([3, 5, 2, 2]), rows=2, cache_positions=10) == ([4, 1], [20.0, 20.0])


def test_paged_engine_refills_slots_and_reads_live_pages():
    lengths = np.array([3, 5, 2, 2])  # 2, 4, 1 and 1 decode steps
    # two slots: [2-step, 4-step] run; the first slot then takes the two 1-step sequences in turn, so the
    # four steps are full. Live tokens per step with no prompt: 1+1, 2+2, 1+3, 1+4 = 15
    assert paged_engine(lengths, slots=2, prompt=0, page_size=1, max_pages=8, chunk=1, kernel=True) == (4, 15.0)
    # whole pages of 2 tokens: 2+2, 2+2, 2+4, 2+4
    assert paged_engine(lengths, slots=2, prompt=0, page_size=2, max_pages=8, chunk=1, kernel=True) == (4, 20.0)
    # the gather path reads every slot's pages up to the engine's bucket covering the longest: 1, 2, 3, 4 pages
    assert paged_engine(lengths, slots=2, prompt=0, page_size=1, max_pages=8, chunk=1, kernel=False) == (4, 20.0)


def test_time_is_the_bytes_read_over_the_bandwidth():
    common = dict(sequences=64, cap=32, prompt=8, rows=16, slots=16, shards=1, page_size=4, chunk=4,
                  step_flops_per_row=0.0, hbm_bandwidth=1.0, peak_flops=1.0)
    weights_only = modelled_rollout(**common, attention="pallas_tpu", weight_bytes=1.0, kv_bytes_per_position=0.0)
    # with nothing but the weights to read, a step costs one second and the gain is the steps saved
    assert weights_only["static"]["seconds"] == weights_only["static"]["decode_steps"]
    assert weights_only["speedup"] == pytest.approx(weights_only["static"]["decode_steps"]
                                                    / weights_only["paged"]["decode_steps"])
    assert weights_only["paged"]["decode_steps"] < weights_only["static"]["decode_steps"]
    kv_only = modelled_rollout(**common, attention="pallas_tpu", weight_bytes=0.0, kv_bytes_per_position=1.0)
    lengths = lognormal_lengths(64, 32, np.random.default_rng(2))
    steps, _ = static_engine(lengths, 16, 40)
    assert kv_only["static"]["seconds"] == pytest.approx(sum(s * 16 * 40 for s in steps))
