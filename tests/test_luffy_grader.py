"""``luffy_eval_score`` / ``reward.kind: luffy_eval``: the label LUFFY's published evaluation gives
(``eval_scripts/generate_vllm.py --add_oat_evaluate True``, which grades with OAT's
``boxed_reward_fn(fast=False)`` from ``eval_scripts/oat_math_grader.py``).

Each expected label below is what those two files give for a prompt ending in ``<think>\\n``; the
comment beside a case names the reference behaviour it pins. All of them were also checked against
the reference grader itself (run with pylatexenc 2.10 beside it, outside this repository).
"""

import contextlib
from pathlib import Path

import pandas as pd
import pytest

from sftrl_jax.config import RewardOptions
from sftrl_jax.rewards import REWARD_KINDS, RewardPool, luffy_eval_score, open_reward
from sftrl_jax.rewards.luffy_eval import (
    _is_repetitive,
    _last_boxed,
    _LatexText,
    _math_verify_equal,
    _mathd_normalize,
    _prm_normalize,
    _sympy_grade,
    _Unrenderable,
    luffy_answer,
    luffy_graded_text,
)

FIXTURES = Path(__file__).parent / "fixtures" / "luffy-eval"
SHARED = Path(__file__).parents[1].parent / "shared" / "data" / "luffy-eval"

CASES = [  # (response, ground truth, label)
    # -- the answer: the last \boxed{...}, nested braces counted
    (r"\boxed{1} so finally \boxed{2}", "2", 1.0),  # the last box wins ...
    (r"\boxed{1} so finally \boxed{2}", "1", 0.0),  # ... over an earlier one
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", 1.0),  # nested braces; \sqrt3 -> \sqrt{3}
    (r"\fbox{2}", "2", 0.0),  # \fbox is never read (only a text containing \boxed is searched)
    (r"\boxed{3} then \fbox{2}", "3", 1.0),  # ... so a later \fbox does not displace a \boxed
    ("The answer is 2.", "2", 0.0),  # no \boxed: 0, whatever the text says
    (r"\boxed{3} and \boxed{", "3", 0.0),  # an unclosed last box is not skipped: no answer
    (r"\boxed 3", "3", 0.0),  # \boxed without a brace: no answer
    (r"\boxed{}", "0", 0.0),
    # -- (a) MATH-style normalisation
    (r"\boxed{5 \text{ cm}}", "5", 1.0),  # a trailing \text{...} unit goes
    (r"\boxed{5 apples}", "5", 1.0),  # ... and so do MathQA unit words ("apple" + "s")
    (r"\boxed{\dfrac{3}{4}}", r"\frac34", 1.0),  # \dfrac -> \frac, \frac34 -> \frac{3}{4}
    (r"\boxed{ 7 }", "7", 1.0),  # spaces
    (r"\boxed{90^\circ}", "90", 1.0),  # ^\circ goes
    (r"\boxed{50\%}", "50", 1.0),  # \% goes
    (r"\boxed{0.5}", r"\frac12", 1.0),  # the string "0.5" is \frac{1}{2}
    (r"\boxed{1/2}", "0.5", 1.0),  # a/b -> \frac{a}{b}
    (r"\boxed{x=3}", "3", 1.0),  # "x=" (two characters at most) before the answer goes
    (r"\boxed{k = 3}", "3", 1.0),
    (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}", 1.0),  # a whole \text{...} is its content
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"(3,\frac{\pi}{2})", 1.0),  # \left, \right go
    # -- (b) PRM800K-style normalisation, then sympy element by element
    (r"\boxed{7.}", "7", 1.0),  # "7." is the float 7.0, an integer
    (r"\boxed{evelyn}", r"\text{Evelyn}", 1.0),  # lower case
    (r"\boxed{25}", "025", 1.0),
    (r"\boxed{1.60}", "1.6", 1.0),
    (r"\boxed{10{,}000}", "10000", 1.0),  # braces go, then the thousands comma
    (r"\boxed{x^2+2x+1}", "(x+1)^2", 1.0),  # sympy: equal expressions
    (r"\boxed{\sqrt{12}}", r"2\sqrt{3}", 1.0),
    (r"\boxed{3\frac{1}{2}}", r"\frac72", 1.0),  # a mixed number: "3 1/2" -> 3+1/2
    (r"\boxed{\pi/2}", r"\frac{\pi}{2}", 1.0),
    (r"\boxed{\frac{1}{2n+2}}", r"$\frac{1}{2 n+2}$", 1.0),  # $...$ in the ground truth
    (r"\boxed{(1,2)}", "[1,2]", 0.0),  # a tuple must keep its brackets
    (r"\boxed{4.5 \times 10^{33}}", "4.5e33", 0.0),  # no check reads \times 10^{33} as e33
    # -- (c) math-verify, when (a) and (b) fail
    (r"\boxed{2/4}", r"\frac12", 1.0),  # (b) refuses an unreduced fraction; math-verify accepts it
    (r"\boxed{abc=3}", "3", 1.0),  # (a) keeps "abc=", (b) has too many letters for sympy
    (r"\boxed{\{1,2\}}", r"\{2,1\}", 1.0),  # sets
    # -- </think>: the text between the first and the second </think>, or the whole response
    (r"<think>\boxed{1}</think> the answer is \boxed{2}", "2", 1.0),  # only after </think> counts
    (r"<think>\boxed{1}</think> the answer is \boxed{2}", "1", 0.0),
    (r"<think>\boxed{2}</think> so 2", "2", 0.0),  # a box in the thinking is not read
    (r"<think>thinking \boxed{2} never closed", "2", 1.0),  # no </think>: the whole response
    (r"a</think>\boxed{1}</think>\boxed{2}", "1", 1.0),  # split("</think>")[1]: up to a second one
    (r"a</think>\boxed{1}</think>\boxed{2}", "2", 0.0),
    # -- multiple choice: a letter is an answer like any other
    (r"\boxed{C}", "C", 1.0),
    ("the answer is (C)", "C", 0.0),  # no box
    (r"\boxed{B}", "C", 0.0),
    (r"\boxed{\text{C}}", "C", 1.0),  # (a): \text{C} -> C
    (r"\boxed{c}", "C", 1.0),  # (b): lower case
    (r"\boxed{(C)}", "C", 1.0),  # (b): "(c)" is the one-element tuple c
    (r"\boxed{\textbf{(C)}}", "C", 1.0),
    (r"\boxed{C. 42}", "C", 0.0),  # no letter is picked out of a longer answer
    # -- ground truths in other forms
    (r"\boxed{5}", r"\boxed{5}", 1.0),  # a boxed ground truth is its box's content
]


@pytest.mark.parametrize(("response", "ground_truth", "label"), CASES)
def test_luffy_eval_label(response, ground_truth, label):
    assert luffy_eval_score(response, ground_truth) == label


def test_ground_truth_types():
    assert luffy_eval_score(r"\boxed{5}", 5) == 1.0 and luffy_eval_score(r"\boxed{0.5}", 0.5) == 1.0
    assert luffy_eval_score(r"\boxed{5}", ["4", "5"]) == 1.0 and luffy_eval_score(r"\boxed{6}", ["4", "5"]) == 0.0
    assert luffy_eval_score(None, "5") == 0.0
    with pytest.raises(TypeError):
        luffy_eval_score(r"\boxed{5}", None)


def test_graded_text_and_answer():
    assert luffy_graded_text("no think") == "no think"
    assert luffy_graded_text("a</think>b") == "b"
    assert luffy_graded_text("a</think>b</think>c") == "b"
    assert luffy_answer(r"<think>\boxed{1}</think>\boxed{\frac{1}{2}} and \boxed{3}") == "3"
    # braces are counted from the last \boxed on, escaped or not
    assert _last_boxed(r"\boxed{\{1,2\}}") == r"\{1,2\}"
    assert _last_boxed(r"\boxed{a} \boxedx{b}") is None  # the last "\boxed" is not "\boxed{"
    assert _last_boxed(r"\boxed{a}}") == "a"


@pytest.mark.parametrize(("answer", "normalized"), [
    (r"\text{ 5 }", "5"),
    (r"\dfrac12", r"\frac{1}{2}"),
    (r"\tfrac{1}{2}", r"\frac{1}{2}"),
    ("3/4", r"\frac{3}{4}"),
    ("03/4", "03/4"),  # not an integer written plainly
    ("0.5", r"\frac{1}{2}"),
    (".5", r"\frac{1}{2}"),  # ".5" -> "0.5" -> \frac{1}{2}
    (r"x \le 3", r"x\le3"),
    (r"x \leq 3", r"x\le3"),
    (r"\$18.90", "18.90"),
    (r"10\text{ dollars}", "10"),
    (r"\sqrt3+1", r"\sqrt{3}+1"),
    (r"abc = 3", "abc=3"),
    (r"\begin{array}{cc} 1 & 2 \end{array}", r"\begin{pmatrix}1&2\end{pmatrix}"),
    (r"2\sqrt", r"2\sqrt"),  # unreadable (\sqrt at the end): the stripped input is kept
    (r"5 \text{ m} \text{ s}", "5"),  # from the first \text{ on, when the string ends with "}"
    (r"5 \text{ m} \text{ s} x", r"5 \text{ m} \text{ s} x"),  # two "\text{ " units: unreadable, kept
])
def test_mathd_normalisation(answer, normalized):
    assert _mathd_normalize(answer) == normalized


@pytest.mark.parametrize(("expr", "normalized"), [
    ("2 million", "2*10^6"),
    (r"5\%", "5"),
    ("3 inches", "3"),
    (r"90^\circ", "90"),
    (r"\frac{1}{2}", "1/2"),
    (r"3\frac{1}{2}", "3+1/2"),
    (r"2\sqrt{3}", "2sqrt(3)"),
    (r"\pi \cdot r", "pi*r"),
    (r"(-\infty, 3) \cup (4, 5)", "(-inf,3)u(4,5)"),
    ("1,000,000", "1000000"),
    ("3.0", "3"),
    ("Evelyn", "evelyn"),
])
def test_prm_normalisation(expr, normalized):
    assert _prm_normalize(expr) == normalized


def test_sympy_and_math_verify_checks():
    assert _sympy_grade("x^2+2x+1", "(x+1)^2")
    assert not _sympy_grade("2/4", "1/2")  # unreduced fractions are compared as strings
    assert not _sympy_grade("3.5", "3")  # an integer needs an integer
    assert not _sympy_grade("(1,2,3)", "(1,2)")
    assert _math_verify_equal("2/4", r"\frac{1}{2}")
    assert not _math_verify_equal("3", "4")
    # a repetitive answer longer than 128 characters is never given to math-verify
    assert not _math_verify_equal("1" * 129, "1" * 129)


@pytest.mark.parametrize(("latex", "text"), [  # as pylatexenc 2.10's LatexNodes2Text renders them
    (r" \frac{1}{2}", " 1/2"),
    (r"2\sqrt{3}", "2√(3)"),
    (r"\sqrt[3]{2}", "√(2)"),
    (r"\frac 1 2", "1/2"),
    (r"(-\infty, 3) \cup (4,5)", "(-∞, 3) ∪(4,5)"),
    (r"3 \cdot 4\times 5", "3 ·4×5"),
    (r"\text{ab} c", "ab c"),
    (r"\left( 1,2 \right)", "( 1,2 )"),
    (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", "[ 1 2; 3 4 ]"),
    (r"\begin{array}{cc}1&22\end{array}", "[  1 22 ]"),
    (r"\mathbb{R}\mathbf{x}", "ℝ𝐱"),
    (r"\hat{x}\not=", "x̂≠"),
    (r"\alpha\epsilon\varepsilon\phi\varphi", "αϵεϕφ"),
    (r"\ne \cot \triangle", ""),  # not in pylatexenc's tables: nothing (nor the spaces after them)
    (r"\binom{5}{2}", "52"),  # \binom takes no arguments there: its groups follow
    (r"\texttt{x}\mbox{y}\label{z}", ""),  # arguments read, nothing shown
    (r"\frac{1}", "%s/%s1"),  # arguments cut off by the end: the template, then the group
    (r"{\frac{1}}", "1/"),
    (r"1}}", "1"),  # a brace that closes nothing is dropped
    (r"a\\b", "a\nb"),
    (r"\, 3\quad5", "  3  5"),
])
def test_latex_rendering(latex, text):
    assert _LatexText(latex).render() == text


@pytest.mark.parametrize(("latex", "normalized"), [
    (r"\sqrt", r"\sqrt"),
    (r"\begin{pmatrix}\end{pmatrix}", r"\beginpmatrix\endpmatrix"),
    (r"a\begin b", r"a\beginb"),
])
def test_latex_that_pylatexenc_cannot_render(latex, normalized):
    with pytest.raises(_Unrenderable):
        _LatexText(latex).render()
    assert _prm_normalize(latex) == normalized  # the PRM800K normalisation goes on with the LaTeX as it was


def _naive_repetitive(text: str) -> bool:
    if len(text) <= 1:
        return False
    suffixes = sorted(text[i:] for i in range(len(text)))
    total = 0
    for a, b in zip(suffixes, suffixes[1:]):
        common = 0
        while common < min(len(a), len(b)) and a[common] == b[common]:
            common += 1
        total += common
    n = len(text)
    return total * 2 / (n * (n + 1)) > 0.2


@pytest.mark.parametrize("text", [
    "", "a", "ab" * 100, "abcdefghij" * 20, "x" * 130, "aab" * 3 + "b" * 150,
    "".join(chr(33 + (i * 37) % 90) for i in range(200)),
    r"\omega_{n}^{2} e^{-\zeta \omega_{n} t} \cos \left(\omega_{n} \sqrt{1-\zeta^{2}} t\right)",
])
def test_repetition_measure(text):
    assert _is_repetitive(text) == _naive_repetitive(text)


def _ground_truths(folder: Path) -> list[tuple[str, str]]:
    rows = []
    for path in sorted(folder.glob("*.parquet")):
        frame = pd.read_parquet(path)
        rows += [(path.name, row["ground_truth"]) for row in frame["reward_model"]]
    return rows


def test_every_fixture_gold_answer_grades_itself():
    rows = _ground_truths(FIXTURES)
    assert len(rows) == 38 + 12 + 4 + 4
    wrong = [(name, gold) for name, gold in rows if luffy_eval_score("\\boxed{" + gold + "}", gold) != 1.0]
    assert wrong == []


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/luffy-eval is not beside this checkout")
def test_every_shared_gold_answer_grades_itself():
    golds = sorted({gold for _, gold in _ground_truths(SHARED)})
    wrong = [gold for gold in golds if luffy_eval_score("\\boxed{" + gold + "}", gold) != 1.0]
    assert wrong == []


# ------------------------------------------------------------------------------------------ the kind

POOL_ITEMS = [  # (response, ground truth, label), graded the same with and without reward.require_think
    (r"<think>\boxed{1}</think> so \boxed{2}", "2", 1.0),
    (r"no think, \boxed{2}", "2", 1.0),  # require_think would score this 0; LUFFY grades all of it
    (r"\boxed{2/4}", r"\frac{1}{2}", 1.0),
    ("the answer is (C)", "C", 0.0),
    (r"\boxed{C}", "C", 1.0),
    (r"\fbox{3}", "3", 0.0),
]


def test_luffy_eval_kind_is_registered():
    kind = REWARD_KINDS["luffy_eval"]
    assert kind.whole_response and not kind.takes_function
    assert RewardOptions(kind="luffy_eval").kind == "luffy_eval"


@pytest.mark.parametrize("require_think", [False, True])
def test_luffy_eval_kind_through_the_pool(require_think):
    responses, truths, labels = map(list, zip(*POOL_ITEMS))
    with contextlib.ExitStack() as stack:
        options = RewardOptions(kind="luffy_eval", num_workers=1, require_think=require_think, timeout_s=60.0)
        reward = open_reward(options, stack)
        assert isinstance(reward.pool, RewardPool) and reward.pool.kind == "luffy_eval"
        result = reward.score_batch(responses, truths)
        assert result.scores == labels
        assert result.scores == [luffy_eval_score(r, g) for r, g in zip(responses, truths)]
        assert result.num_errors == 0 and result.num_timeouts == 0
        # what evaluation records show as the answer: the box LUFFY reads
        assert [reward.answer(r, g) for r, g in zip(responses, truths)] == ["2", "2", "2/4", None, "C", None]
