"""Demonstrations for the mixed-policy methods (LUFFY, CHORD): the data's own solution of each prompt.

A demonstration is the row's ``target`` (LUFFY's parquet layout: ``[{"role": "assistant",
"content": ...}]``) or ``response`` (our SFT formats), read as SFT reads it
(:func:`sftrl_jax.data.sft.demonstration_text`) and tokenised as a response: the text, then the EOS
id. When the templated prompt already ends with ``<think>\n`` (a template that opens the reasoning
block, as LUFFY's model's does), a demonstration's own leading ``<think>\n`` is dropped, as LUFFY's
dataset does, so the policy is not trained on a second one. One longer than the response budget is
cut to it and marked truncated. Demonstrations are matched to the RL prompts by their templated prompt
text, so the same rows feed both.
"""

from __future__ import annotations

import dataclasses
import logging

from ..data.prompts import PromptDataOptions, templated_prompt
from ..data.sft import demonstration_text
from ..data.sources import UnreadableRow, load_rows

log = logging.getLogger("sftrl_jax.rl")


@dataclasses.dataclass
class Demonstration:
    text: str  # what the grader reads (the response, without EOS)
    token_ids: list[int]  # the response's tokens and the EOS id, cut to the budget
    truncated: bool


THINK_OPEN = "<think>\n"


def without_repeated_think(prompt: str, demonstration: str) -> str:
    """``demonstration`` without its leading ``<think>\n`` when ``prompt`` already ends with one."""
    if prompt.endswith(THINK_OPEN) and demonstration.startswith(THINK_OPEN):
        return demonstration[len(THINK_OPEN):]
    return demonstration


def load_demonstrations(items, options: PromptDataOptions, tokenizer, *, eos_id: int, max_new_tokens: int,
                        response_field: str | None = None) -> dict[int, Demonstration]:
    """``prompt_id -> Demonstration`` for every item; raises naming the files when a prompt has none."""
    by_prompt: dict[str, str] = {}
    for _source, _index, row in load_rows(options.files, split=options.split):
        if isinstance(row, UnreadableRow):
            continue
        try:
            prompt = templated_prompt(row.get(options.prompt_field), tokenizer, options)
            by_prompt.setdefault(prompt, demonstration_text(row, response_field))
        except ValueError:
            continue  # the prompt loader reports bad rows; a row without a demonstration is counted below
    missing = [item for item in items if item.prompt_text not in by_prompt]
    if missing:
        raise ValueError(f"data.files ({', '.join(map(str, options.files))}): {len(missing)} of {len(items)} prompts "
                         f"have no demonstration (a 'target' or 'response' field, or rl.demonstration_field), e.g. "
                         f"prompt {missing[0].prompt_id}; rl.method luffy/chord needs one per prompt")
    texts = [without_repeated_think(item.prompt_text, by_prompt[item.prompt_text]) for item in items]
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    out, cut = {}, 0
    for item, text, ids in zip(items, texts, encoded):
        ids = [*ids, eos_id]
        truncated = len(ids) > max_new_tokens
        cut += truncated
        if truncated:  # the grader reads what the policy is trained on
            text = tokenizer.decode(ids[:max_new_tokens], skip_special_tokens=False)
        out[item.prompt_id] = Demonstration(text, ids[:max_new_tokens], truncated)
    if cut:
        log.warning("%d of %d demonstrations are longer than sampling.max_new_tokens=%d and were cut (marked "
                    "truncated)", cut, len(items), max_new_tokens)
    return out
