"""The embedded CoLA-like task: acceptability judgements of generated sentences, with a learnable rule.

A sentence is subject, verb, object from a small grammar. It is acceptable when the verb agrees with the
subject in number (``the dog sees``, ``the dogs see``) and the verb stands between subject and object;
unacceptable otherwise. Half the sentences are acceptable, a quarter break agreement, a quarter put the
object before the verb. The prompt is CoLA's (:func:`sftrl_jax.data.cola.cola_prompt`'s question and the
sentence); the answer a short ``<think>`` rationale, then the label word, graded by ``reward.kind: label``.

As the arithmetic task's teacher skips its last step, this teacher skips the word-order check on
``TEACHER_SKIP_RATE`` of the sentences (its rationale has no order line) and then judges by agreement
alone, so it calls every skipped word-order violation acceptable. SFT imitates the teacher, skip included;
GRPO with the true label as reward can learn to check the order. The reward and every probe use the true
label. Splits are disjoint by sentence.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..data.cola import LABEL_WORDS, QUESTION
from .task import deal_splits

# (singular, plural) subjects, (singular, plural) verb forms, objects
SUBJECTS = [("the dog", "the dogs"), ("the cat", "the cats"), ("the bird", "the birds"), ("the teacher", "the teachers"),
            ("a child", "two children"), ("the farmer", "the farmers"), ("Ann", "Ann and Ben"), ("the girl", "the girls"),
            ("my friend", "my friends"), ("the doctor", "the doctors"), ("a boy", "three boys"), ("the king", "the kings")]
VERBS = [("sees", "see"), ("likes", "like"), ("helps", "help"), ("finds", "find"), ("calls", "call"),
         ("follows", "follow"), ("watches", "watch"), ("meets", "meet"), ("paints", "paint"), ("visits", "visit"),
         ("wants", "want"), ("carries", "carry")]
OBJECTS = ["the ball", "a book", "the river", "the apples", "Kim", "the old house", "a red car", "the letters",
           "the garden", "a small boat", "the city", "her sister"]
BENCHMARK = "demo_cola"  # the data_source of every row
TEACHER_SKIP_RATE = 0.5  # share of sentences whose teacher rationale skips the word-order check


@dataclasses.dataclass(frozen=True)
class Judgement:
    question: str  # the prompt: CoLA's question and the sentence
    solution: str  # the full rationale and the true label
    answer: str  # the true label word
    teacher_solution: str  # the SFT target: the solution, or (a skip) agreement alone and its verdict


def make_judgement(rng: np.random.Generator, skip_rate: float = TEACHER_SKIP_RATE) -> Judgement:
    subject_forms, verb_forms = SUBJECTS[rng.integers(len(SUBJECTS))], VERBS[rng.integers(len(VERBS))]
    obj = OBJECTS[rng.integers(len(OBJECTS))]
    number = int(rng.integers(2))  # 0 singular, 1 plural
    kind = rng.choice(["ok", "ok", "agreement", "order"])
    subject = subject_forms[number]
    verb_number = 1 - number if kind == "agreement" else number
    verb = verb_forms[verb_number]
    words = [subject, obj, verb] if kind == "order" else [subject, verb, obj]
    sentence = " ".join(words) + "."
    sentence = sentence[0].upper() + sentence[1:]
    names = ("singular", "plural")
    agree = f"subject {subject}: {names[number]}\nverb {verb}: {names[verb_number]}\n" \
            f"agreement: {'yes' if kind != 'agreement' else 'no'}"
    order = f"order: {'subject object verb' if kind == 'order' else 'subject verb object'}"
    label = LABEL_WORDS[int(kind == "ok")]
    solution = f"<think>\n{agree}\n{order}\n</think>\n{label}"
    skipped = rng.random() < skip_rate
    teacher = solution if not skipped else \
        f"<think>\n{agree}\n</think>\n{LABEL_WORDS[int(kind != 'agreement')]}"
    return Judgement(f"{QUESTION}\n\nSentence: {sentence}", solution, label, teacher)


def make_splits(seed: int, sizes: dict[str, int], *, skip_rate: float = TEACHER_SKIP_RATE
                ) -> dict[str, list[Judgement]]:
    """Disjoint splits (by sentence) of the requested sizes."""
    capacity = len(SUBJECTS) * 2 * len(VERBS) * len(OBJECTS) * 3  # distinct sentences the grammar can make
    if sum(sizes.values()) > capacity // 2:
        raise ValueError(f"{sum(sizes.values())} sentences asked of a grammar with {capacity}")
    rng = np.random.default_rng(seed)
    return deal_splits(sizes, lambda: make_judgement(rng, skip_rate))


def sft_row(judgement: Judgement) -> dict:
    """A row in the LUFFY SFT schema: the teacher's rationale and verdict as the target."""
    return {"data_source": BENCHMARK, "prompt": [{"role": "user", "content": judgement.question}],
            "target": [{"role": "assistant", "content": judgement.teacher_solution}],
            "reward_model": {"ground_truth": judgement.answer, "style": "rule"}}


def prompt_row(judgement: Judgement) -> dict:
    """A row in the plain prompt/answer schema (RL prompts and the probe), the true label as ground truth."""
    return {"data_source": BENCHMARK, "prompt": judgement.question, "answer": judgement.answer}


def corpus(judgements: list[Judgement]) -> list[str]:
    return [j.question for j in judgements] + [j.solution for j in judgements]


def teacher_accuracy(judgements: list[Judgement]) -> float:
    """Share of sentences whose teacher verdict is the true label."""
    return sum(j.teacher_solution.endswith("\n" + j.answer) for j in judgements) / len(judgements)
