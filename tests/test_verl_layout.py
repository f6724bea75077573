"""verl's arrangement of a step (``rl.verl_ranks``) and LUFFY's entropy bonus (``rl.entropy_agg:
micro_batch_token_mean``).

The expected partitions are derived by hand from verl's ``utils/seqlen_balancing.py`` as LUFFY's fork ships it
(``luffy/verl/verl/utils/seqlen_balancing.py``: ``karmarkar_karp``, ``get_seqlen_balanced_partitions``,
``rearrange_micro_batches``), the balancing from ``RayPPOTrainer._balance_batch`` (``equal_size=True`` over the
world size, rank ``r`` taking part ``r``), the mini-batches from ``mix_actor.update_policy``
(``batch.split(ppo_mini_batch_size)`` per rank) and the entropy from the same function
(``masked_mean(entropy, response_mask)`` per micro-batch, ``policy_loss = pg_loss - entropy_loss * coeff``,
gradients summed over micro-batches with ``gradient_accumulation`` 1, averaged over ranks by FSDP).
"""

import numpy as np
import pytest
from rl_helpers import update_loss

from sftrl_jax.config import ConfigError
from sftrl_jax.rl.config import RLSection
from sftrl_jax.rl.step import update_batch_keys
from sftrl_jax.rl.verl_layout import balanced_partitions, verl_step_layout


def test_equal_size_partition_by_hand():
    # sorted (length, index): (1,0) (2,1) (3,2) (4,3) (5,4) (6,5); partials of k=2 consecutive items, each
    # spread 1: {1:2 | 0:1}, {3:4 | 2:3}, {5:6 | 4:5}. Ties on spread pop the larger first part first:
    # {5:6|4:5} joins {3:4|2:3} crosswise -> {5,2 | 4,3} (sums 9, 9: the first by its items, (5,6) > (4,5)),
    # spread 0; then {1:2|0:1} (spread 1) pops before it and joins it crosswise: {1,4,3} = 11, {0,5,2} = 10
    assert balanced_partitions([1, 2, 3, 4, 5, 6], 2, equal_size=True) == [[1, 3, 4], [0, 2, 5]]


def test_free_size_partition_by_hand():
    # sorted: (1,1) (1,2) (1,3) (4,4) (7,0), each its own partial {x | -}. Largest spreads first: 7 + 4 ->
    # {7 | 4} (spread 3); with a spread-1 partial, the largest first part wins the tie: index 3 -> {7 | 4,3};
    # then index 2 -> {7 | 4,3,2} (spread 1); that pops before index 1's (first part 7 > 1): {7 | 4,3,2,1},
    # sums equal, the part with more items first
    assert balanced_partitions([7, 1, 1, 1, 4], 2, equal_size=False) == [[1, 2, 3, 4], [0]]


def test_partitions_cover_every_sequence_once_and_balance():
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 9000, size=64)
    parts = balanced_partitions(lengths, 8, equal_size=True)
    assert sorted(i for part in parts for i in part) == list(range(64))
    assert all(len(part) == 8 for part in parts)
    sums = [lengths[part].sum() for part in parts]
    assert max(sums) - min(sums) < lengths.max()


def test_step_layout_by_hand():
    # 4 sequences over 2 ranks, 1 mini-batch. Balancing (equal parts of 2): {8,3 | 6,5} crosswise from
    # {5:2|3:0} and {8:1|6:3} (the latter pops first: larger first part); sums 11 and 11, the first part by its
    # items ((3,6) > (1,8)): ranks get [2, 3] and [0, 1]
    seq_tokens, response_tokens = [3, 8, 5, 6], [1, 5, 2, 3]
    order, weight = verl_step_layout(seq_tokens, response_tokens, ranks=2, mini_batches=1, max_token_len=32)
    assert order.tolist() == [2, 3, 0, 1]
    # 11 tokens per rank fit one micro-batch: rank 0's holds 2 + 3 response tokens, rank 1's 1 + 5
    np.testing.assert_allclose(weight, [1 / (2 * 6), 1 / (2 * 6), 1 / (2 * 5), 1 / (2 * 5)])
    # at most 10 tokens: ceil(11 / 10) = 2 micro-batches on every rank, one sequence each
    _, weight = verl_step_layout(seq_tokens, response_tokens, ranks=2, mini_batches=1, max_token_len=10)
    np.testing.assert_allclose(weight, [1 / (2 * 1), 1 / (2 * 5), 1 / (2 * 2), 1 / (2 * 3)])


def test_mini_batches_take_each_ranks_share_in_order():
    # 8 equal sequences over 2 ranks: the balanced parts, in index order per rank; mini-batch j is the j-th
    # half of every rank's part
    order, _ = verl_step_layout([10] * 8, [4] * 8, ranks=2, mini_batches=2, max_token_len=100)
    parts = balanced_partitions([10] * 8, 2, equal_size=True)
    assert order.tolist() == parts[0][:2] + parts[1][:2] + parts[0][2:] + parts[1][2:]
    with pytest.raises(ValueError, match="do not split over rl.verl_ranks"):
        verl_step_layout([10] * 6, [4] * 6, ranks=2, mini_batches=2, max_token_len=100)


def test_micro_batch_entropy_is_luffys_sum_of_token_means_over_ranks():
    rng = np.random.default_rng(1)
    rows, length = 6, 5
    mask = (np.arange(length)[None] < rng.integers(1, length + 1, size=(rows, 1))).astype(np.float32)
    entropy = rng.uniform(0.1, 3.0, size=(rows, length)).astype(np.float32)
    logp = np.log(rng.uniform(0.05, 0.95, size=(rows, length))).astype(np.float32)
    # micro-batches (2 ranks): rank 0 {0, 1} and {2}; rank 1 {3, 4, 5}
    micro = [[0, 1], [2], [3, 4, 5]]
    weight = np.zeros(rows, np.float32)
    for members in micro:
        weight[members] = 1 / (2 * mask[members].sum())
    coef = 0.01
    loss, _ = update_loss("grpo", logp, logp, np.zeros(rows, np.float32), mask, entropy=entropy,
                          batch_extra={"entropy_weight": weight}, entropy_coef=coef,
                          entropy_agg="micro_batch_token_mean", verl_ranks=2)
    token_means = [(entropy[m] * mask[m]).sum() / mask[m].sum() for m in micro]
    expected = -coef * (token_means[0] + token_means[1] + token_means[2]) / 2  # summed per rank, mean over ranks
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # the policy loss's aggregation (token-mean) gives another value on the same batch
    pooled, _ = update_loss("grpo", logp, logp, np.zeros(rows, np.float32), mask, entropy=entropy, entropy_coef=coef)
    assert float(pooled) == pytest.approx(-coef * (entropy * mask).sum() / mask.sum(), rel=1e-6)
    assert abs(float(pooled) - expected) > 1e-4


def test_luffy_defaults_to_micro_batch_entropy_and_needs_the_ranks():
    with pytest.raises(ConfigError, match=r"rl\.verl_ranks.*LUFFY's runs: 8"):
        RLSection(method="luffy", loss_scale_factor=65536)
    cfg = RLSection(method="luffy", loss_scale_factor=65536, verl_ranks=8)
    assert cfg.entropy_agg == "micro_batch_token_mean"
    assert update_batch_keys(cfg)["entropy_weight"] == ("float32", "row")
    # the policy loss's aggregation needs no ranks; GRPO's default is that one
    assert "entropy_weight" not in update_batch_keys(RLSection(method="luffy", loss_scale_factor=65536,
                                                                entropy_agg="loss"))
    assert RLSection(method="grpo").entropy_agg == "loss"
