"""Prompt + ground-truth rows for evaluation and RL (verl/LUFFY parquet, plain JSONL, MMLU-Pro).

verl/LUFFY rows: ``data_source`` (the benchmark), ``prompt`` (chat messages),
``reward_model.ground_truth``. Plain rows: ``prompt`` (string or messages) and ``answer``.
Multiple-choice rows in MMLU-Pro's published format (``question``, ``options`` (up to ten strings),
``answer`` (a letter A-J), ``answer_index``, ``category``, ``src``) and no prompt become one user
message: the question and the options listed as "A. ...", "B. ...", after the instruction to end with
"ANSWER: $LETTER" (the wording of the LUFFY GPQA prompts); their ground truth is the letter, graded
as multiple choice, and their benchmark is ``mmlu_pro`` unless the row names one. Prompts go through
:func:`sftrl_jax.data.sft.build_prompt_text`, so SFT, RL and evaluation see identical prompts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

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
    # drop the rows' system messages and a default system block the chat template injects in their place
    remove_system_prompt: bool = False
    # with remove_system_prompt: drop only the rows' system messages and render the rest with the chat
    # template as it is, keeping a default it injects (a script that drops the first message, then calls
    # apply_chat_template, e.g. Qwen2.5-Math's "Please reason step by step, ..." default)
    keep_template_system_prompt: bool = False
    prompt_suffix: str = ""  # appended to the templated prompt, e.g. "<think>\n" (think template)
    # longer prompts are skipped and counted (RL, probe); evaluation keeps them and scores them 0
    max_prompt_length: int = 1024
    limit_per_benchmark: int | None = None  # first k rows of each benchmark (quick runs)

    _ranges = {"max_prompt_length": ">= 1", "limit_per_benchmark": ">= 1"}


@dataclasses.dataclass
class PromptItem:
    prompt_id: int
    benchmark: str
    prompt_text: str
    ground_truth: str | tuple[str, ...]  # a tuple holds alternatives: matching any one is correct
    prompt_ids: list[int] = dataclasses.field(default_factory=list)
    # longer than max_prompt_length, kept only by ``load_prompt_items(..., keep_too_long=True)``: not generated
    prompt_too_long: bool = False


CHOICE_LETTERS = "ABCDEFGHIJ"
MULTIPLE_CHOICE_INSTRUCTION = (
    "Answer the following multiple choice question. The last line of your response should be of the following "
    "format: 'ANSWER: $LETTER' (without quotes) where LETTER is one of {letters}. Think step by step before "
    "answering.")
_NOT_AN_OPTION = "N/A"  # MMLU-Pro's filler for questions with fewer than ten options (dropped, as its own eval does)


def is_multiple_choice_row(row: dict, prompt_field: str = "prompt") -> bool:
    """A row in MMLU-Pro's published format: ``question`` and a list of ``options``, and no prompt."""
    return (row.get(prompt_field) is None and isinstance(row.get("question"), str)
            and isinstance(row.get("options"), (list, tuple, np.ndarray)))


def multiple_choice_prompt(question: str, options: Sequence[str]) -> str:
    """The user message of a multiple-choice question: the instruction, the question, then the options
    listed as "A. ...", "B. ..." (at most ten, A-J)."""
    if not 2 <= len(options) <= len(CHOICE_LETTERS):
        raise ValueError(f"a multiple-choice question needs 2 to {len(CHOICE_LETTERS)} options, got {len(options)}")
    letters = CHOICE_LETTERS[:len(options)]
    listed = "\n".join(f"{letter}. {option}" for letter, option in zip(letters, options))
    return f"{MULTIPLE_CHOICE_INSTRUCTION.format(letters=letters)}\n\n{question.strip()}\n\n{listed}"


def multiple_choice_row(row: dict) -> tuple[str, str]:
    """``(user message, answer letter)`` of an MMLU-Pro-format row. "N/A" options are dropped and the
    letter follows the answer's place among the options kept; ``answer_index`` (0-based) is the
    answer where present, else ``answer`` (a letter), and the two must agree."""
    question, options = row["question"], [str(o) for o in row["options"]]
    if not question.strip():
        raise ValueError("field 'question' is empty")
    letter, index = row.get("answer"), row.get("answer_index")
    if isinstance(index, float) and math.isnan(index):  # a missing value in a parquet column
        index = None
    if index is not None:
        index = int(index)
        if not 0 <= index < len(options):
            raise ValueError(f"answer_index {index} is not one of the {len(options)} options")
        if isinstance(letter, str) and letter.strip() and letter.strip().upper() != CHOICE_LETTERS[index]:
            raise ValueError(f"answer {letter!r} and answer_index {index} disagree")
    elif isinstance(letter, str) and letter.strip().upper() in CHOICE_LETTERS[:len(options)]:
        index = CHOICE_LETTERS.index(letter.strip().upper())
    else:
        raise ValueError(f"no answer letter (A-{CHOICE_LETTERS[len(options) - 1]}) or answer_index, got {letter!r}")
    if options[index] == _NOT_AN_OPTION:
        raise ValueError(f"the answer (option {CHOICE_LETTERS[index]}) is {_NOT_AN_OPTION!r}")
    kept = [k for k, option in enumerate(options) if option != _NOT_AN_OPTION]
    return multiple_choice_prompt(question, [options[k] for k in kept]), CHOICE_LETTERS[kept.index(index)]


def _ground_truth(row: dict, field: str | None):
    if field is not None:
        return row.get(field)
    reward_model = row.get("reward_model")
    if isinstance(reward_model, dict) and "ground_truth" in reward_model:
        return reward_model["ground_truth"]
    return row.get("answer")


def _truth_text(value) -> str:
    """One ground truth as text: a string as it is, a number in its usual form (``5``, ``2.5``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"ground truth {value!r:.60} ({type(value).__name__}) is not a string or a number")
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise ValueError(f"ground truth {value!r} is not a finite number")
        return repr(float(value))
    return str(int(value))


def ground_truth_value(truth) -> str | tuple[str, ...]:
    """A row's ground truth as the graders take it: a string, or a tuple of alternative strings (a response
    that matches any of them is correct) from a list, tuple or array of strings and numbers. Numbers become
    their string form; a dict, a bool, None, a nested or empty list is refused (a ``ValueError``: a bad row)."""
    if isinstance(truth, (list, tuple, np.ndarray)):
        values = list(truth.tolist() if isinstance(truth, np.ndarray) else truth)
        if not values:
            raise ValueError("ground truth is an empty list")
        alternatives = tuple(_truth_text(value) for value in values)
        if any(not text.strip() for text in alternatives):
            raise ValueError(f"ground truth {values!r:.60} holds an empty alternative")
        return alternatives[0] if len(alternatives) == 1 else alternatives
    return _truth_text(truth)


def templated_prompt(message, tokenizer, options: PromptDataOptions) -> str:
    """A row's prompt (chat messages or text) as the model sees it: through the chat template with
    ``options``' system-prompt handling, then ``options.prompt_suffix``; RL prompts, their demonstrations and
    CHORD's expert rows all read prompts with this."""
    if options.remove_system_prompt and options.keep_template_system_prompt:
        if isinstance(message, (list, tuple, np.ndarray)):
            message = [m for m in message if not (isinstance(m, dict) and m.get("role") == "system")]
        return build_prompt_text(message, tokenizer) + options.prompt_suffix
    return build_prompt_text(message, tokenizer, remove_system_prompt=options.remove_system_prompt) + \
        options.prompt_suffix


def load_prompt_items(options: PromptDataOptions, tokenizer, *, keep_too_long: bool = False
                      ) -> tuple[list[PromptItem], dict[str, int]]:
    """Prompts with ground truths (prompt text and ids, benchmark) for evaluation and RL, and skip counts.

    A prompt longer than ``options.max_prompt_length`` tokens is skipped and counted in
    ``skipped["prompt_too_long"]`` (RL, the probe); with ``keep_too_long`` (evaluation) it is kept as an
    item marked ``prompt_too_long``, so that it can be scored 0 and stay in its benchmark's denominator.
    """
    if not options.files:
        raise ValueError("data.files: no prompt data given")
    items: list[PromptItem] = []
    skipped = {"bad_rows": 0, "prompt_too_long": 0}
    kept_too_long = 0
    per_benchmark: dict[str, int] = defaultdict(int)
    for source, index, row in load_rows(options.files, split=options.split):
        if isinstance(row, UnreadableRow):  # a line of a JSON(L) file that could not be parsed
            skipped["bad_rows"] += 1
            log.warning("%s row %d: %s (skipped)", source, index, row.problem)
            continue
        choice = is_multiple_choice_row(row, options.prompt_field)
        benchmark = str(row.get(options.benchmark_field) or ("mmlu_pro" if choice else Path(source).stem))
        if options.limit_per_benchmark is not None and per_benchmark[benchmark] >= options.limit_per_benchmark:
            continue
        try:
            if choice:
                message, truth = multiple_choice_row(row)
                if options.answer_field is not None:
                    truth = row.get(options.answer_field)
            else:
                message, truth = row.get(options.prompt_field), _ground_truth(row, options.answer_field)
            if truth is None or (isinstance(truth, str) and not truth.strip()):
                raise ValueError("no ground truth (reward_model.ground_truth or answer)")
            truth = ground_truth_value(truth)
            prompt = templated_prompt(message, tokenizer, options)
        except Exception as err:  # a malformed row is skipped with its location
            skipped["bad_rows"] += 1
            log.warning("%s row %d: %s (skipped)", source, index, err)
            continue
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        too_long = len(ids) > options.max_prompt_length
        if too_long and not keep_too_long:
            skipped["prompt_too_long"] += 1
            continue
        kept_too_long += too_long
        per_benchmark[benchmark] += 1
        items.append(PromptItem(len(items), benchmark, prompt, truth, ids, prompt_too_long=too_long))
    if skipped["prompt_too_long"]:
        log.warning("%d prompts longer than data.max_prompt_length=%d tokens were skipped",
                    skipped["prompt_too_long"], options.max_prompt_length)
    if kept_too_long:
        log.warning("%d prompts longer than data.max_prompt_length=%d tokens are not generated and score 0",
                    kept_too_long, options.max_prompt_length)
    return items, skipped
