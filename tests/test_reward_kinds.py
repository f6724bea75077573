"""Reward kinds (``reward.kind``): each kind graded through the worker pool, a user's ``python`` scorer
(one that hangs, one that raises), config errors, ``open_reward``, and RL rollouts / evaluation scored
with a kind other than math."""

import contextlib
import json
import logging
import time

import numpy as np
import pytest

from sft_fixtures import make_model_dir
from sftrl_jax.config import ConfigError, RewardOptions, load_config
from sftrl_jax.data.batching import EpochSampler
from sftrl_jax.data.prompts import PromptItem
from sftrl_jax.rewards import (
    REWARD_KINDS,
    Reward,
    RewardLoadError,
    RewardPool,
    compute_score,
    open_reward,
)
from sftrl_jax.rewards.kinds import grade, label_answer, normalize_label
from sftrl_jax.rl import RLConfig, collect_rollouts
from sftrl_jax.sampling import Sample


def _options(**kwargs) -> RewardOptions:
    return RewardOptions(num_workers=2, **kwargs)


@pytest.fixture(scope="module")
def rewards():
    """``rewards(kind, function=None, require_think=False, timeout_s=30)`` -> an open Reward (pools reused)."""
    with contextlib.ExitStack() as stack:
        cache = {}

        def get(kind, function=None, require_think=False, timeout_s=30.0):
            key = (kind, function, require_think, timeout_s)
            if key not in cache:
                options = _options(kind=kind, function=function, require_think=require_think, timeout_s=timeout_s)
                cache[key] = open_reward(options, stack)
            return cache[key]

        yield get


def test_the_built_in_kinds_are_registered():
    assert {"math", "choice", "label", "python"} <= set(REWARD_KINDS)
    assert [k for k, v in REWARD_KINDS.items() if v.takes_function] == ["python"]


# ------------------------------------------------------------------------------------------ math

MATH = [  # (response, ground truth): right, wrong, malformed
    (r"so \boxed{\frac12}", "0.5"), (r"\boxed{3}", "4"), (r"\boxed{", "1"), ("", "1"), ("ANSWER: C", "C"),
    ("<think>2</think> \\boxed{2}", "2"),
]


@pytest.mark.parametrize("require_think", [False, True])
def test_math_kind_is_the_math_grader(rewards, require_think):
    responses, truths = zip(*MATH)
    result = rewards("math", require_think=require_think).score_batch(responses, truths)
    assert result.scores == [compute_score(r, g, require_think=require_think) for r, g in MATH]
    assert result.scores == ([1.0, 0.0, 0.0, 0.0, 1.0, 1.0] if not require_think else [0.0] * 5 + [1.0])
    assert result.num_errors == 0 and result.num_timeouts == 0


def test_math_is_the_default_kind():
    assert RewardOptions().kind == "math" and RewardOptions().function is None


# ---------------------------------------------------------------------------------------- choice

CHOICE = [  # (response, ground truth, score)
    ("Thinking it over, the answer is (C).", "C", 1.0),
    (r"\boxed{\text{B}}", "B", 1.0),
    ("ANSWER: **D**", "(D)", 1.0),
    ("ANSWER: (d)", "d", 1.0),  # a lower-case ground truth letter
    ("the answer is a prime", "A", 0.0),  # a bare lower-case "a" is a word, not a choice
    ("B", "B", 1.0),
    ("the answer is (A)", "C", 0.0),
    (r"First \boxed{C}, but no: \boxed{A}", "C", 0.0),  # the last boxed answer counts
    ("I cannot decide between the options.", "C", 0.0),  # no letter
    ("", "C", 0.0),
]


def test_choice_kind_reads_the_letter_as_the_math_grader_does(rewards):
    responses, truths, expected = zip(*CHOICE)
    result = rewards("choice").score_batch(responses, truths)
    assert result.scores == list(expected) and result.num_errors == 0
    # the same reading of the letter as the math grader's multiple-choice branch
    assert [compute_score(r, g) for r, g, _ in CHOICE if g.isupper() or g.startswith("(")] == \
        [e for _, g, e in CHOICE if g.isupper() or g.startswith("(")]


def test_choice_kind_with_a_non_letter_ground_truth_is_an_error(rewards, caplog):
    with caplog.at_level(logging.WARNING, logger="sftrl_jax.rewards"):
        result = rewards("choice").score_batch(["the answer is 42", "ANSWER: A"], ["42", "A"])
    assert result.scores == [0.0, 1.0] and result.num_errors == 1
    assert any("failed on 1 of 2 items" in r.getMessage() and "not a choice letter" in r.getMessage()
               for r in caplog.records)


# ----------------------------------------------------------------------------------------- label

LABEL = [  # (response, ground truth, score)
    ("The subject and verb agree.\nacceptable", "acceptable", 1.0),
    ("**Answer:** Unacceptable.", "unacceptable", 1.0),
    (r"So it is \boxed{\text{acceptable}}.", "acceptable", 1.0),  # the boxed answer wins over the last line
    ("Final answer: 1", "1", 1.0),
    ("  0  \n\n", "0", 1.0),
    ("Label: ACCEPTABLE", " Acceptable ", 1.0),
    ("unacceptable", "acceptable", 0.0),  # exact match: containing the label is not enough
    ("The sentence is acceptable.", "acceptable", 0.0),  # the last line is the whole sentence
    ("\\boxed{0} ... on reflection\n1", "1", 0.0),  # a boxed answer, however early, is the answer
    ("", "acceptable", 0.0),
    ("1", "-1", 0.0),  # signs are kept
]


def test_label_kind(rewards):
    responses, truths, expected = zip(*LABEL)
    result = rewards("label").score_batch(responses, truths)
    assert result.scores == list(expected) and result.num_errors == 0


def test_label_rule():
    assert normalize_label("  **Answer:** Un-acceptable.  ") == "un-acceptable"
    assert normalize_label("The final answer is: (B)") == "b"
    assert normalize_label(None) == ""
    assert label_answer("reasoning...\n\nacceptable\n") == "acceptable"
    assert label_answer(r"\boxed{1}" + "\n0") == "1"
    assert label_answer("\n  \n") is None


def test_require_think_applies_to_every_kind(rewards):
    responses = ["<think>unacceptable</think>acceptable", "acceptable", "<think>a</think>"]
    result = rewards("label", require_think=True).score_batch(responses, ["acceptable"] * 3)
    assert result.scores == [1.0, 0.0, 0.0]
    assert rewards("choice", require_think=True).score_batch(["<think>(A)</think> (B)"], ["B"]).scores == [1.0]


def test_malformed_items_score_zero_in_every_kind(rewards):
    for kind in ("math", "choice", "label"):
        result = rewards(kind).score_batch([None, 5, "x"], ["1", "1", None])
        assert result.scores == [0.0, 0.0, 0.0] and result.num_errors == 0, kind


# ---------------------------------------------------------------------------------------- python


def test_python_kind_calls_the_users_function(rewards):
    reward = rewards("python", "reward_fixtures:score")
    result = reward.score_batch(["it is 7", "half right", "no", "<think>7</think>8"], ["7"] * 4)
    assert result.scores == [1.0, 0.5, 0.0, 1.0] and result.num_errors == 0
    # require_think: the function sees only what follows </think>
    think = rewards("python", "reward_fixtures:score", require_think=True)
    assert think.score_batch(["<think>7</think>8", "7"], ["7", "7"]).scores == [0.0, 0.0]
    # a dotted name after the colon
    assert rewards("python", "reward_fixtures:Scorers.exact").score_batch([" a ", "b"], ["a", "a"]).scores == [1, 0]


def test_a_hanging_user_function_times_out_and_its_worker_is_replaced(rewards, caplog):
    reward = rewards("python", "reward_fixtures:hang", timeout_s=2.0)
    pool = reward.pool
    pool.wait_ready()
    pids = {w.process.pid for w in pool._workers}
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="sftrl_jax.rewards"):
        result = reward.score_batch(["hang forever", "7", "half"], ["7", "7", "7"])
    assert result.scores == [0.0, 1.0, 0.5] and result.timed_out == [True, False, False]
    assert result.num_timeouts == 1 and 2.0 <= time.monotonic() - start < 20.0
    assert len(pids - {w.process.pid for w in pool._workers}) == 1  # the hung worker was killed
    assert any("timed out" in r.getMessage() for r in caplog.records)
    assert reward(["7"], ["7"]) == [1.0]  # and the pool goes on


def test_a_raising_user_function_scores_zero_with_one_warning(rewards, caplog):
    reward = rewards("python", "reward_fixtures:fail")
    with caplog.at_level(logging.WARNING, logger="sftrl_jax.rewards"):
        result = reward.score_batch(["boom", "7", "none", "two", "boom again"], ["7"] * 5)
    assert result.scores == [0.0, 1.0, 0.0, 0.0, 0.0] and result.num_errors == 4 and result.num_timeouts == 0
    warnings = [r.getMessage() for r in caplog.records if "failed on" in r.getMessage()]
    assert len(warnings) == 1  # one line per batch
    assert "failed on 4 of 5 items" in warnings[0] and "item 0: ValueError: boom in the answer" in warnings[0]


@pytest.mark.parametrize("function, message", [
    ("no_such_module_for_tests:score", "cannot import 'no_such_module_for_tests'"),
    ("reward_fixtures:missing", "has no 'missing'"),
    ("reward_fixtures:NOT_CALLABLE", "not a function"),
])
def test_a_user_function_that_cannot_be_loaded_is_an_error(function, message):
    with RewardPool(num_workers=1, kind="python", function=function) as pool:
        with pytest.raises(RewardLoadError, match=message):
            pool.score_batch(["1"], ["1"])


def test_grade_rules():
    assert grade(lambda a, g: 0.25, "x", "y", False) == (0.25, None)
    assert grade(lambda a, g: True, "x", "y", False) == (1.0, None)
    assert grade(lambda a, g: np.float32(1), "x", "y", False) == (1.0, None)
    for bad in (float("nan"), -0.1, 1.5, "1", None):
        score, error = grade(lambda a, g, bad=bad: bad, "x", "y", False)
        assert score == 0.0 and "not a score in [0, 1]" in error, bad


# ---------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, key, words", [
    (["reward.kind=regex"], "reward.kind", "'choice' | 'label' | 'luffy_eval' | 'math' | 'python'"),
    (["reward.kind=python"], "reward.function", "needs the scorer"),
    (["reward.kind=python", "reward.function=just_a_name"], "reward.function", "'module:function'"),
    (["reward.kind=python", "reward.function=a b:c"], "reward.function", "'module:function'"),
    (["reward.function=reward_fixtures:score"], "reward.function", "only read by reward.kind=python"),
])
def test_config_errors_name_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(RLConfig, overrides=["model.path=/m", *overrides])
    assert f"'{key}'" in str(err.value) and words in str(err.value)


def test_config_does_not_import_the_users_module():
    config = load_config(RLConfig, overrides=["model.path=/m", "reward.kind=python",
                                              "reward.function=no_such_module_for_tests.sub:score"])
    assert (config.reward.kind, config.reward.function) == ("python", "no_such_module_for_tests.sub:score")


# ----------------------------------------------------------------------------------- open_reward


def test_open_reward_prefers_the_callers_reward_fn():
    calls = []

    def mine(responses, truths, token_ids):
        calls.append(token_ids)
        return np.asarray([0.5] * len(responses))

    with contextlib.ExitStack() as stack:
        reward = open_reward(_options(kind="label"), stack, mine)  # no pool is started
        assert isinstance(reward, Reward) and reward.pool is None
        assert reward(["a", "b"], ["a", "a"], [[1], [2]]) == [0.5, 0.5] and calls == [[[1], [2]]]
        assert reward.score_batch(["a"], ["a"]).timed_out == [False]
        assert reward.answer("a", "a") is None
        assert open_reward(_options(), stack, reward) is reward


def test_open_reward_pool_is_closed_with_the_stack():
    with contextlib.ExitStack() as stack:
        reward = open_reward(_options(kind="choice"), stack)
        assert reward.pool.kind == "choice" and reward.answer("the answer is (b)", "B") == "B"
        assert reward.answer("no letter in this one", "B") is None
    assert reward.pool.closed


# ------------------------------------------------------------------------------ RL and evaluation


class _TextSampler:
    """Prompt i's ``n`` samples are ``texts[i]``."""

    def __init__(self, texts):
        self.texts = texts

    def sample(self, prompt_ids, *, seed, n=None):
        samples, texts = [], []
        for i, prompt in enumerate(prompt_ids):
            for text in self.texts[prompt[0]][:n]:
                samples.append(Sample(i, [5, 6], [-0.1, -0.1], "eos"))
                texts.append(text)
        return samples, texts


def test_rl_rollouts_are_scored_with_the_configured_kind():
    config = load_config(RLConfig, overrides=["model.path=/m", "rl.prompts_per_step=2", "sampling.n=3",
                                              "reward.kind=label", "reward.require_think=true",
                                              "reward.correct=1", "reward.wrong=-1", "reward.num_workers=2"])
    items = [PromptItem(0, "cola", "p0", "acceptable", [0]), PromptItem(1, "cola", "p1", "0", [1])]
    sampler = _TextSampler({0: ["<think>hmm</think>\nAcceptable.", "<think>no</think> unacceptable", "acceptable"],
                            1: ["<think>.</think>Answer: 0", "<think>.</think>\\boxed{1}", "<think>.</think> 0"]})
    with contextlib.ExitStack() as stack:
        score = open_reward(config.reward, stack)
        out = collect_rollouts(sampler, items, EpochSampler(2, 2, seed=0, shuffle=False), score, config, 0)
    assert out.correctness == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    assert out.rewards == [1.0, -1.0, -1.0, 1.0, -1.0, 1.0]


@pytest.fixture(scope="module")
def model_dir(hf_checkpoint, tmp_path_factory):
    return make_model_dir(hf_checkpoint("qwen2_tied"), tmp_path_factory.mktemp("kinds") / "model")


@pytest.mark.slow
def test_the_rl_trainer_grades_with_the_configured_kind(model_dir, tmp_path):
    from sftrl_jax.rl import run_rl

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}", "answer": str(i)}) + "\n" for i in range(4)))
    config = load_config(RLConfig, overrides=[
        f"model.path={model_dir}", f"data.files=[{data}]", f"output_dir={tmp_path / 'out'}", "rl.prompts_per_step=4",
        "sampling.n=2", "rl.mini_batches_per_step=1", "sampling.max_new_tokens=4", "train.max_steps=1",
        "checkpoint.save_every=0", "logging.sinks=[jsonl]", "reward.kind=python",
        "reward.function=reward_fixtures:quarter", "reward.num_workers=1"])
    metrics = run_rl(config, progress=False).metrics
    assert [m["accuracy"] for m in metrics] == [0.25] and [m["reward_mean"] for m in metrics] == [0.25]


def test_evaluation_with_the_choice_kind(model_dir, tmp_path):
    from sftrl_jax.evaluation import Completion, EvalConfig, run_eval

    data = tmp_path / "letters.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}", "answer": "ABCD"[i % 4]}) + "\n"
                            for i in range(8)))

    def half_right(items, n):  # right on even prompt ids, "A" (right only for answer A) on odd ones
        return [Completion(f"the answer is ({item.ground_truth if item.prompt_id % 2 == 0 else 'A'})", 6, False)
                for item in items for _ in range(n)]

    config = load_config(EvalConfig, overrides=[f"model.path={model_dir}", f"data.files=[{data}]",
                                                "reward.kind=choice", "reward.num_workers=1",
                                                f"output_dir={tmp_path / 'out'}"])
    results = run_eval(config, generator=half_right, progress=False)
    assert results["benchmarks"]["letters"]["accuracy"] == 0.5  # the odd ids' answers are B and D
    records = [json.loads(line) for line in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]
    assert [r["extracted_answer"] for r in records] == ["A", "A", "C", "A", "A", "A", "C", "A"]
    assert [r["score"] for r in records] == [1.0, 0.0, 1.0, 0.0] * 2
