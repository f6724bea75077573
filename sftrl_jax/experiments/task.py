"""The embedded task: short arithmetic word problems with an integer answer, generated from a seed.

Every problem has a verifiable ground truth and a step-by-step reference solution in the reference
recipe's format (``<think>`` steps ``</think>`` then ``\\boxed{answer}``). Splits are disjoint by
construction: problems are deduplicated by their text before being dealt into train / RL / test.

The SFT traces come from an *imperfect teacher*, as real expert traces do: on half of the
three-operation problems it stops after two operations and boxes that intermediate value
(``TEACHER_SKIP_RATE``). SFT imitates the teacher, slip included; GRPO with the verifiable reward
can learn to go beyond it. The reward and the evaluation always use the true answer.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

NAMES = ["Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivy", "Joe", "Kim", "Leo"]
OBJECTS = ["apples", "books", "coins", "pens", "cards", "shells", "stamps", "marbles"]
GAINS = ["buys {n}", "finds {n}", "gets {n}"]
LOSSES = ["gives {n} away", "loses {n}", "sells {n}"]
MAX_OPERAND = 5  # small numbers: a tiny model can learn the arithmetic facts in a few minutes
BENCHMARK = "demo_arith"  # the data_source of every row
TEACHER_SKIP_RATE = 0.5  # share of three-operation problems whose teacher trace skips the last operation


@dataclasses.dataclass(frozen=True)
class Problem:
    question: str
    solution: str  # <think> steps </think> \boxed{answer}
    answer: int
    teacher_solution: str  # the SFT trace: the solution, or (a slip) the first two steps only


def make_problem(rng: np.random.Generator, ops: tuple[int, int] = (2, 3),
                 skip_rate: float = TEACHER_SKIP_RATE) -> Problem:
    """A problem with ``ops[0]..ops[1]`` operations; the teacher skips the last of three with ``skip_rate``."""
    name, obj = NAMES[rng.integers(len(NAMES))], OBJECTS[rng.integers(len(OBJECTS))]
    value = int(rng.integers(2, MAX_OPERAND + 2))
    clauses = [f"{name} has {value} {obj}"]
    steps = []
    for _ in range(int(rng.integers(ops[0], ops[1] + 1))):
        if rng.random() < 0.5 or value < 2:
            n = int(rng.integers(1, MAX_OPERAND + 1))
            clauses.append(GAINS[rng.integers(len(GAINS))].format(n=n))
            steps.append(f"{value}+{n}={value + n}")
            value += n
        else:
            n = int(rng.integers(1, min(value, MAX_OPERAND) + 1))
            clauses.append(LOSSES[rng.integers(len(LOSSES))].format(n=n))
            steps.append(f"{value}-{n}={value - n}")
            value -= n
    question = ", ".join(clauses) + f". How many {obj} now?"
    solution = _trace(steps)
    slip = len(steps) == 3 and rng.random() < skip_rate
    return Problem(question, solution, value, _trace(steps[:2]) if slip else solution)


def _trace(steps: list[str]) -> str:
    result = steps[-1].split("=")[1]
    return "<think>\n" + "\n".join(steps) + "\n</think>\n\\boxed{" + result + "}"


def make_splits(seed: int, sizes: dict[str, int], *, ops: tuple[int, int] = (2, 3),
                skip_rate: float = TEACHER_SKIP_RATE) -> dict[str, list[Problem]]:
    """Disjoint splits (by question text) of the requested sizes, e.g. ``{"sft": 2000, "rl": 1000, "test": 200}``."""
    rng = np.random.default_rng(seed)
    return deal_splits(sizes, lambda: make_problem(rng, ops, skip_rate))


def deal_splits(sizes: dict[str, int], make) -> dict[str, list]:
    """Splits of the requested sizes from ``make()`` (an example with a ``question``), in order, each question
    once across all splits."""
    seen: set[str] = set()
    splits: dict[str, list] = {name: [] for name in sizes}
    for name, size in sizes.items():
        while len(splits[name]) < size:
            example = make()
            if example.question not in seen:
                seen.add(example.question)
                splits[name].append(example)
    return splits


def sft_row(problem: Problem) -> dict:
    """A row in the LUFFY/OpenR1 SFT schema."""
    return {"data_source": BENCHMARK, "prompt": [{"role": "user", "content": problem.question}],
            "target": [{"role": "assistant", "content": problem.teacher_solution}],
            "reward_model": {"ground_truth": str(problem.answer), "style": "rule"}}


def prompt_row(problem: Problem) -> dict:
    """A row in the plain prompt/answer schema (RL prompts and evaluation)."""
    return {"data_source": BENCHMARK, "prompt": problem.question, "answer": str(problem.answer)}


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def corpus(problems: list[Problem]) -> list[str]:
    return [p.question for p in problems] + [p.solution for p in problems]


def teacher_accuracy(problems: list[Problem]) -> float:
    """Share of problems whose teacher trace boxes the true answer."""
    return sum(p.teacher_solution == p.solution for p in problems) / len(problems)


STEP = re.compile(r"(\d+)([+-])(\d+)=(\d+)")  # one "a+b=c" / "a-b=c" line of a trace


def trace_stats(problems: list[Problem], responses: dict[int, str]) -> dict:
    """How a model's answers to ``problems`` (``responses``: problem index -> text) go wrong.

    Counts the three-operation problems answered after two steps (the teacher's slip) and the
    written steps whose arithmetic is wrong.
    """
    stats = {"three_step_problems": 0, "stopped_after_two_steps": 0, "steps": 0, "wrong_steps": 0}
    for index, problem in enumerate(problems):
        steps = STEP.findall(responses.get(index, ""))
        if len(STEP.findall(problem.solution)) == 3:
            stats["three_step_problems"] += 1
            stats["stopped_after_two_steps"] += len(steps) == 2
        stats["steps"] += len(steps)
        stats["wrong_steps"] += sum((int(a) + int(b) if op == "+" else int(a) - int(b)) != int(c)
                                    for a, op, b, c in steps)
    return stats
