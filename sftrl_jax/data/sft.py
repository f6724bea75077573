"""SFT rows -> token ids and a loss mask.

The loss mask is built from the token boundary, never recovered by searching the text: the prompt
(chat template with the generation prompt) and the response are tokenised separately, so the mask is
False on exactly the prompt tokens and True on every response token including the final EOS. (A
public verl bug masked the EOS and supervised the last prompt token, and models never learned to
stop.)

How the response ends is ``SFTDataOptions.response_end``. ``"openrlhf"`` (the default) is the SFT of
OpenRLHF v0.7.5 with ``apply_chat_template`` (``openrlhf/datasets/sft_dataset.py``), which LUFFY's SFT
baselines ran: the response is what the chat template renders after the prompt when the conversation
includes it, so the template's end of turn (Qwen's ``<|im_end|>``, Llama-3's ``<|eot_id|>``) is
supervised; trailing newlines are cut; ``" " + EOS`` is appended unless the text already ends with the
EOS; and the last token kept is always the EOS, also when the response was cut to ``max_length``.
``"eos"`` supervises the response text and then the EOS id only.

With ``text_field`` set (TRL's language-modelling datasets, ``dataset_text_field``) a row is plain text
for next-token training, as in pretraining: no chat template, every token after the first is a target,
and the EOS id ends it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
from collections.abc import Iterable, Sequence
from typing import Any, Literal, NamedTuple

import jinja2
import numpy as np

from .sources import UnreadableRow

logger = logging.getLogger("sftrl_jax.data")

# Rows are tokenised in batches of this many (the fast tokenizer parallelises a batch).
_BATCH_ROWS = 256
# Bad rows logged one by one before the rest are only counted.
_MAX_ROW_WARNINGS = 20
# Probe texts used to find a chat template's injected default system block.
_PROBE_SYSTEM = "sftrljaxprobesystem"
_PROBE_USER = "sftrljaxprobeuser"
_THINK_MARKERS = ("<think>\n", "<think>")


@dataclasses.dataclass
class SFTDataOptions:
    """How rows become SFT examples (defaults match the LUFFY/OpenR1 SFT parquet files)."""

    prompt_field: str = "prompt"  # chat messages (list of {role, content}) or a plain string
    # None = "target" if the row has one (a list with one assistant message), else "response" (a string).
    response_field: str | None = None
    max_length: int = 2048  # prompt + response tokens, EOS included
    overlong: Literal["truncate", "drop"] = "truncate"  # "truncate" (cut the response from the end) | "drop"
    on_bad_row: Literal["skip", "error"] = "skip"  # "skip" (warn, count) | "error" (raise ValueError)
    remove_system_prompt: bool = False  # drop system messages and a template-injected default one
    # "keep": supervise a response's leading <think>. "prompt": condition on it instead -- it moves to the
    # prompt, or is dropped when the chat template already ends the prompt with it (LUFFY's SFT data).
    think_prefix: Literal["keep", "prompt"] = "keep"
    # How the supervised response ends. "openrlhf" (OpenRLHF v0.7.5's SFT with apply_chat_template): what the
    # chat template renders after the prompt for the conversation with the response (its end-of-turn marker,
    # e.g. "<|im_end|>", included), trailing newlines cut, then " " + EOS unless that text already ends with
    # the EOS; the last token kept is always the EOS (a truncated response ends with it too), and a prompt of
    # max_length - 2 or more tokens is dropped. A template that writes the response's leading "<think>\n" at
    # the generation prompt has written it already: it is not supervised under either think_prefix. A
    # conversation that does not render as the prompt followed by the response is an error naming the row.
    # "eos": the response text, then the EOS id (a truncated response loses it).
    response_end: Literal["openrlhf", "eos"] = "openrlhf"
    eos_token: str | None = None  # the EOS of response_end; None = tokenizer.eos_token
    # Plain-text language modelling (pretraining): the row's field of this name, as is (no chat template), every
    # token a target, then the EOS id. The prompt/response fields, think_prefix and response_end are unused.
    text_field: str | None = None

    def __post_init__(self):
        for name, allowed in (("overlong", ("truncate", "drop")), ("on_bad_row", ("skip", "error")),
                              ("think_prefix", ("keep", "prompt")), ("response_end", ("openrlhf", "eos"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"SFTDataOptions.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.max_length < 2:
            raise ValueError(f"SFTDataOptions.max_length must be >= 2 (one prompt and one response token), "
                             f"got {self.max_length}")


class SFTExample(NamedTuple):
    # int32 [n]: prompt tokens then response tokens, ending in EOS (a truncated one only with response_end openrlhf)
    input_ids: np.ndarray
    loss_mask: np.ndarray  # bool [n]: True exactly on the response tokens (EOS included)


@dataclasses.dataclass
class SFTDataStats:
    rows: int = 0  # rows read, bad ones included
    examples: int = 0  # examples returned
    bad_rows: int = 0  # skipped: unparseable lines, missing/malformed fields, empty response
    truncated: int = 0  # kept with the response cut to max_length
    # over max_length and dropped, or a prompt too long to leave room for a response (>= max_length tokens;
    # >= max_length - 2 with response_end openrlhf, as OpenRLHF filters them)
    dropped_too_long: int = 0

    def summary(self) -> str:
        return (f"{self.rows} rows -> {self.examples} examples ({self.bad_rows} bad rows skipped, "
                f"{self.truncated} truncated, {self.dropped_too_long} dropped as too long)")


class _BadRow(ValueError):
    """A problem with one row's content (reported with its source and index by the caller)."""


class _Unseparable(ValueError):
    """The chat template renders the conversation with the response as something other than the prompt
    followed by the response: no mask can be right, so this is an error whatever ``on_bad_row`` says."""


def build_prompt_text(messages_or_str: str | Sequence[dict], tokenizer, *, remove_system_prompt: bool = False) -> str:
    """The prompt text a model is conditioned on: the chat template with the generation prompt.

    A plain string becomes one user message. With ``remove_system_prompt`` the system messages are
    dropped and, if the template then injects its own default system block (Qwen2.5 does), that
    block is stripped as well, so the prompt really carries no system prompt. Shared by SFT,
    evaluation and RL so that all three see identical prompts.
    """
    return _render(_prompt_messages(messages_or_str, "prompt"), tokenizer, remove_system_prompt)


def tokenize_sft(rows: Iterable[tuple[str, int, dict]], tokenizer,
                 options: SFTDataOptions) -> tuple[list[SFTExample], SFTDataStats]:
    """Tokenise ``(source_name, row_index, row)`` rows (see ``load_rows``) into SFT examples.

    Prompt and response are tokenised separately (no special tokens added) and concatenated; the
    response ends as ``options.response_end`` says (module docstring); the mask starts exactly at the
    first response token. A row whose conversation the chat template does not render as the prompt
    followed by the response (``response_end: openrlhf``) raises a ValueError naming the row.
    """
    eos_token, eos_id = _eos(tokenizer, options.eos_token)
    stats = SFTDataStats()
    examples: list[SFTExample] = []
    pending: list[tuple[str, int, str, str]] = []  # (source, index, prompt text, response text)
    for source, index, row in rows:
        stats.rows += 1
        try:
            if isinstance(row, UnreadableRow):  # a line of a JSON(L) file that could not be parsed
                raise _BadRow(row.problem)
            prompt_text, response_text = _row_texts(row, tokenizer, options, eos_token)
        except _Unseparable as problem:
            raise ValueError(f"{source} row {index}: {problem}") from None
        except _BadRow as problem:
            if options.on_bad_row == "error":
                raise ValueError(f"{source} row {index}: {problem}") from None
            stats.bad_rows += 1
            if stats.bad_rows <= _MAX_ROW_WARNINGS:
                logger.warning("%s row %d: %s (row skipped)", source, index, problem)
            if stats.bad_rows == _MAX_ROW_WARNINGS:
                logger.warning("further bad rows are counted but not logged one by one")
            continue
        pending.append((source, index, prompt_text, response_text))
        if len(pending) >= _BATCH_ROWS:
            _flush(pending, tokenizer, eos_id, options, examples, stats)
    _flush(pending, tokenizer, eos_id, options, examples, stats)
    stats.examples = len(examples)
    level = logging.WARNING if stats.bad_rows or stats.dropped_too_long else logging.INFO
    logger.log(level, "SFT data: %s", stats.summary())
    return examples, stats


def _flush(pending: list[tuple[str, int, str, str]], tokenizer, eos_id: int, options: SFTDataOptions,
           examples: list[SFTExample], stats: SFTDataStats) -> None:
    """Tokenise the pending rows as one batch and append their examples (clears ``pending``)."""
    if not pending:
        return
    openrlhf = options.response_end == "openrlhf" and not options.text_field
    # The longest prompt kept: "eos" needs room for one response token. OpenRLHF drops a prompt of
    # max_length - 2 tokens or more, whatever the response's length, so a kept row has room for at
    # least two response tokens before the EOS.
    longest_prompt = options.max_length - (3 if openrlhf else 1)
    prompts = tokenizer([p for _, _, p, _ in pending], add_special_tokens=False, return_attention_mask=False)
    responses = tokenizer([r for _, _, _, r in pending], add_special_tokens=False, return_attention_mask=False)
    for (source, index, _, _), prompt_ids, response_ids in zip(pending, prompts["input_ids"],
                                                                responses["input_ids"]):
        # "openrlhf": the response text already ends with the EOS token (its last token is set below).
        ids = [*prompt_ids, *response_ids] if openrlhf else [*prompt_ids, *response_ids, eos_id]
        n_prompt, n_total = len(prompt_ids), len(ids)
        too_long = n_total > options.max_length
        if n_prompt > longest_prompt or (too_long and options.overlong == "drop"):
            stats.dropped_too_long += 1
            logger.debug("%s row %d: %d tokens (prompt %d), max_length %d, dropped",
                         source, index, n_total, n_prompt, options.max_length)
            continue
        if too_long:  # cut from the end
            ids = ids[:options.max_length]
            stats.truncated += 1
        if openrlhf:
            # OpenRLHF sets the last token to the EOS id ("to avoid EOS truncation"): a no-op on a whole
            # response, and on a cut one the EOS replaces its last token and is supervised. With "eos" the
            # EOS went with the cut, so a cut response never teaches "stop here".
            ids[-1] = eos_id
        input_ids = np.asarray(ids, dtype=np.int32)
        loss_mask = np.zeros(len(ids), dtype=bool)
        loss_mask[n_prompt:] = True
        examples.append(SFTExample(input_ids, loss_mask))
    pending.clear()


def _row_texts(row: Any, tokenizer, options: SFTDataOptions, eos_token: str) -> tuple[str, str]:
    """(prompt text, response text) of one row; raises ``_BadRow`` naming the problem (``_Unseparable``
    for a conversation that does not render as the prompt followed by the response)."""
    if not isinstance(row, dict):
        raise _BadRow(f"row must be a dict, got {type(row).__name__}")
    if options.text_field:
        value = row.get(options.text_field)
        if not isinstance(value, str) or not value.strip():
            raise _BadRow(f"field {options.text_field!r} must be a non-empty string, got "
                          f"{'nothing' if value is None else repr(value)[:40]}")
        return "", value
    field = options.response_field or _auto_response_field(row)
    messages = _prompt_messages(row.get(options.prompt_field), options.prompt_field)
    response = content = _response_text(row.get(field), field)
    prompt = _render_row(messages, tokenizer, options.remove_system_prompt, options.prompt_field)
    if options.think_prefix == "prompt":
        # A template that already opens the block (LUFFY's Qwen2.5-Math-7B-16k-think ends its generation
        # prompt with "<think>\n") keeps its own marker: the response's is dropped, not appended a second
        # time. That is LUFFY's SFT preparation exactly: it strips "<think>\n" from every target.
        opened = prompt.rstrip().endswith(_THINK_MARKERS[-1])
        for marker in _THINK_MARKERS:
            if response.startswith(marker):
                prompt, response = (prompt if opened else prompt + marker), response[len(marker):]
                if not response.strip():
                    raise _BadRow(f"field {field!r} is empty after moving {marker!r} to the prompt")
                break
    if options.response_end == "eos":
        return prompt, response
    # The row's own content, marker included: a think_prefix move only shifts where the prompt ends.
    conversation = _render_row([*messages, {"role": "assistant", "content": content}], tokenizer,
                               options.remove_system_prompt, field, generation_prompt=False)
    return prompt, _rendered_response(prompt, conversation, eos_token, field)


def _render_row(messages: list[dict], tokenizer, remove_system_prompt: bool, field: str, *,
                generation_prompt: bool = True) -> str:
    """``_render`` with the template's refusals of this row as ``_BadRow``s naming ``field``."""
    try:
        return _render(messages, tokenizer, remove_system_prompt, generation_prompt=generation_prompt)
    except _BadRow as error:
        raise _BadRow(f"field {field!r}: {error}") from None
    except jinja2.TemplateSyntaxError:  # a broken template is not the row's fault
        raise
    except jinja2.TemplateError as error:  # the template's raise_exception, e.g. "roles must alternate"
        raise _BadRow(f"field {field!r}: chat template refused it: {error}") from None


def _rendered_response(prompt: str, conversation: str, eos_token: str, field: str) -> str:
    """The response as ``response_end: openrlhf`` supervises it: ``conversation`` after ``prompt``, trailing
    newlines cut, then ``" " + eos_token`` unless it already ends with the EOS."""
    if not conversation.startswith(prompt):
        at = next((i for i, (a, b) in enumerate(zip(prompt, conversation)) if a != b), len(conversation))
        start = max(0, at - 40)
        raise _Unseparable(
            f"the chat template does not render the conversation with the response as the prompt followed by "
            f"the response (from character {at}: prompt {prompt[start:at + 40]!r}, conversation "
            f"{conversation[start:at + 40]!r}), so its end of turn cannot be separated from the prompt; "
            f"data.response_end: eos supervises the response text and the EOS instead")
    response = conversation[len(prompt):].rstrip("\n")
    if not response.strip():
        raise _BadRow(f"field {field!r}: the chat template renders nothing of it after the prompt")
    return response if response.endswith(eos_token) else f"{response} {eos_token}"


def _auto_response_field(row: dict) -> str:
    """``target`` (LUFFY/OpenR1) if the row has one, else ``response``.

    Decided per row: JSON files mixing both schemas load with every column in every row, the
    absent one filled with None. With neither, the error names ``target`` if that column exists.
    """
    if row.get("target") is not None:
        return "target"
    if row.get("response") is not None or "target" not in row:
        return "response"
    return "target"


def _prompt_messages(value: Any, field: str) -> list[dict]:
    """Validated ``[{role, content}]`` messages (a string becomes one user message)."""
    if value is None:
        raise _BadRow(f"field {field!r} missing")
    if isinstance(value, str):
        if not value.strip():
            raise _BadRow(f"field {field!r} is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise _BadRow(f"field {field!r} must be a string or a list of {{role, content}} messages, "
                      f"got {type(value).__name__}")
    if len(value) == 0:
        raise _BadRow(f"field {field!r} has no messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise _BadRow(f"field {field!r} message {i} must be a {{role, content}} dict, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise _BadRow(f"field {field!r} message {i} needs string 'role' and 'content', "
                          f"got {type(role).__name__} and {type(content).__name__}")
        messages.append({"role": role, "content": content})  # drop None-filled keys of a unified schema
    return messages


def _response_text(value: Any, field: str) -> str:
    """The response string: a plain string, or the content of a list with one assistant message."""
    if value is None:
        raise _BadRow(f"field {field!r} missing")
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != 1:
            raise _BadRow(f"field {field!r} must hold exactly one assistant message, got {len(value)}")
        message = value[0]
        if not isinstance(message, dict):
            raise _BadRow(f"field {field!r} must hold a {{role, content}} message, got {type(message).__name__}")
        if message.get("role") != "assistant":
            raise _BadRow(f"field {field!r} message has role {message.get('role')!r}, expected 'assistant'")
        value = message.get("content")
        if not isinstance(value, str):
            raise _BadRow(f"field {field!r} message content must be a string, got {type(value).__name__}")
    elif not isinstance(value, str):
        raise _BadRow(f"field {field!r} must be a string or a list with one assistant message, "
                      f"got {type(value).__name__}")
    if not value.strip():
        raise _BadRow(f"field {field!r} is empty")
    return value


def _render(messages: list[dict], tokenizer, remove_system_prompt: bool, *, generation_prompt: bool = True) -> str:
    if remove_system_prompt:
        messages = [m for m in messages if m["role"] != "system"]
        if not messages:
            raise _BadRow("only system messages, and remove_system_prompt is set")
    text = apply_chat_template(tokenizer, messages, generation_prompt=generation_prompt)
    if remove_system_prompt:
        injected, keep = _injected_system_block(tokenizer)
        if injected and text.startswith(injected):
            text = keep + text[len(injected):]
    return text


_INJECTED_CACHE: dict[tuple, tuple[str, str]] = {}

# How long one rendering of a chat template may take. An ordinary template renders a conversation in well
# under a millisecond; one that loops for minutes (nested ``range`` loops) is stopped at this limit.
TEMPLATE_TIME_LIMIT_S = 10.0


class ChatTemplateTimeout(RuntimeError):
    """A chat template that did not finish rendering within :data:`TEMPLATE_TIME_LIMIT_S`."""


def apply_chat_template(tokenizer, messages: list[dict], *, generation_prompt: bool) -> str:
    """``tokenizer.apply_chat_template`` (text, not ids) with a time limit: a template still rendering after
    :data:`TEMPLATE_TIME_LIMIT_S` seconds stops with a :class:`ChatTemplateTimeout` naming the model folder."""
    with _time_limit(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


@contextlib.contextmanager
def _time_limit(tokenizer):
    """A real-time timer (``SIGALRM``) that interrupts the rendering. Jinja renders in Python, so the signal
    handler's exception lands inside the template's loops. Signals reach the main thread only, and an
    interval timer someone else set is left alone: there the rendering runs without a limit."""
    if (not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread()
            or signal.getitimer(signal.ITIMER_REAL)[0] > 0):
        yield
        return
    limit = TEMPLATE_TIME_LIMIT_S

    def expired(signum, frame):
        folder = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise ChatTemplateTimeout(f"{folder}: its chat template did not finish rendering within {limit:g} s "
                                  "(a loop that never ends?); fix chat_template in its tokenizer_config.json "
                                  "or chat_template.jinja")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _injected_system_block(tokenizer) -> tuple[str, str]:
    """``(prefix, keep)``: what the template puts before the first turn when no system message is
    given, if that is a default system block; ``keep`` is the BOS text to leave in its place.

    Found by rendering probes: ``[system S]``, ``[system S, user U]`` and ``[user U]``. The user turn
    is what ``[system S, user U]`` adds after ``[system S]``; whatever ``[user U]`` renders before it
    is the injected prefix. It counts as a system block only if it is framed like the real one (same
    header before S, same closing after S), so unusual templates are left untouched.
    """
    template = getattr(tokenizer, "chat_template", None)
    bos = getattr(tokenizer, "bos_token", None) or ""
    key = (repr(template), bos, getattr(tokenizer, "eos_token", None))
    if key in _INJECTED_CACHE:
        return _INJECTED_CACHE[key]

    def render(messages):
        return apply_chat_template(tokenizer, messages, generation_prompt=False)

    system, user = {"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": _PROBE_USER}
    result = ("", "")
    try:
        system_only, with_system, without = render([system]), render([system, user]), render([user])
    except ChatTemplateTimeout:
        raise
    except Exception as error:  # a template that refuses a probe: nothing we can safely strip
        logger.warning("cannot probe the chat template for a default system prompt (%s); not stripping one", error)
        _INJECTED_CACHE[key] = result
        return result
    user_turn = with_system[len(system_only):]
    if with_system.startswith(system_only) and user_turn and without.endswith(user_turn) \
            and _PROBE_SYSTEM in system_only:
        prefix = without[:len(without) - len(user_turn)]
        keep = bos if bos and prefix.startswith(bos) and system_only.startswith(bos) else ""
        start = system_only.index(_PROBE_SYSTEM)
        header, closing = system_only[len(keep):start], system_only[start + len(_PROBE_SYSTEM):]
        block = prefix[len(keep):]
        if block and header and block.startswith(header) and block.endswith(closing):
            result = (prefix, keep)
    _INJECTED_CACHE[key] = result
    return result


def _eos(tokenizer, eos_token: str | None) -> tuple[str, int]:
    """The EOS token and its id; it must be a single token of the vocabulary."""
    token = eos_token if eos_token is not None else tokenizer.eos_token
    if not token:
        raise ValueError("the tokenizer has no eos_token; set SFTDataOptions.eos_token")
    eos_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(eos_id, int) or tokenizer.convert_ids_to_tokens(eos_id) != token:
        raise ValueError(f"eos token {token!r} is not a single token of the tokenizer's vocabulary")
    return token, eos_id


def demonstration_text(row: Any, response_field: str | None = None) -> str:
    """The response an SFT-format row demonstrates: ``target``'s assistant message (LUFFY/OpenR1
    parquet) or ``response``, as SFT reads it. A ValueError names the problem."""
    if not isinstance(row, dict):
        raise ValueError(f"row must be a dict, got {type(row).__name__}")
    field = response_field or _auto_response_field(row)
    try:
        return _response_text(row.get(field), field)
    except _BadRow as problem:
        raise ValueError(str(problem)) from None
