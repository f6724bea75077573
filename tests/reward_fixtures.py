"""User scorers for ``reward.kind: python`` tests, named as ``reward_fixtures:NAME`` (tests/ is on sys.path
under pytest, and spawned reward workers inherit it)."""

from __future__ import annotations

import time


def score(answer: str, ground_truth: str) -> float:
    """1 when the answer contains the ground truth, 0.5 when it says "half", else 0."""
    if ground_truth in answer:
        return 1.0
    return 0.5 if "half" in answer else 0.0


def hang(answer: str, ground_truth: str) -> float:
    """Never returns for an answer that says "hang"; else ``score``."""
    while "hang" in answer:
        time.sleep(0.1)
    return score(answer, ground_truth)


def fail(answer: str, ground_truth: str) -> float:
    """Raises for an answer that says "boom", returns no score for "none" and 2.0 for "two"; else ``score``."""
    if "boom" in answer:
        raise ValueError("boom in the answer")
    if "none" in answer:
        return None  # type: ignore[return-value]
    if "two" in answer:
        return 2.0
    return score(answer, ground_truth)


def quarter(answer: str, ground_truth: str) -> float:
    """0.25 whatever the answer."""
    return 0.25


class Scorers:
    @staticmethod
    def exact(answer: str, ground_truth: str) -> float:
        return float(answer.strip() == ground_truth.strip())


NOT_CALLABLE = 3
