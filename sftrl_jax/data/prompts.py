"""Prompt + ground-truth rows for evaluation and RL (verl/LUFFY parquet or plain JSONL).

verl/LUFFY rows: ``data_source`` (the benchmark), ``prompt`` (chat messages),
``reward_model.ground_truth``. Plain rows: ``prompt`` (string or messages) and ``answer``. Prompts
go through :func:`sftrl_jax.data.sft.build_prompt_text`, so SFT, RL and evaluation see identical
prompts.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from pathlib import Path

from .sft import build_prompt_text
from .sources import UnreadableRow, load_rows

log = logging.getLogger("sftrl_jax.data")


@dataclasses.dataclass
class PromptDataOptions:
    files: list[str] = dataclasses.field(default_factory=list)  # files, globs or HF dataset ids
    split: str = "test"
    prompt_field: str = "prompt"
    answer_field: str | None = None  # None: reward_model.ground_truth, else "answer"
    benchmark_field: str = "data_source"  # rows without it are named after their file
    remove_system_prompt: bool = False
    prompt_suffix: str = ""  # appended to the templated prompt, e.g. "<think>\n" (think template)
    max_prompt_length: int = 1024  # longer prompts are skipped (and counted)
    limit_per_benchmark: int | None = None  # first k rows of each benchmark (quick runs)

    _ranges = {"max_prompt_length": ">= 1", "limit_per_benchmark": ">= 1"}


@dataclasses.dataclass
class PromptItem:
    prompt_id: int
    benchmark: str
    prompt_text: str
    ground_truth: str
    prompt_ids: list[int] = dataclasses.field(default_factory=list)


def _ground_truth(row: dict, field: str | None):
    if field is not None:
        return row.get(field)
    reward_model = row.get("reward_model")
    if isinstance(reward_model, dict) and "ground_truth" in reward_model:
        return reward_model["ground_truth"]
    return row.get("answer")


def load_prompt_items(options: PromptDataOptions, tokenizer) -> tuple[list[PromptItem], dict[str, int]]:
    """Prompts with ground truths (prompt text and ids, benchmark) for evaluation and RL, and skip counts."""
    if not options.files:
        raise ValueError("data.files: no prompt data given")
    items: list[PromptItem] = []
    skipped = {"bad_rows": 0, "prompt_too_long": 0}
    per_benchmark: dict[str, int] = defaultdict(int)
    for source, index, row in load_rows(options.files, split=options.split):
        if isinstance(row, UnreadableRow):  # a line of a JSON(L) file that could not be parsed
            skipped["bad_rows"] += 1
            log.warning("%s row %d: %s (skipped)", source, index, row.problem)
            continue
        benchmark = str(row.get(options.benchmark_field) or Path(source).stem)
        if options.limit_per_benchmark is not None and per_benchmark[benchmark] >= options.limit_per_benchmark:
            continue
        truth = _ground_truth(row, options.answer_field)
        try:
            if truth is None or (isinstance(truth, str) and not truth.strip()):
                raise ValueError("no ground truth (reward_model.ground_truth or answer)")
            prompt = build_prompt_text(row.get(options.prompt_field), tokenizer,
                                       remove_system_prompt=options.remove_system_prompt)
        except Exception as err:  # a malformed row is skipped with its location
            skipped["bad_rows"] += 1
            log.warning("%s row %d: %s (skipped)", source, index, err)
            continue
        prompt += options.prompt_suffix
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) > options.max_prompt_length:
            skipped["prompt_too_long"] += 1
            continue
        per_benchmark[benchmark] += 1
        items.append(PromptItem(len(items), benchmark, prompt, str(truth), ids))
    if skipped["prompt_too_long"]:
        log.warning("%d prompts longer than data.max_prompt_length=%d tokens were skipped",
                    skipped["prompt_too_long"], options.max_prompt_length)
    return items, skipped
