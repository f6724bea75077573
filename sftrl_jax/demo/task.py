"""The embedded task: short arithmetic word problems with an integer answer, generated from a seed.

Every problem has a verifiable ground truth and a step-by-step reference solution in the reference
recipe's format (``<think>`` steps ``</think>`` then ``\\boxed{answer}``). Splits are disjoint by
construction: problems are deduplicated by their text before being dealt into train / RL / test.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

NAMES = ["Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivy", "Joe", "Kim", "Leo"]
OBJECTS = ["apples", "books", "coins", "pens", "cards", "shells", "stamps", "marbles"]
GAINS = ["buys {n} more", "finds {n} more", "gets {n} more"]
LOSSES = ["gives {n} away", "loses {n}", "sells {n}"]


@dataclasses.dataclass(frozen=True)
class Problem:
    question: str
    solution: str  # <think> steps </think> \boxed{answer}
    answer: int


def make_problem(rng: np.random.Generator) -> Problem:
    name, obj = NAMES[rng.integers(len(NAMES))], OBJECTS[rng.integers(len(OBJECTS))]
    value = int(rng.integers(2, 10))
    sentences = [f"{name} has {value} {obj}."]
    steps = []
    for _ in range(int(rng.integers(2, 4))):  # two or three operations
        if rng.random() < 0.5 or value < 2:
            n = int(rng.integers(1, 10))
            sentences.append("Then " + GAINS[rng.integers(len(GAINS))].format(n=n) + ".")
            steps.append(f"{value}+{n}={value + n}")
            value += n
        else:
            n = int(rng.integers(1, min(value, 9) + 1))
            sentences.append("Then " + LOSSES[rng.integers(len(LOSSES))].format(n=n) + ".")
            steps.append(f"{value}-{n}={value - n}")
            value -= n
    sentences.append(f"How many {obj} are left?")
    solution = "<think>\n" + "\n".join(steps) + "\n</think>\n\\boxed{" + str(value) + "}"
    return Problem(" ".join(sentences), solution, value)


def make_splits(seed: int, sizes: dict[str, int]) -> dict[str, list[Problem]]:
    """Disjoint splits (by question text) of the requested sizes, e.g. ``{"sft": 2000, "rl": 1000, "test": 200}``."""
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    splits: dict[str, list[Problem]] = {name: [] for name in sizes}
    for name, size in sizes.items():
        while len(splits[name]) < size:
            problem = make_problem(rng)
            if problem.question not in seen:
                seen.add(problem.question)
                splits[name].append(problem)
    return splits


def sft_row(problem: Problem) -> dict:
    """A row in the LUFFY/OpenR1 SFT schema."""
    return {"data_source": "demo_arith", "prompt": [{"role": "user", "content": problem.question}],
            "target": [{"role": "assistant", "content": problem.solution}],
            "reward_model": {"ground_truth": str(problem.answer), "style": "rule"}}


def prompt_row(problem: Problem) -> dict:
    """A row in the plain prompt/answer schema (RL prompts and evaluation)."""
    return {"data_source": "demo_arith", "prompt": problem.question, "answer": str(problem.answer)}


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def corpus(problems: list[Problem]) -> list[str]:
    return [p.question for p in problems] + [p.solution for p in problems]
