"""Answer extraction and binary grading of model responses against a reference answer.

This is the single grading function behind both the RL reward and evaluation, so the two can never
disagree. ``compute_score(response, ground_truth)`` is 1.0 when the response's final answer is
mathematically equivalent to the reference answer and 0.0 otherwise:

- The answer is the content of the last ``\\boxed{...}`` (``\\fbox{...}``, ``\\boxed 5``); when the
  response has no (non-empty) boxed answer, math-verify's own extraction of the response is used
  ("the answer is 5", ``$\\frac34$``, ...).
- Equivalence is decided by math-verify (``math_verify.parse`` / ``math_verify.verify``), the checker
  of the reference recipe (verl's ``math_verify`` reward wraps the reference answer in ``\\boxed{}``
  the same way).
- ``require_think=True`` is the reference recipe's format rule: only the text after the last
  ``</think>`` is graded, and a response without ``</think>`` scores 0.
- A reference answer that is a single letter A-J (GPQA, ARC-c, MMLU-Pro) is graded as multiple choice: the
  chosen letter comes from the boxed answer or, failing that, from "the answer is (C)" /
  "ANSWER: C" in the text.

Grading never raises; anything unparsable scores 0.0. It can, however, be slow on pathological
expressions (``9^{9^{9^{9}}}``): math-verify's SIGALRM guard is used here when called from a
process's main thread, but it cannot interrupt long C-level computations and does not work in other
threads. Grade untrusted model output through :class:`sftrl_jax.rewards.RewardPool`, which enforces a
hard per-item timeout in worker processes.
"""

from __future__ import annotations

import functools
import logging
import re
import threading

logger = logging.getLogger("sftrl_jax.rewards")

__all__ = ["compute_score", "extract_boxed", "extract_choice", "is_choice_answer"]

# math-verify's own (signal-based) per-call timeout when grading in a process's main thread.
_SIGNAL_TIMEOUT_S = 5

_BOX_START = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# An escaped character (\{, \}, \\, \b, ...): a backslash and whatever follows it.
_ESCAPE_PAIR = re.compile(r"\\[\s\S]")
_BRACE = re.compile(r"[{}]")
_SPACES = re.compile(r"\s*")
_BOX_TOKEN = re.compile(r"[^\s$]+")


def _closing_braces(text: str, opens: set[int]) -> dict[int, int]:
    """For each ``{`` at a position in ``opens``, the position of the ``}`` that closes it.

    One left-to-right pass with a stack of open braces, so linear in ``len(text)``. A backslash
    escapes the character after it (``\\{``, ``\\}``, ``\\\\``), scanning pairs from the start of the
    text; every position in ``opens`` is a ``{`` that follows no backslash, so each is reached
    exactly as a scan starting there would reach it. An unterminated ``{`` has no entry.
    """
    # Blank out escape pairs (same length, so positions are kept): only real braces remain.
    plain = _ESCAPE_PAIR.sub("  ", text)
    stack: list[int] = []
    closes: dict[int, int] = {}
    # Braces before the first box cannot close one of the boxes' braces: start there.
    for match in _BRACE.finditer(plain, min(opens)):
        pos = match.start()
        if plain[pos] == "{":
            stack.append(pos)
        elif stack:  # a "}" with nothing open closes nothing
            open_pos = stack.pop()
            if open_pos in opens:
                closes[open_pos] = pos
    return closes


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed TOKEN`` in ``text``.

    Nested braces are handled (``\\boxed{\\frac{\\sqrt{3}}{2}}`` -> ``\\frac{\\sqrt{3}}{2}``). A
    trailing unterminated ``\\boxed{...`` (a truncated response) is skipped in favour of the last
    complete one. Returns None when there is no boxed answer.

    Linear time in ``len(text)`` (a degenerate ``"\\boxed{" * 100000`` included): one regex pass
    for the box commands and one brace-matching pass, never a scan per box.
    """
    if not isinstance(text, str):
        return None
    # (command end, position after the whitespace following it) for every box command, in order.
    # Whitespace runs after distinct commands are disjoint, so this is linear too.
    boxes = [(m.end(), _SPACES.match(text, m.end()).end()) for m in _BOX_START.finditer(text)]
    if not boxes:
        return None
    n = len(text)
    opens = {j for _, j in boxes if j < n and text[j] == "{"}
    closes = _closing_braces(text, opens) if opens else {}
    for i, j in reversed(boxes):
        if j in opens:  # \boxed{...}: complete when its brace is closed
            close = closes.get(j)
            if close is not None:
                return text[j + 1 : close]
        elif i < j < n:  # "\boxed 5": a single token after whitespace
            token = _BOX_TOKEN.match(text, j)
            if token:
                return token.group(0)
    return None


# ----------------------------------------------------------------------------- multiple choice

_CHOICE_LETTERS = "ABCDEFGHIJ"
# Wrappers stripped from a boxed choice / a ground-truth letter: \text{..}, \textbf{..}, $, **, ...
_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox|textit|mathit)\s*\{|[{}$*]")
# A leading letter: "C", "(C)", "[C]", "C.", "C) 42", "C: 42". Not "Cat" or "a+b".
_LEADING_CHOICE = re.compile(r"^[(\[]?([A-Ja-j])(?:[)\].:,]|$|\s)")
# In running text: "the answer is (C)", "Answer: C", "ANSWER: **C**", "answer is option c)".
# The word "answer" is matched case-insensitively; a bare letter must be upper case (so that
# "the answer is a prime" is not read as A), a bracketed one may be either case. No two adjacent
# quantifiers share a run of spaces ("\s*:?\s*(...|\s)*" would match the same texts but can split a
# run in cubically many ways: "answer" and 800 spaces take 8 s); linear time.
_TEXT_CHOICE = re.compile(
    r"(?i:answer)(?:\s+(?i:is))?(?:\s*:)?(?:\*\*|\$|\\text(?:bf)?\{|\s)*(?:(?i:option|choice)\s*)?"
    r"(?:\(([A-Ja-j])\)|\[([A-Ja-j])\]|([A-J])(?![A-Za-z0-9]))"
)


def _strip_wrappers(text: str) -> str:
    return _WRAPPER.sub("", text).strip().rstrip(".")


def is_choice_answer(ground_truth: str) -> bool:
    """True when ``ground_truth`` is a multiple-choice letter A-J (``C``, ``(C)``, ``\\text{C}``)."""
    return _ground_truth_choice(ground_truth) is not None


def _ground_truth_choice(ground_truth: str) -> str | None:
    stripped = _strip_wrappers(ground_truth).strip("()")
    return stripped if len(stripped) == 1 and stripped in _CHOICE_LETTERS else None


def _choice_from_box(content: str) -> str | None:
    match = _LEADING_CHOICE.match(_strip_wrappers(content))
    return match.group(1).upper() if match else None


def extract_choice(text: str) -> str | None:
    """The multiple-choice letter (upper case) a response settles on, or None.

    From the last boxed answer (``\\boxed{C}``, ``\\boxed{\\text{(c)}}``, ``\\boxed{C. 42}``) or,
    failing that, the last "answer is (C)" / "Answer: C" in the text, or a response that is just
    the letter.
    """
    if not isinstance(text, str):
        return None
    boxed = extract_boxed(text)
    if boxed is not None:
        letter = _choice_from_box(boxed)
        if letter is not None:
            return letter
    matches = list(_TEXT_CHOICE.finditer(text))
    if matches:
        return next(g for g in matches[-1].groups() if g).upper()
    return _choice_from_box(text) if len(text.strip()) <= 16 else None


# ----------------------------------------------------------------------------- math-verify


@functools.lru_cache(maxsize=1)
def _configs():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    boxed_latex = LatexExtractionConfig(boxed_match_priority=0)
    return {
        # The reference answer and a boxed answer: parsed as LaTeX, nothing else.
        "boxed": [boxed_latex],
        # No boxed answer: math-verify's default extraction (anchors like "answer is", LaTeX
        # environments, then plain numbers/expressions).
        "fallback": [LatexExtractionConfig(), ExprExtractionConfig()],
    }


_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


@functools.lru_cache(maxsize=4096)
def _parse_gold(ground_truth: str, timeout: int | None) -> tuple:
    from math_verify import parse

    # Bare LaTeX ("\frac{1}{2}", "3", "\$18.90") is boxed so math-verify reads all of it; answers
    # that already carry math delimiters ("$\frac{8}{5}$", "$(-6,6)$, $(2,6)$") are parsed as is.
    if _UNESCAPED_DOLLAR.search(ground_truth) or "\\boxed" in ground_truth:
        text = ground_truth
    else:
        text = "\\boxed{" + ground_truth + "}"
    return tuple(parse(text, _configs()["boxed"], parsing_timeout=timeout))


def _parse_answer(answer_text: str, timeout: int | None) -> list:
    from math_verify import parse

    boxed = extract_boxed(answer_text)
    if boxed is not None and boxed.strip():
        return parse("\\boxed{" + boxed + "}", _configs()["boxed"], parsing_timeout=timeout)
    return parse(answer_text, _configs()["fallback"], parsing_timeout=timeout)


def _same_text(answer: str, ground_truth: str) -> bool:
    strip = lambda t: "".join(t.split()).strip("$")  # noqa: E731
    return strip(answer) == strip(ground_truth)


def _answer_part(response: str, require_think: bool) -> str | None:
    """The graded part of a response: all of it, or with ``require_think`` what follows the last
    ``</think>`` (None when there is none)."""
    if not require_think:
        return response
    _, sep, tail = response.rpartition("</think>")
    return tail if sep else None


def extract_answer(response: str, ground_truth: str, *, require_think: bool = False) -> str | None:
    """The answer the grader reads from ``response``: a choice letter where ``ground_truth`` is one,
    else the last ``\\boxed{}``; None where there is none (or no ``</think>`` when it is required)."""
    text = _answer_part(response, require_think)
    if text is None:
        return None
    return extract_choice(text) if is_choice_answer(ground_truth) else extract_boxed(text)


def _score(response, ground_truth, require_think: bool, timeout: int | None) -> float:
    """compute_score with an explicit math-verify timeout (None: disabled, as in pool workers)."""
    from math_verify import verify
    from math_verify.errors import TimeoutException

    try:
        if not isinstance(response, str) or ground_truth is None:
            return 0.0
        ground_truth = ground_truth if isinstance(ground_truth, str) else str(ground_truth)
        if not ground_truth.strip():
            return 0.0
        answer_text = _answer_part(response, require_think)
        if answer_text is None or not answer_text.strip():
            return 0.0

        letter = _ground_truth_choice(ground_truth)
        if letter is not None:
            return float(extract_choice(answer_text) == letter)

        boxed = extract_boxed(answer_text)
        if boxed is not None and _same_text(boxed, ground_truth):
            return 1.0  # identical strings are equal; no need to ask sympy (which can time out)
        gold = _parse_gold(ground_truth.strip(), timeout)
        pred = _parse_answer(answer_text, timeout)
        if not gold or not pred:
            return 0.0
        return float(verify(list(gold), pred, timeout_seconds=timeout))
    except (Exception, TimeoutException):  # TimeoutException is a BaseException
        logger.debug("grading failed; scoring 0", exc_info=True)
        return 0.0


def compute_score(response: str, ground_truth: str, *, require_think: bool = False) -> float:
    """1.0 if ``response``'s final answer matches ``ground_truth``, else 0.0. Never raises.

    Args:
      response: the model's completion (the text after the prompt).
      ground_truth: the reference answer, usually bare LaTeX (``\\frac{1}{2}``, ``3``) or a
        multiple-choice letter (``C``).
      require_think: grade only the text after the last ``</think>``; no ``</think>`` scores 0.

    In-process and without a hard timeout (see the module docstring); use ``RewardPool`` for model
    output.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    return _score(response, ground_truth, require_think, _SIGNAL_TIMEOUT_S if in_main_thread else None)
