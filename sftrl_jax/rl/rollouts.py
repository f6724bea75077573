"""GRPO's rollouts as plain functions: sample groups, grade them, lay them out as arrays.

:func:`collect_rollouts` samples ``sampling.n`` responses for each of ``rl.prompts_per_step``
prompts from the current policy (with DAPO's dynamic sampling, groups whose rewards are all equal
are dropped and more prompts are sampled), grades them, and adds the overlong penalty;
:func:`rollout_arrays` turns them into the fixed-shape arrays the jitted step takes.

With several processes every process runs the same code: sampling is one SPMD program, each process
grades a contiguous share of the responses and the rewards are gathered, so all processes hold
identical rollouts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np

from ..data.batching import bucket_length
from ..distributed import map_rows_across_processes
from ..rewards.scoring import RewardFn  # a run's comes from sftrl_jax.rewards.open_reward
from .algorithms import overlong_penalty
from .methods import get_method

log = logging.getLogger("sftrl_jax.rl")


class DynamicSamplingError(RuntimeError):
    """Dynamic sampling could not fill a step's batch with non-degenerate groups within the cap."""


@dataclasses.dataclass
class Rollouts:
    prompts: list[list[int]] = dataclasses.field(default_factory=list)  # one per sequence (repeated in a group)
    responses: list[list[int]] = dataclasses.field(default_factory=list)
    sampler_logprobs: list[list[float]] = dataclasses.field(default_factory=list)
    truncated: list[bool] = dataclasses.field(default_factory=list)
    correctness: list[float] = dataclasses.field(default_factory=list)
    rewards: list[float] = dataclasses.field(default_factory=list)
    off_policy: list[bool] = dataclasses.field(default_factory=list)  # a demonstration (LUFFY, CHORD)
    rounds: int = 0
    dropped_groups: int = 0
    score_seconds: float = 0.0


def expert_rows_per_step(config) -> int:
    """Rows of ``rl.expert_data`` in each step's batch: ``ceil(rl.expert_data_ratio x rl.prompts_per_step x
    sampling.n)`` for a method that trains expert rows by a term of its own (CHORD) with
    ``rl.expert_source=expert_data``, else 0. Trinity-RFT's arithmetic: ``prompts_per_step x n`` is its
    training batch (``batch_size x repeat_times``), ``ceil(ratio x`` that ``)`` of it expert rows."""
    cfg = config.rl
    if get_method(cfg.method).demonstrations != "separate" or cfg.expert_source != "expert_data":
        return 0
    return math.ceil((cfg.expert_data_ratio or 0.0) * (cfg.prompts_per_step * config.sampling.n))


def groups_per_step(config) -> int:
    """Prompt groups each step samples: ``rl.prompts_per_step``, less the groups whose place expert rows take."""
    return config.rl.prompts_per_step - expert_rows_per_step(config) // config.sampling.n


def demonstrations_in_groups(cfg) -> bool:
    """Whether each group is ``sampling.n - 1`` samples and the prompt's demonstration (LUFFY; CHORD with
    ``rl.expert_source=group``)."""
    demonstrations = get_method(cfg.method).demonstrations
    return demonstrations == "policy" or (demonstrations == "separate" and cfg.expert_source != "expert_data")


def check_batch_sizes(config, shards: int) -> int:
    """Micro-steps per mini-batch of an RL config; raises naming the keys when the sizes do not divide."""
    cfg = config.rl
    if demonstrations_in_groups(cfg) and config.sampling.n < 2:
        raise ValueError(f"rl.method={cfg.method}: sampling.n ({config.sampling.n}) must be at least 2 (a group is "
                         "n - 1 samples and the demonstration)")
    sequences = cfg.prompts_per_step * config.sampling.n
    if sequences % cfg.mini_batches_per_step:
        raise ValueError(f"rl.prompts_per_step x sampling.n ({sequences}) must be a multiple of "
                         f"rl.mini_batches_per_step ({cfg.mini_batches_per_step})")
    experts = expert_rows_per_step(config)
    if experts:
        sampled = sequences - experts
        what = (f"rl.expert_data_ratio ({cfg.expert_data_ratio}) of rl.prompts_per_step x sampling.n ({sequences}) "
                f"is {experts} expert rows (rounded up), leaving {sampled} sampled rows")
        if sampled < config.sampling.n or sampled % config.sampling.n:
            raise ValueError(f"{what}: not whole groups of sampling.n ({config.sampling.n})")
        if experts % cfg.mini_batches_per_step or sampled % cfg.mini_batches_per_step:
            raise ValueError(f"{what}: each must be a multiple of rl.mini_batches_per_step "
                             f"({cfg.mini_batches_per_step}), so that every mini-batch gets its share of both")
    mini = sequences // cfg.mini_batches_per_step
    if mini % (config.train.micro_batch_size * shards):
        raise ValueError(f"a mini-batch of {mini} sequences must be a multiple of train.micro_batch_size "
                         f"({config.train.micro_batch_size}) x data-parallel shards ({shards})")
    return mini // (config.train.micro_batch_size * shards)


def collect_rollouts(sampler, items, prompt_sampler, score: RewardFn, config, step: int,
                     demonstrations: dict | None = None) -> Rollouts:
    """One step's rollouts: :func:`groups_per_step` groups (``rl.prompts_per_step`` without expert rows) of
    ``sampling.n`` graded responses.

    ``sampler``: a :class:`sftrl_jax.sampling.TextSampler` of the current policy; ``items``: the
    prompts; ``prompt_sampler``: an :class:`~sftrl_jax.data.batching.EpochSampler` over them.
    With ``demonstrations`` (``prompt_id -> Demonstration``, the mixed-policy methods) each group is
    ``sampling.n - 1`` samples and the prompt's demonstration, graded like the samples.
    Rewards are ``reward.scale(correctness)`` plus the overlong penalty; dynamic sampling drops a
    group whose correctness is all equal (verl's ``metric=acc``).
    """
    cfg, group = config.rl, config.sampling.n
    wanted = groups_per_step(config)
    out = Rollouts()
    groups = 0
    while groups < wanted:
        if out.rounds >= cfg.max_generation_rounds:
            raise DynamicSamplingError(
                f"dynamic sampling: only {groups} of {wanted} prompt groups had rewards that "
                f"differ after {cfg.max_generation_rounds} generation rounds (rl.max_generation_rounds) at "
                f"step {step}; the prompts are too easy or too hard for this model")
        out.rounds += 1
        chunk = [items[i] for i in prompt_sampler.next()]
        members = _group_members(sampler, chunk, demonstrations, group,
                                 seed=config.rollout_seed * 1_000_003 + step * 1009 + out.rounds)
        tick = time.perf_counter()
        # each process grades its share of the rollouts; all get the same full vector
        correctness = map_rows_across_processes(score, [m[1] for m in members],
                                                [chunk[m[0]].ground_truth for m in members],
                                                [m[2] for m in members])
        out.score_seconds += time.perf_counter() - tick
        rewards = config.reward.scale(correctness) + np.asarray(overlong_penalty(
            [len(m[2]) for m in members], config.sampling.max_new_tokens, cfg.overlong_buffer_len,
            cfg.overlong_penalty_factor))
        for g in range(len(chunk)):
            rows = range(g * group, (g + 1) * group)
            if cfg.dynamic_sampling and np.ptp(correctness[list(rows)]) == 0:
                out.dropped_groups += 1
                continue
            if groups == wanted:
                break
            groups += 1
            for r in rows:
                _, _, tokens, logprobs, truncated, off_policy = members[r]
                out.prompts.append(chunk[g].prompt_ids)
                out.responses.append(tokens)
                out.sampler_logprobs.append(logprobs)
                out.truncated.append(truncated)
                out.off_policy.append(off_policy)
                out.correctness.append(float(correctness[r]))
                out.rewards.append(float(rewards[r]))
    return out


def _group_members(sampler, chunk, demonstrations, group: int, *, seed: int) -> list[tuple]:
    """``(prompt index in chunk, text, tokens, sampler log-probs, truncated, off-policy)`` per group member,
    group-major: ``group`` samples per prompt, or ``group - 1`` samples and the demonstration."""
    on_policy = group - 1 if demonstrations is not None else group
    samples, texts = sampler.sample([it.prompt_ids for it in chunk], seed=seed, n=on_policy)
    members = []
    for g, item in enumerate(chunk):
        for sample, text in zip(samples[g * on_policy:(g + 1) * on_policy], texts[g * on_policy:(g + 1) * on_policy]):
            members.append((g, text, sample.tokens, sample.logprobs, sample.stop_reason == "length", False))
        if demonstrations is not None:
            demo = demonstrations[item.prompt_id]
            members.append((g, demo.text, demo.token_ids, [0.0] * len(demo.token_ids), demo.truncated, True))
    return members


def padded_lengths(longest_prompt: int, longest_response: int, max_new_tokens: int) -> tuple[int, int]:
    """(prompt, response) lengths a batch pads to: each bucketed (powers of two from 16), the response's capped
    at ``max_new_tokens``."""
    return (bucket_length(longest_prompt, maximum=1 << 30, minimum=16),
            bucket_length(max(longest_response, 1), maximum=max_new_tokens, minimum=16))


def rollout_arrays(rollouts: Rollouts, *, max_new_tokens: int, mask_truncated: bool, pad_id: int) -> dict:
    """``[S, P+R]`` sequences (left-padded prompt, right-padded response) and ``[S, R]`` response arrays."""
    count = len(rollouts.responses)
    prompt_len, response_len = padded_lengths(max(map(len, rollouts.prompts)), max(map(len, rollouts.responses)),
                                              max_new_tokens)
    ids = np.full((count, prompt_len + response_len), pad_id, np.int32)
    attention = np.zeros_like(ids)
    response_ids = np.full((count, response_len), pad_id, np.int32)
    response_mask = np.zeros((count, response_len), np.float32)
    sampler_logp = np.zeros((count, response_len), np.float32)
    off_policy = np.zeros((count, response_len), np.float32)
    for row, (prompt, response) in enumerate(zip(rollouts.prompts, rollouts.responses)):
        ids[row, prompt_len - len(prompt):prompt_len] = prompt
        attention[row, prompt_len - len(prompt):prompt_len + len(response)] = 1
        ids[row, prompt_len:prompt_len + len(response)] = response
        response_ids[row, :len(response)] = response
        if not (mask_truncated and rollouts.truncated[row]):
            response_mask[row, :len(response)] = 1.0
        sampler_logp[row, :len(response)] = rollouts.sampler_logprobs[row]
        if rollouts.off_policy and rollouts.off_policy[row]:
            off_policy[row, :len(response)] = 1.0
    positions = np.maximum(np.cumsum(attention, axis=1) - 1, 0).astype(np.int32)
    return {"input_ids": ids, "attention_mask": attention, "positions": positions, "response_ids": response_ids,
            "response_mask": response_mask, "response_off_policy": off_policy, "sampler_logp": sampler_logp}
