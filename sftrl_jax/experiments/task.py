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


# The pretraining corpus of a base model for this task (``repro mixed``'s pretrained base): what a pretrained
# model knows before any post-training. Documents are plain text of three kinds, in these shares: arithmetic
# facts ("3+4=7"); word problems of 1-3 operations followed by their bare final answer in one of the
# ANSWER_FORMS; and word problems alone. No document has the chat template, a <think> block, a \boxed{} answer
# or a worked multi-step solution: those are what SFT teaches.
PRETRAIN_SHARES = {"facts": 0.3, "answered": 0.6, "question": 0.1}
ANSWER_FORMS = ["{q} {a}", "{q}\nAnswer: {a}", "Question: {q}\nAnswer: {a}", "{q} The answer is {a}.",
                "Q: {q}\nA: {a}", "User: {q}\nAssistant: {a}"]
FACTS_PER_DOCUMENT = 6
MAX_FACT_OPERAND = 2 * MAX_OPERAND + 2  # the facts cover every sum and difference the problems need


def pretrain_corpus(seed: int, documents: int, exclude: set[str]) -> list[str]:
    """``documents`` plain-text pretraining documents (module constants above), generated from ``seed``; no
    word problem whose question is in ``exclude`` (the held-out and post-training splits) is among them."""
    rng = np.random.default_rng(seed)
    kinds = list(PRETRAIN_SHARES)
    shares = np.array([PRETRAIN_SHARES[k] for k in kinds])
    texts = []
    while len(texts) < documents:
        kind = kinds[rng.choice(len(kinds), p=shares / shares.sum())]
        if kind == "facts":
            texts.append(" ".join(_fact(rng) for _ in range(FACTS_PER_DOCUMENT)))
            continue
        problem = make_problem(rng, ops=(1, 3), skip_rate=0.0)
        if problem.question in exclude:
            continue
        form = ANSWER_FORMS[rng.integers(len(ANSWER_FORMS))]
        texts.append(form.format(q=problem.question, a=problem.answer) if kind == "answered" else problem.question)
    return texts


def _fact(rng: np.random.Generator) -> str:
    a, b = (int(x) for x in rng.integers(0, MAX_FACT_OPERAND + 1, size=2))
    return f"{a}+{b}={a + b}." if rng.random() < 0.5 else f"{max(a, b)}-{min(a, b)}={max(a, b) - min(a, b)}."


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
