"""Expert rows for CHORD as Trinity-RFT runs it (``rl.expert_source: expert_data``): rows of a separate SFT data
set, ``rl.expert_data``, mixed into every step's batch outside the GRPO groups.

A row is read as a prompt's demonstration is (:mod:`sftrl_jax.rl.demonstrations`), which is how SFT reads it:
the prompt through the chat template exactly as the run's own prompts are (``data.prompt_field``,
``data.remove_system_prompt``, ``data.prompt_suffix``), the response the row's ``target`` (LUFFY's parquet
layout) or ``response`` (our SFT jsonl; ``rl.demonstration_field`` names another) followed by the EOS id, the
loss on the response tokens only. A row whose prompt is longer than ``data.max_prompt_length`` is skipped (as
an RL prompt is); a response longer than ``sampling.max_new_tokens`` is cut to it and marked truncated, so
expert rows fit the shapes the update is compiled for.

Each step takes the next :func:`~sftrl_jax.rl.rollouts.expert_rows_per_step` rows of an
:class:`~sftrl_jax.data.batching.EpochSampler` (a seeded permutation per epoch, or file order with
``data.shuffle: false``). Its position is saved with every checkpoint, so a resumed run continues with the rows
the uninterrupted run would have taken. The rows follow the step's groups with reward 0, sampler log-probs 0
and ``response_off_policy`` 1; they are neither generated nor graded.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from ..data.batching import EpochSampler
from ..data.prompts import PromptDataOptions, templated_prompt
from ..data.sft import demonstration_text
from ..data.sources import UnreadableRow, load_rows
from .demonstrations import without_repeated_think
from .rollouts import Rollouts, expert_rows_per_step

log = logging.getLogger("sftrl_jax.rl")


@dataclasses.dataclass
class ExpertRow:
    prompt_ids: list[int]  # the templated prompt's tokens
    token_ids: list[int]  # the response's tokens and the EOS id, cut to the response budget
    truncated: bool


def load_expert_rows(files, options: PromptDataOptions, tokenizer, *, eos_id: int, max_new_tokens: int,
                     response_field: str | None = None) -> tuple[list[ExpertRow], dict[str, int]]:
    """The usable rows of ``files`` (read with ``options.split``) and how many were left out (``bad_rows``,
    ``prompt_too_long``) or cut (``truncated``)."""
    prompts, responses, bad = [], [], 0
    for source, index, row in load_rows(files, split=options.split):
        try:
            if isinstance(row, UnreadableRow):
                raise ValueError(row.problem)
            response = demonstration_text(row, response_field)
            prompt = templated_prompt(row.get(options.prompt_field), tokenizer, options)
        except Exception as err:  # a malformed row is skipped with its location, as the prompt loader does
            bad += 1
            log.warning("rl.expert_data: %s row %d: %s (skipped)", source, index, err)
            continue
        prompts.append(prompt)
        responses.append(without_repeated_think(prompt, response))
    rows, counts = [], {"bad_rows": bad, "prompt_too_long": 0, "truncated": 0}
    if prompts:
        prompt_ids = tokenizer(prompts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        response_ids = tokenizer(responses, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        for prompt, ids in zip(prompt_ids, response_ids):
            if len(prompt) > options.max_prompt_length:
                counts["prompt_too_long"] += 1
                continue
            ids = [*ids, eos_id]
            truncated = len(ids) > max_new_tokens
            counts["truncated"] += truncated
            rows.append(ExpertRow(list(prompt), ids[:max_new_tokens], truncated))
    if counts["prompt_too_long"] or counts["truncated"]:
        log.warning("rl.expert_data: %d rows with a prompt longer than data.max_prompt_length=%d skipped, %d "
                    "responses longer than sampling.max_new_tokens=%d cut (marked truncated)",
                    counts["prompt_too_long"], options.max_prompt_length, counts["truncated"], max_new_tokens)
    return rows, counts


class ExpertData:
    """A run's expert rows and their order: :meth:`next` gives one step's."""

    def __init__(self, config, tokenizer, *, eos_id: int):
        cfg = config.rl
        self.per_step = expert_rows_per_step(config)
        self.rows, counts = load_expert_rows(cfg.expert_data, config.data, tokenizer, eos_id=eos_id,
                                             max_new_tokens=config.sampling.max_new_tokens,
                                             response_field=cfg.demonstration_field)
        if len(self.rows) < self.per_step:
            raise ValueError(
                f"rl.expert_data ({', '.join(map(str, cfg.expert_data))}): {len(self.rows)} usable rows "
                f"({counts['bad_rows']} bad rows, {counts['prompt_too_long']} with a prompt longer than "
                f"data.max_prompt_length), fewer than the {self.per_step} expert rows each step takes "
                f"(rl.expert_data_ratio x rl.prompts_per_step x sampling.n, rounded up)")
        # seeded apart from the prompts' order (train.seed), so that when rl.expert_data is data.files a step's
        # expert rows are not its own prompts' demonstrations
        self.sampler = EpochSampler(len(self.rows), self.per_step, seed=config.train.seed + 1,
                                    shuffle=config.data.shuffle)

    @property
    def longest_prompt(self) -> int:
        return max(len(row.prompt_ids) for row in self.rows)

    def next(self) -> list[ExpertRow]:
        return [self.rows[i] for i in self.sampler.next()]


def with_expert_rows(rollouts: Rollouts, rows: list[ExpertRow]) -> Rollouts:
    """A step's batch: the sampled ``rollouts``, then ``rows`` (reward and correctness 0, sampler log-probs 0,
    off-policy)."""
    sampled = len(rollouts.responses)
    return dataclasses.replace(
        rollouts, prompts=rollouts.prompts + [row.prompt_ids for row in rows],
        responses=rollouts.responses + [row.token_ids for row in rows],
        sampler_logprobs=rollouts.sampler_logprobs + [[0.0] * len(row.token_ids) for row in rows],
        truncated=rollouts.truncated + [row.truncated for row in rows],
        correctness=rollouts.correctness + [0.0] * len(rows), rewards=rollouts.rewards + [0.0] * len(rows),
        off_policy=(rollouts.off_policy or [False] * sampled) + [True] * len(rows))


def mini_batch_order(sampled: int, experts: int, mini_batches: int) -> np.ndarray:
    """An order of a step's rows (``sampled`` rows, then ``experts`` expert rows) in which each of
    ``mini_batches`` consecutive mini-batches holds an equal share of both (both counts divide)."""
    s, e = sampled // mini_batches, experts // mini_batches
    return np.concatenate([np.r_[j * s:(j + 1) * s, sampled + j * e:sampled + (j + 1) * e]
                           for j in range(mini_batches)])
