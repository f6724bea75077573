"""The reward kinds (``reward.kind``): a registry of scorers, by name.

A scorer is ``scorer(answer: str, ground_truth: str) -> float``, a score in [0, 1]. It runs in a
:class:`~sftrl_jax.rewards.RewardPool` worker process, which looks the kind up here by name, so
nothing but the kind's name (and ``reward.function``) is sent to the worker. The rules every kind
shares are applied around the scorer by :func:`grade`:

- ``answer`` is the response, or with ``reward.require_think`` the text after its last
  ``</think>``; a response without one scores 0 without calling the scorer. A kind registered with
  ``whole_response=True`` (``luffy_eval``) always gets the whole response and applies its own
  ``</think>`` rule: ``reward.require_think`` does not apply to it (:func:`applies_require_think`);
- a response that is not a string, or a missing ground truth, scores 0;
- a scorer that raises, or returns anything but a number in [0, 1] (NaN, 1.5, None), scores 0 and
  the failure is reported (``ScoreResult.num_errors``; the pool logs one warning per batch).

Built-in kinds:

- ``math``: math-verify equivalence of the final answer (:func:`sftrl_jax.rewards.compute_score`;
  a single-letter ground truth is graded as multiple choice);
- ``choice``: multiple choice; the letter the response settles on (:func:`extract_choice`:
  ``\\boxed{C}``, "the answer is (C)", "ANSWER: C", or a response that is just the letter) equals
  the ground-truth letter A-J (``C``, ``(C)``, ``c``); a ground truth that is not a letter is an error;
- ``label``: exact match of a normalised label (CoLA's ``acceptable``/``unacceptable``, ``0``/``1``):
  see :func:`label_answer` and :func:`normalize_label`;
- ``luffy_eval``: the label LUFFY's published evaluation gives (:func:`sftrl_jax.rewards.luffy_eval_score`:
  the last ``\\boxed{}`` of the text between the first ``</think>`` and any second one, or of the whole
  response when it has none, compared by MATH-style normalisation, sympy, then math-verify);
- ``python``: the user's own scorer named by ``reward.function`` (``"module:function"``), imported
  in each worker when the pool starts; it is called as ``fn(answer, ground_truth)`` and must return a
  number in [0, 1]. The worker runs under the pool's address-space limit (4 GiB by default).

A new kind is one decorated scorer in this module::

    @reward_kind("exact")
    def exact_score(answer: str, ground_truth: str) -> float:
        return float(answer.strip() == ground_truth.strip())

and is then selectable as ``reward.kind: exact``.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from collections.abc import Callable

from .luffy_eval import luffy_answer, luffy_eval_score
from .math_reward import (
    _WRAPPER,
    _answer_part,
    _ground_truth_choice,
    _score,
    extract_answer,
    extract_boxed,
    extract_choice,
)

__all__ = ["REWARD_KINDS", "RewardKind", "RewardLoadError", "applies_require_think", "grade", "label_answer",
           "load_scorer", "normalize_label", "parse_function", "reward_kind"]

Scorer = Callable[[str, str], float]


class RewardLoadError(ValueError):
    """A reward kind's scorer could not be loaded (``reward.function``'s module or name not found)."""


@dataclasses.dataclass(frozen=True)
class RewardKind:
    """One entry of :data:`REWARD_KINDS`."""

    name: str
    # reward.function -> scorer; called once in each worker process
    load: Callable[[str | None], Scorer]
    takes_function: bool = False  # reads reward.function (required then, refused otherwise)
    # (answer, ground truth) graded once before a worker reports ready (e.g. to import math-verify)
    warmup: tuple[str, str] | None = None
    # (answer, ground truth) -> the answer the scorer reads, for evaluation records (None: not shown)
    extract: Callable[[str, str], str | None] | None = None
    # the scorer (and extract) get the whole response and apply their own </think> rule;
    # reward.require_think is not applied
    whole_response: bool = False


REWARD_KINDS: dict[str, RewardKind] = {}


def reward_kind(name: str, *, takes_function: bool = False, warmup: tuple[str, str] | None = None,
                extract: Callable[[str, str], str | None] | None = None, whole_response: bool = False):
    """Register the decorated function as reward kind ``name``.

    The function is the scorer ``(answer, ground_truth) -> float``, or with ``takes_function`` a loader
    ``(reward.function) -> scorer``.
    """

    def register(fn):
        if name in REWARD_KINDS:
            raise ValueError(f"reward kind {name!r} is registered twice")
        load = fn if takes_function else (lambda _function: fn)
        REWARD_KINDS[name] = RewardKind(name, load, takes_function, warmup, extract, whole_response)
        return fn

    return register


def load_scorer(kind: str, function: str | None = None) -> Scorer:
    """The scorer of reward kind ``kind`` (imports ``function``'s module for ``python``)."""
    if kind not in REWARD_KINDS:
        raise RewardLoadError(f"unknown reward.kind {kind!r}; choices: {', '.join(sorted(REWARD_KINDS))}")
    return REWARD_KINDS[kind].load(function)


def applies_require_think(kind: str, require_think: bool) -> bool:
    """Whether ``reward.require_think`` cuts the responses kind ``kind`` grades: it does unless the kind
    applies its own ``</think>`` rule (``whole_response``)."""
    return bool(require_think) and not REWARD_KINDS[kind].whole_response


def grade(scorer: Scorer, response, ground_truth, require_think: bool) -> tuple[float, str | None]:
    """``(score, error)`` of one response: the rules every kind shares (module docstring) around ``scorer``.

    ``error`` is None, or a one-line description of the scorer's exception or bad return value. A tuple or
    list ``ground_truth`` holds alternatives: the response scores the best of its grades against each.
    """
    if isinstance(ground_truth, (tuple, list)):
        graded = [grade(scorer, response, truth, require_think) for truth in ground_truth]
        best = max(graded, key=lambda result: result[0], default=(0.0, None))
        return best if best[0] > 0 else next((g for g in graded if g[1] is not None), best)
    if not isinstance(response, str) or ground_truth is None:
        return 0.0, None
    answer = _answer_part(response, require_think)
    if answer is None:
        return 0.0, None
    try:
        value = scorer(answer, ground_truth if isinstance(ground_truth, str) else str(ground_truth))
    except Exception as err:  # noqa: BLE001 - a scorer's failure scores 0 and is reported
        return 0.0, f"{type(err).__name__}: {err}"[:300]
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        score = float(value)
    except (TypeError, ValueError):
        return 0.0, f"returned {type(value).__name__} {value!r:.100}, not a score in [0, 1]"
    if not (math.isfinite(score) and 0.0 <= score <= 1.0):
        return 0.0, f"returned {score!r}, not a score in [0, 1]"
    return score, None


# ----------------------------------------------------------------------------- math


@reward_kind("math", warmup=("\\boxed{1}", "1"), extract=extract_answer)
def math_score(answer: str, ground_truth: str) -> float:
    """math-verify equivalence (:func:`sftrl_jax.rewards.compute_score`); the pool enforces the timeout."""
    return _score(answer, ground_truth, False, None)


# ----------------------------------------------------------------------------- choice


def _choice_letter(ground_truth: str) -> str | None:
    """The ground truth's letter A-J: as the math grader reads it (``C``, ``(C)``, ``\\text{C}``), or lower case."""
    return _ground_truth_choice(ground_truth) or _ground_truth_choice(ground_truth.strip().upper())


@reward_kind("choice", extract=lambda answer, _ground_truth: extract_choice(answer))
def choice_score(answer: str, ground_truth: str) -> float:
    """1.0 when the letter the answer settles on (:func:`extract_choice`) is the ground truth's letter."""
    letter = _choice_letter(ground_truth)
    if letter is None:
        raise ValueError(f"ground truth {ground_truth!r:.60} is not a choice letter A-J")
    return float(extract_choice(answer) == letter)


# ----------------------------------------------------------------------------- label

# Stripped from both ends of a label: whitespace, sentence punctuation, quotes, brackets, markdown
# emphasis and math delimiters. Signs, underscores and the like are kept ("-1" stays "-1").
_LABEL_EDGES = " \t\n\r\f\v.,;:!?\"'`*()[]{}<>$"
# A lead-in before the label: "Answer:", "Final answer:", "The answer is", "Label:".
_LABEL_LEAD = re.compile(r"^(?:the\s+)?(?:final\s+)?(?:answer|label)\s*(?:is\b|:)", re.IGNORECASE)
_SPACE_RUN = re.compile(r"\s+")


def normalize_label(text: str | None) -> str:
    """A label in the form labels are compared in.

    ``\\text{..}``-style wrappers are removed, then surrounding whitespace and punctuation
    (``_LABEL_EDGES``), then a lead-in ("Answer:", "The final answer is", "Label:") and the
    punctuation after it; inner whitespace runs become one space, and the result is case-folded.
    ``"**Answer:** Acceptable."`` -> ``"acceptable"``; None -> ``""``.
    """
    if text is None:
        return ""
    text = _WRAPPER.sub("", text).strip(_LABEL_EDGES)
    text = _LABEL_LEAD.sub("", text).strip(_LABEL_EDGES)
    return _SPACE_RUN.sub(" ", text).casefold()


def label_answer(answer: str, _ground_truth: str = "") -> str | None:
    """The normalised label an answer gives: its last ``\\boxed{}`` if it has one, else its last
    non-empty line (:func:`normalize_label`); None when there is neither (or it normalises to nothing)."""
    region = extract_boxed(answer)
    if region is None:
        region = next((line for line in reversed(answer.splitlines()) if line.strip()), None)
    return normalize_label(region) or None


@reward_kind("label", extract=label_answer)
def label_score(answer: str, ground_truth: str) -> float:
    """1.0 when the answer's label (:func:`label_answer`) equals the normalised ground truth."""
    truth = normalize_label(ground_truth)
    if not truth:
        raise ValueError(f"ground truth {ground_truth!r:.60} is an empty label")
    return float(label_answer(answer) == truth)


# ----------------------------------------------------------------------------- luffy_eval

# LUFFY's evaluation chooses the graded text itself: the text after the first </think> (up to any second
# one) when there is one, else the whole response (its prompts end with "<think>\n", and a response that never closes
# its thinking is still graded). reward.require_think would score such a response 0 without asking
# the scorer, so this kind takes the whole response (whole_response=True) whatever require_think says,
# and luffy_eval_score applies LUFFY's rule. The warm-up is a wrong answer, so that each worker
# imports sympy and math-verify before it reports ready.


@reward_kind("luffy_eval", warmup=("\\boxed{2}", "1"), whole_response=True,
             extract=lambda response, _ground_truth: luffy_answer(response))
def luffy_eval_kind_score(response: str, ground_truth: str) -> float:
    """LUFFY's published evaluation label of the whole response (:func:`sftrl_jax.rewards.luffy_eval_score`)."""
    return luffy_eval_score(response, ground_truth)


# ----------------------------------------------------------------------------- python

_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"
_FUNCTION_SPEC = re.compile(rf"({_DOTTED}):({_DOTTED})")


def parse_function(spec: str) -> tuple[str, str]:
    """``"package.module:function"`` -> ``("package.module", "function")``; ValueError on another form.

    The name after the colon may be dotted (``module:Class.method``). Nothing is imported.
    """
    match = _FUNCTION_SPEC.fullmatch(spec.strip()) if isinstance(spec, str) else None
    if match is None:
        raise ValueError(f"expected 'module:function' (a module path, a colon, a name), got {spec!r}")
    return match.group(1), match.group(2)


@reward_kind("python", takes_function=True)
def load_python_scorer(function: str | None) -> Scorer:
    """``reward.function``'s callable, imported by module path: ``fn(answer, ground_truth) -> float``."""
    if function is None:
        raise RewardLoadError("reward.kind=python needs reward.function ('module:function')")
    module_name, name = parse_function(function)
    try:
        target = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - reported with the key that named it
        raise RewardLoadError(f"reward.function {function!r}: cannot import {module_name!r} "
                              f"({type(err).__name__}: {err})") from None
    for part in name.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise RewardLoadError(f"reward.function {function!r}: {module_name!r} has no {name!r}") from None
    if not callable(target):
        raise RewardLoadError(f"reward.function {function!r} is a {type(target).__name__}, not a function")
    return target
