"""Rewards: boxed-answer extraction, math-verify grading, the think rule, multiple choice, and the
worker pool's hard per-item timeout."""

import logging
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from sftrl_jax.rewards import RewardPool, ScoreResult, compute_score, extract_boxed, extract_choice, math_reward
from sftrl_jax.rewards.pool import _snippet

# (response, ground truth, require_think, expected score)
#
# math-verify quirks found while writing this table (left out of it, as the "right" answer is
# debatable; noted here so nobody is surprised):
# - Degrees are not converted: \boxed{\frac{\pi}{2}} vs 90^\circ is 0; 30^\circ vs 30 is 1 (the
#   degree sign is simply dropped).
# - Percent is lenient: \boxed{10} vs 10\% is 1 (either reading is accepted).
# - A comma-separated answer is a set: \boxed{2, 1} vs "1, 2" is 1 (fine for solution sets, wrong
#   for an ordered list). Parenthesised tuples are ordered: (1,2,3) vs (3,2,1) is 0.
# - A two-element "(a, b)" parses as an open interval, so a coordinate pair and an open interval
#   compare equal; (-4, 3) vs (3, -4) is still 0.
# - Numbers are compared after rounding to 6 decimals: 0.866 vs \frac{\sqrt3}{2} is 0, but
#   0.8660254 is 1.
# - \mbox{5 cm} keeps its units (parses as a product) while \text{ cm} is stripped.
# - Text answers are lower-cased symbols: \text{Monday} vs \text{monday} is 1.
CASES = [
    # --- equivalent forms -------------------------------------------------------------------
    (r"So the probability is \boxed{0.5}.", r"\frac{1}{2}", False, 1.0),
    (r"\boxed{\frac12}", "0.5", False, 1.0),
    (r"The ratio is $\boxed{\dfrac{3}{4}}$", r"\frac{3}{4}", False, 1.0),
    (r"\boxed{\tfrac{3}{4}}", "0.75", False, 1.0),
    (r"\boxed{1,000}", "1000", False, 1.0),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", False, 1.0),
    (r"\boxed{\frac{\sqrt{3}}{3}}", r"\frac{1}{\sqrt{3}}", False, 1.0),
    (r"\boxed{(x+1)^2}", "x^2+2x+1", False, 1.0),
    (r"so \boxed{x = 3}", "3", False, 1.0),
    (r"\boxed{\{1, 2\}}", "1,2", False, 1.0),
    (r"The solution set is \boxed{(1, 2]}", "(1,2]", False, 1.0),
    (r"\boxed{[-1, \infty)}", r"[-1,\infty)", False, 1.0),
    (r"The point is \boxed{(3, -4)}.", "(3,-4)", False, 1.0),
    (r"\boxed{\left( 1, 2, 3 \right)}", "(1,2,3)", False, 1.0),
    (r"\boxed{5\text{ cm}}", "5", False, 1.0),
    (r"\boxed{5}", r"5\text{ cm}", False, 1.0),
    (r"\boxed{\text{5}}", "5", False, 1.0),
    (r"\boxed{30^\circ}", "30", False, 1.0),
    (r"\boxed{30}", r"30^{\circ}", False, 1.0),
    (r"\boxed{1.6}", r"$\frac{8}{5}$", False, 1.0),  # ground truth already in $...$ (OlympiadBench)
    (r"\boxed{18.90}", r"\$18.90", False, 1.0),  # escaped dollar in the ground truth
    # --- nested braces, several boxes, other box forms ---------------------------------------
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", False, 1.0),
    (r"First \boxed{3}; on reflection the answer is \boxed{4}.", "4", False, 1.0),
    (r"First \boxed{3}; on reflection the answer is \boxed{4}.", "3", False, 0.0),
    (r"The answer is \fbox{7}.", "7", False, 1.0),
    (r"The answer is $\boxed 7$.", "7", False, 1.0),
    (r"\boxed{5}, or maybe \boxed{\frac{1}{", "5", False, 1.0),  # truncated last box is skipped
    # --- wrong answers --------------------------------------------------------------------------
    (r"\boxed{6}", "5", False, 0.0),
    (r"\boxed{-5}", "5", False, 0.0),
    (r"\boxed{0.33}", r"\frac{1}{3}", False, 0.0),
    (r"\boxed{(1, 2)}", "(1,2]", False, 0.0),
    (r"\boxed{(-4, 3)}", "(3,-4)", False, 0.0),
    (r"\boxed{(3, 2, 1)}", "(1,2,3)", False, 0.0),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{1}{2}", False, 0.0),
    (r"\boxed{x^2+1}", "(x+1)^2", False, 0.0),
    # --- no boxed answer: math-verify's own extraction ----------------------------------------
    ("Adding them up, the answer is 42.", "42", False, 1.0),
    (r"Therefore, the final answer is $\frac{3}{4}$.", "0.75", False, 1.0),
    ("Answer: 12", "13", False, 0.0),
    ("I am not sure how to solve this.", "7", False, 0.0),
    (r"The box \boxed{} stays empty, but the answer is 5.", "5", False, 1.0),  # empty box: fallback
    # --- the think rule -------------------------------------------------------------------------
    (r"<think>2+2 is 4... no, 2</think> The answer is \boxed{2}.", "2", True, 1.0),
    (r"<think>so it is \boxed{2}", "2", True, 0.0),  # no </think>
    (r"<think>so it is \boxed{2}", "2", False, 1.0),  # ... fine without the rule
    (r"<think>so it is \boxed{2}</think> I have finished.", "2", True, 0.0),  # boxed only in think
    (r"<think>so it is \boxed{2}</think> I have finished.", "2", False, 1.0),
    (r"<think>\boxed{3}</think> \boxed{2}", "2", True, 1.0),
    (r"<think>\boxed{3}</think> \boxed{2}", "3", True, 0.0),
    (r"<think>a</think> b</think> The answer is $\frac{1}{2}$.", "0.5", True, 1.0),  # last </think>
    (r"<think>2</think>", "2", True, 0.0),  # nothing after </think>
    # --- multiple choice (GPQA, ARC-c) -----------------------------------------------------------
    (r"So the answer is \boxed{C}.", "C", False, 1.0),
    (r"\boxed{\text{(C)}}", "C", False, 1.0),
    (r"\boxed{c}", "C", False, 1.0),
    (r"\boxed{(C) $10^{-4}$ eV}", "C", False, 1.0),
    (r"\boxed{D}", "C", False, 0.0),
    ("Weighing the options, the answer is (B).", "B", False, 1.0),
    ("weighing the options, the answer is (b)", "B", False, 1.0),
    ("Step by step...\nANSWER: A", "A", False, 1.0),  # GPQA's requested format
    ("Answer: **D**", "D", False, 1.0),
    ("The answer is (B).", "C", False, 0.0),
    ("The answer is a prime number.", "A", False, 0.0),  # a bare lower-case "a" is not a choice
    (r"\boxed{B}", "(B)", False, 1.0),
    (r"<think>the answer is (A)</think> The answer is (D).", "A", True, 0.0),
    (r"<think>hmm</think> \boxed{A}", "A", True, 1.0),
    (r"\boxed{2}", "2", False, 1.0),  # ARC-c items labelled 1-4 are graded as numbers
    # --- multiple choice with up to ten options (MMLU-Pro: A-J) ---------------------------------------
    ("Step by step...\nANSWER: J", "J", False, 1.0),
    (r"so the answer is \boxed{H}", "H", False, 1.0),
    ("The answer is (G).", "G", False, 1.0),
    (r"\boxed{\text{(e)}}", "E", False, 1.0),
    ("ANSWER: I", "J", False, 0.0),
    (r"<think>maybe F</think>\nANSWER: F", "F", True, 1.0),
    # --- degenerate inputs ----------------------------------------------------------------------
    ("", "5", False, 0.0),
    (r"\boxed{5}", "", False, 0.0),
    (r"\boxed{\frac{1}{}", "1", False, 0.0),
]


@pytest.mark.parametrize("response,ground_truth,require_think,expected", CASES)
def test_compute_score_table(response, ground_truth, require_think, expected):
    assert compute_score(response, ground_truth, require_think=require_think) == expected


def test_table_is_consistent_and_the_think_rule_only_takes_reward_away():
    # no row twice (a repeated row with another expected score would contradict itself), and both outcomes
    # both with and without the think rule
    keys = [case[:3] for case in CASES]
    assert len(set(keys)) == len(keys), [key for key in keys if keys.count(key) > 1]
    assert {(think, expected) for _, _, think, expected in CASES} == {(False, 0.0), (False, 1.0), (True, 0.0),
                                                                      (True, 1.0)}
    # require_think adds a condition and never a way to score: every row's score without the rule is at
    # least its score with it, and some rows score only without it.
    with_rule = [compute_score(response, truth, require_think=True) for response, truth, _, _ in CASES]
    without = [compute_score(response, truth, require_think=False) for response, truth, _, _ in CASES]
    assert all(w >= r for w, r in zip(without, with_rule)), [c for c, w, r in zip(CASES, without, with_rule) if w < r]
    assert sum(without) > sum(with_rule)


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),
        (r"a \boxed{1} b \boxed{x^{2}} c", "x^{2}"),
        (r"\fbox{7}", "7"),
        (r"$\boxed 5$.", "5"),
        (r"\boxed {12}", "12"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed{\left\{ x \right\}}", r"\left\{ x \right\}"),
        (r"\boxed{4} then \boxed{\frac{1}{", "4"),
        (r"\boxed{}", ""),
        ("no box here", None),
        (r"\boxedfoo{3}", None),
        (r"\boxed{unterminated", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"\boxed{\textbf{B}}", "B"),
        ("The correct answer is option C.", "C"),
        (r"\boxed{B \text{ (the second option)}}", "B"),
        (r"\boxed{\text{ c }}", "C"),
        (r"\boxed{42}", None),
        (None, None),
        ("(d)", "D"),
        ("answer is I think", "I"),  # a known limitation: "I" is a valid choice letter
        ("ANSWER: J", "J"),
        (r"\boxed{F. 42 N}", "F"),
        ("the answer is [h]", "H"),
        ("Answer: K", None),  # past J: not a choice
        ("no choice here", None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_choice_answers_are_the_letters_a_to_j():
    from sftrl_jax.rewards import is_choice_answer

    assert all(is_choice_answer(letter) for letter in "ABCDEFGHIJ")
    assert all(is_choice_answer(form) for form in ("(J)", r"\text{I}", "$E$"))
    assert not any(is_choice_answer(other) for other in ("K", "Z", "AB", "1", "j2"))


@pytest.mark.parametrize(
    "response",
    [None, 5, "\\", "}" * 50 + "{" * 50, "\\boxed{" * 200, "\\frac{" * 100, "$" * 101, "\x00\uffff", "<think>" * 10],
)
def test_never_raises(response):
    assert compute_score(response, "1") == 0.0
    assert compute_score(response, "C", require_think=True) == 0.0
    assert compute_score("\\boxed{1}", response) in (0.0, 1.0)


def test_compute_score_off_main_thread():
    # math-verify's SIGALRM timeouts raise off the main thread; compute_score switches them off.
    out = []
    thread = threading.Thread(target=lambda: out.append(compute_score(r"\boxed{\frac12}", "0.5")))
    thread.start()
    thread.join()
    assert out == [1.0]


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, timeout_s=30) as p:
        yield p


def test_batch_equals_one_by_one(pool):
    responses, ground_truths, thinks, _ = zip(*CASES)
    expected = [compute_score(r, g, require_think=t) for r, g, t in zip(responses, ground_truths, thinks)]
    # score_batch takes one require_think for the whole batch: run each half separately.
    for flag in (False, True):
        idx = [i for i, t in enumerate(thinks) if t == flag]
        result = pool.score_batch([responses[i] for i in idx], [ground_truths[i] for i in idx], require_think=flag)
        assert isinstance(result, ScoreResult)
        assert result.scores == [expected[i] for i in idx]
        assert result.timed_out == [False] * len(idx) and result.num_timeouts == 0
    assert pool.score_batch([], []).scores == []


def _is_zombie_child(pid: int) -> bool:
    """True if ``pid`` is a dead but unreaped child of this process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
    except FileNotFoundError:
        return False
    return state == "Z" and int(ppid) == os.getpid()


# sympy evaluates this tower for far longer than any timeout (minutes; math-verify's own SIGALRM
# guard is off in the workers), so only the pool's process-level timeout can stop it.
TOWER = r"The answer is \boxed{9^{9^{9^{9^{9}}}}}."


def test_timeout_kills_and_recovers(caplog):
    with RewardPool(num_workers=2, timeout_s=2) as pool:
        pids_before = {w.process.pid for w in pool._workers}
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="sftrl_jax.rewards"):
            result = pool.score_batch(
                [TOWER, r"\boxed{\frac{1}{2}}", r"\boxed{3}", "The answer is 4"], ["1", "0.5", "4", "4"]
            )
        elapsed = time.monotonic() - start
        assert result.scores == [0.0, 1.0, 0.0, 1.0]
        assert result.timed_out == [True, False, False, False]
        assert result.num_timeouts == 1 and result.num_crashed == 0
        assert 2.0 <= elapsed < 10.0  # the tower really ran into the 2 s limit, and no longer
        assert any("timed out" in r.getMessage() and r.name == "sftrl_jax.rewards" for r in caplog.records)

        killed = pids_before - {w.process.pid for w in pool._workers}
        assert len(killed) == 1
        if os.path.isdir("/proc"):
            assert not any(_is_zombie_child(pid) for pid in killed)

        # The same pool keeps working, and a normal batch is scored correctly.
        responses, ground_truths, _, expected = zip(*[c for c in CASES if not c[2]][:12])
        again = pool.score_batch(responses, ground_truths)
        assert again.scores == list(expected) and again.num_timeouts == 0
        workers = [w.process for w in pool._workers]
    assert all(not p.is_alive() for p in workers)  # closed: every worker is stopped and reaped
    with pytest.raises(RuntimeError):
        pool.score_batch(["1"], ["1"])


def test_worker_crash_scores_zero_and_recovers():
    with RewardPool(num_workers=2, timeout_s=60) as pool:
        pool.wait_ready()
        victim = pool._workers[0].process  # receives item 0 (the tower), which keeps it busy
        killer = threading.Timer(1.0, victim.kill)
        killer.start()
        try:
            result = pool.score_batch([TOWER, r"\boxed{2}", r"\boxed{3}"], ["1", "2", "2"])
        finally:
            killer.cancel()
        assert result.scores == [0.0, 1.0, 0.0]
        assert result.num_crashed == 1 and result.num_timeouts == 0
        assert victim.exitcode is not None  # reaped
        assert pool.score_batch([r"\boxed{2}"] * 3, ["2"] * 3).scores == [1.0] * 3


# ----------------------------------------------------------------------------- degenerate output
# A model that fills its token budget with "\boxed{" (or other junk) must not stall anything that
# runs in the trainer's process: extraction is linear, the pool's log excerpt parses nothing, and a
# worker grading a hopeless item dies with the process that started it.

DEGENERATE = "\\boxed{" * 100000  # 700 KB


def _within(seconds: float, fn, *args):
    """``fn(*args)``, failing (not hanging) if it takes longer than ``seconds``."""
    out = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
    start = time.perf_counter()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"took over {seconds} s"
    assert out, "raised (see the thread's traceback above)"
    return out[0], time.perf_counter() - start


def _adversarial_mix(size: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    pieces = ["\\boxed{", "\\fbox{", "\\boxed ", "{", "}", "\\{", "\\}", "\\\\", "\\", " ", "$", "x", "\\frac{1}{"]
    out, n = [], 0
    while n < size:
        piece = rng.choice(pieces)
        out.append(piece)
        n += len(piece)
    return "".join(out)


def _reference_extract_boxed(text):
    """extract_boxed as it was: a brace scan from every box, last to first (quadratic, but plain)."""
    boxes = list(re.finditer(r"\\(?:boxed|fbox)(?![A-Za-z])", text))
    for match in reversed(boxes):
        i = j = match.end()
        while j < len(text) and text[j].isspace():
            j += 1
        if j < len(text) and text[j] == "{":
            depth, k = 0, j
            while k < len(text):
                if text[k] == "\\":
                    k += 2
                    continue
                depth += {"{": 1, "}": -1}.get(text[k], 0)
                if depth == 0:
                    return text[j + 1 : k]
                k += 1
        elif j > i:
            token = re.match(r"[^\s$]+", text[j:])
            if token:
                return token.group(0)
    return None


def test_extract_boxed_matches_reference_on_random_text():
    rng = random.Random(0)
    pieces = ["\\boxed", "\\fbox", "\\boxedx", "{", "}", "\\", "\\{", "\\}", "\\\\", " ", "\n", "$", "1", "\u00a0"]
    for _ in range(20000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert extract_boxed(text) == _reference_extract_boxed(text), text


def test_extract_boxed_linear_time():
    # Quadratic before: 21 KB of "\boxed{" took 4.4 s, 70 KB 47 s; 700 KB would take hours.
    # Each well under a second (about 0.1-0.3 s on a busy 2-core runner).
    assert _within(1.0, extract_boxed, DEGENERATE)[0] is None
    assert _within(1.0, extract_boxed, DEGENERATE + "\\boxed{7}")[0] == "7"
    assert _within(1.0, extract_boxed, "\\boxed{3}" + DEGENERATE)[0] == "3"  # the last complete one
    mix = _adversarial_mix(1 << 20)  # 1 MB
    _within(1.0, extract_boxed, mix)
    assert extract_boxed(mix[:5000]) == _reference_extract_boxed(mix[:5000])


# extract_choice's text pattern before it was made linear: "\s*:?\s*(...|\s)*" can split a run of
# spaces in cubically many ways ("answer" and 800 spaces: 8 s).
_OLD_TEXT_CHOICE = re.compile(
    r"(?i:answer)(?:\s+(?i:is))?\s*:?\s*(?:\*\*|\$|\\text(?:bf)?\{|\s)*(?:(?i:option|choice)\s*)?"
    r"(?:\(([A-Ja-j])\)|\[([A-Ja-j])\]|([A-J])(?![A-Za-z0-9]))"
)


def test_text_choice_pattern_unchanged_on_random_text():
    rng = random.Random(1)
    pieces = ["answer", "ANSWER", " is", " ", "\n", ":", "**", "*", "$", "\\text{", "option", "Choice", "(", ")",
              "[", "]", "C", "c", "I", "x", "B."]
    for _ in range(20000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        old = [(m.span(), m.groups()) for m in _OLD_TEXT_CHOICE.finditer(text)]
        assert [(m.span(), m.groups()) for m in math_reward._TEXT_CHOICE.finditer(text)] == old, text


def test_extract_choice_linear_time():
    assert _within(1.0, extract_choice, "The answer is" + " " * 1_000_000 + "x")[0] is None
    assert _within(1.0, extract_choice, "answer:" + " \\text{" * 100_000 + "(C)")[0] == "C"
    assert _within(1.0, extract_choice, DEGENERATE)[0] is None


def test_evaluation_extraction_is_bounded():
    from sftrl_jax.rewards import extract_answer

    def _extracted(response, truth, require_think):
        return extract_answer(response, truth, require_think=require_think)

    assert _within(1.0, _extracted, DEGENERATE, "1", False)[0] is None
    assert _within(1.0, _extracted, "</think>" + DEGENERATE + "\\boxed{7}", "7", True)[0] == "7"
    assert _within(1.0, _extracted, "</think>Answer:" + " " * 500_000 + "x", "C", True)[0] is None
    assert _within(1.0, _extracted, _adversarial_mix(1 << 20, seed=1), "C", False)[0] is None


def test_log_snippet_is_bounded():
    snippet, seconds = _within(5.0, _snippet, DEGENERATE * 10)
    assert seconds < 0.1 and len(snippet) < 200 and "boxed" in snippet
    assert _snippet(r"\boxed{1}") == repr(r"\boxed{1}")
    assert _snippet(None) == "<NoneType>"


def test_degenerate_response_times_out_promptly(caplog):
    # Before: on the timeout the pool's process ran the quadratic extract_boxed on the response
    # (to log it) before killing the worker, so this never returned.
    pool = RewardPool(num_workers=1, timeout_s=3)
    pool.wait_ready()
    try:
        with caplog.at_level(logging.WARNING, logger="sftrl_jax.rewards"):
            result, elapsed = _within(3.0 + 6.0, pool.score_batch, [DEGENERATE, r"\boxed{2}"], ["1", "2"])
    except AssertionError:  # stuck in score_batch, holding the pool's lock: close() would wait too
        for worker in pool._workers:
            worker.process.kill()
        raise
    with pool:
        assert result.scores == [0.0, 1.0] and result.timed_out == [True, False]
        assert result.num_timeouts == 1 and elapsed >= 3.0
        assert any("timed out" in r.getMessage() for r in caplog.records)


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie nobody has reaped yet counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


_OWNER = textwrap.dedent(
    """
    import sys, threading
    from sftrl_jax.rewards import RewardPool

    if __name__ == "__main__":
        pools = []
        make = lambda: pools.append(RewardPool(num_workers=1, timeout_s=3600))
        if sys.argv[1] == "thread":  # started from a thread that is gone by the time it grades
            thread = threading.Thread(target=make)
            thread.start()
            thread.join()
        else:
            make()
        pools[0].wait_ready()
        print(pools[0]._workers[0].process.pid, flush=True)
        pools[0].score_batch([sys.argv[2]], ["1"])
    """
)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")
@pytest.mark.parametrize("where", ["main", "thread"])
def test_worker_dies_with_its_parent(tmp_path, where):
    # The pool's process is killed (-9: no cleanup runs) while its worker is busy on an item sympy
    # never finishes; the worker must not run on as an orphan.
    script = tmp_path / "owner.py"
    script.write_text(_OWNER)
    owner = subprocess.Popen([sys.executable, str(script), where, TOWER], stdout=subprocess.PIPE, text=True)
    worker_pid = None
    try:
        worker_pid = int(owner.stdout.readline())
        time.sleep(1.5)  # the worker is now grading the tower
        assert not _gone(worker_pid)
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=30)
        deadline = time.monotonic() + 5.0
        while not _gone(worker_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(worker_pid)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if worker_pid is not None and not _gone(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)


def test_pool_started_in_finished_thread_keeps_its_workers():
    # The parent-death signal follows the thread that forks a worker: a pool made in a thread that
    # then finishes must keep its workers.
    pools = []
    thread = threading.Thread(target=lambda: pools.append(RewardPool(num_workers=1, timeout_s=30)))
    thread.start()
    thread.join()
    with pools[0] as pool:
        pool.wait_ready()
        pids = [w.process.pid for w in pool._workers]
        result = pool.score_batch([r"\boxed{2}", r"\boxed{3}"], ["2", "2"])
        assert result.scores == [1.0, 0.0] and result.num_crashed == 0
        assert [w.process.pid for w in pool._workers] == pids
