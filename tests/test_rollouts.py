"""GRPO's rollout functions without a model (rl/rollouts.py): reward scale, DAPO's dynamic sampling on
accuracy, demonstrations in a group."""

import numpy as np
import pytest

from sftrl_jax.config import load_config
from sftrl_jax.data.batching import EpochSampler
from sftrl_jax.data.prompts import PromptItem
from sftrl_jax.rl import RLConfig, collect_rollouts
from sftrl_jax.rl.demonstrations import Demonstration
from sftrl_jax.sampling import Sample


class FakeSampler:
    """Prompt i's samples: ``lengths[i]`` tokens each; the text says whether it is right."""

    def __init__(self, right, lengths):
        self.right, self.lengths = right, lengths

    def sample(self, prompt_ids, *, seed, n=None):
        samples, texts = [], []
        for i, prompt in enumerate(prompt_ids):
            key = prompt[0]
            for j in range(n):
                length = self.lengths[key][j]
                samples.append(Sample(i, [5] * length, [-0.1] * length, "eos" if length < 16 else "length"))
                texts.append("right" if self.right[key][j] else "wrong")
        return samples, texts


def _items(count):
    return [PromptItem(i, "b", f"p{i}", "t", [i]) for i in range(count)]


def _score(texts, truths, token_ids):
    return np.asarray([float(t == "right") for t in texts])


def _config(*overrides):
    return load_config(RLConfig, overrides=["model.path=/m", "rl.prompts_per_step=2", "sampling.n=4",
                                            "sampling.max_new_tokens=16", *overrides])


def test_rewards_follow_the_reward_scale():
    config = _config("reward.correct=1.0", "reward.wrong=-1.0")
    sampler = FakeSampler({0: [1, 0, 0, 1], 1: [0, 0, 0, 0]}, {0: [3] * 4, 1: [3] * 4})
    out = collect_rollouts(sampler, _items(2), EpochSampler(2, 2, seed=0, shuffle=False), _score, config, 0)
    assert out.correctness == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert out.rewards == [1.0, -1.0, -1.0, 1.0, -1.0, -1.0, -1.0, -1.0]


def test_dynamic_sampling_drops_groups_by_accuracy_not_by_shaped_reward():
    # prompt 1's group is all wrong, but the overlong penalty makes its rewards differ: verl's metric=acc
    # drops it anyway; prompt 0's group has differing accuracy and is kept
    config = _config("rl.dynamic_sampling=true", "rl.overlong_buffer_len=8", "rl.prompts_per_step=1")
    sampler = FakeSampler({0: [1, 0, 0, 1], 1: [0, 0, 0, 0]}, {0: [3] * 4, 1: [3, 10, 14, 16]})
    order = EpochSampler(2, 1, seed=0, shuffle=False)
    items = _items(2)
    out = collect_rollouts(sampler, items, order, _score, config, 0)
    assert out.dropped_groups == 0 and out.correctness == [1.0, 0.0, 0.0, 1.0]
    out = collect_rollouts(sampler, items, order, _score, config, 1)  # prompt 1 first: dropped, then prompt 0
    assert out.dropped_groups == 1 and out.rounds == 2 and out.correctness == [1.0, 0.0, 0.0, 1.0]


def test_a_mixed_policy_group_is_n_minus_1_samples_and_the_demonstration():
    config = _config("rl.method=luffy", "rl.loss_scale_factor=64", "rl.entropy_agg=loss")
    sampler = FakeSampler({0: [0, 0, 0], 1: [1, 0, 1]}, {0: [3] * 3, 1: [4] * 3})
    demos = {0: Demonstration("right", [7, 7, 2], False), 1: Demonstration("right", [8, 2], True)}
    out = collect_rollouts(sampler, _items(2), EpochSampler(2, 2, seed=0, shuffle=False), _score, config, 0,
                           demos)
    assert out.off_policy == [False, False, False, True] * 2
    assert out.responses[3] == [7, 7, 2] and out.responses[7] == [8, 2]
    assert out.truncated[7] and not out.truncated[3]
    assert out.correctness == [0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]


def test_a_mixed_method_needs_a_group_of_two():
    from sftrl_jax.rl.rollouts import check_batch_sizes

    config = _config("rl.method=chord", "rl.expert_source=group", "rl.mini_batches_per_step=1")
    config.sampling.n = 1  # past the config's own check
    with pytest.raises(ValueError, match=r"sampling.n \(1\) must be at least 2"):
        check_batch_sizes(config, 1)
    with pytest.raises(ValueError, match=r"config key 'sampling.n'"):  # a config loaded from a file
        _config("rl.method=chord", "rl.expert_source=group", "sampling.n=1", "rl.mini_batches_per_step=1")


def test_chord_expert_rows_follow_whole_groups_of_samples():
    from sftrl_jax.rl.expert_data import ExpertRow, with_expert_rows

    # 2 prompts x 4 = 8 sequences, expert_data_ratio 0.5: 4 expert rows in place of the second group, so one
    # group of 4 samples (no demonstration in it) is sampled and graded
    config = _config("rl.method=chord", "rl.expert_data=[e.jsonl]")
    sampler = FakeSampler({0: [1, 0, 0, 1], 1: [1, 1, 1, 1]}, {0: [3] * 4, 1: [3] * 4})
    out = collect_rollouts(sampler, _items(2), EpochSampler(2, 1, seed=0, shuffle=False), _score, config, 0)
    assert out.off_policy == [False] * 4 and out.correctness == [1.0, 0.0, 0.0, 1.0]
    experts = [ExpertRow([9, 9], [7, 2], False), ExpertRow([9], [8, 8, 2], True)] * 2
    batch = with_expert_rows(out, experts)
    assert batch.off_policy == [False] * 4 + [True] * 4 and batch.rewards[4:] == [0.0] * 4
    assert batch.responses[4:] == [[7, 2], [8, 8, 2]] * 2 and batch.prompts[5] == [9]
    assert batch.sampler_logprobs[5] == [0.0] * 3 and batch.truncated[4:] == [False, True] * 2
    assert out.responses == batch.responses[:4] and len(out.responses) == 4  # the sampled rollouts are kept apart
