"""Rewards: boxed-answer extraction, math-verify grading, the think rule, multiple choice, and the
worker pool's hard per-item timeout."""

import logging
import os
import threading
import time

import pytest

from sftrl_jax.rewards import RewardPool, ScoreResult, compute_score, extract_boxed, extract_choice

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
    # --- degenerate inputs ----------------------------------------------------------------------
    ("", "5", False, 0.0),
    (r"\boxed{5}", "", False, 0.0),
    (r"\boxed{\frac{1}{}", "1", False, 0.0),
]


@pytest.mark.parametrize("response,ground_truth,require_think,expected", CASES)
def test_compute_score_table(response, ground_truth, require_think, expected):
    assert compute_score(response, ground_truth, require_think=require_think) == expected


def test_table_size():
    assert len(CASES) >= 40


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
        ("no choice here", None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


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
