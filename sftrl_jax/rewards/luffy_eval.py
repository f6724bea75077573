"""LUFFY's published evaluation label: :func:`luffy_eval_score`.

The label that LUFFY's evaluation (github ElliottYan/LUFFY at 01f4ae0, ``eval_scripts/generate_vllm.py``
run with ``--remove_system True --add_oat_evaluate True``) gives a response to a prompt ending in
``<think>\\n``. With those flags the script's math-verify label is replaced by OAT's grader,
``boxed_reward_fn(text, ground_truth, fast=False)`` from the vendored ``eval_scripts/oat_math_grader.py``.
This module is written from a reading of those two files; it reproduces what they do, step by step:

1. The graded text (:func:`luffy_graded_text`): the script prefixes ``<think>\\n`` and keeps
   ``text.split("</think>")[1]``, the text between the first and the second ``</think>``; with no
   ``</think>`` it grades the whole response.
2. The answer (:func:`luffy_answer`): the content of the last ``\\boxed{...}`` (nested braces counted),
   found from the last occurrence of ``\\boxed``. No ``\\boxed`` at all, an unclosed last box or a
   ``\\boxed`` not followed by ``{`` scores 0. ``\\fbox`` is never read (the grader only looks for a
   box when the text contains ``\\boxed``, and then always at the last ``\\boxed``).
3. The answer equals the ground truth (itself the content of its last box if it has one) when any
   of three checks passes, in order:

   a. MATH-style (Hendrycks) normalisation of both strings gives the same string (``_mathd_normalize``);
   b. PRM800K-style normalisation (``_prm_normalize``: units and ``$``/``%`` dropped, LaTeX rendered
      as text, lower case) gives the same string, or the two split into the same number of tuple
      elements which sympy finds equal one by one (``_sympy_grade``);
   c. math-verify finds them equal (``_math_verify_equal``), unless either string is longer than 128
      characters and repetitive.

   Multiple choice needs nothing special: ``\\boxed{C}`` equals ``C`` under (a); ``\\boxed{c}`` and
   ``\\boxed{(C)}`` pass (b); "the answer is (C)" with no box scores 0.

Differences from the reference, each forced by the environment:

- The PRM800K normalisation renders LaTeX as text with pylatexenc 2.10's ``LatexNodes2Text``, which
  is not a dependency here. ``_LatexText`` is a small renderer written to give the same text for the
  LaTeX found in math answers (fractions, roots, ``\\text``-style and font macros, accents, Greek,
  the common operator symbols, ``\\left``/``\\right``, matrices); pylatexenc's table of about a
  thousand rarer symbols is not reproduced (they render as nothing here). This only matters where
  checks (a) and (c) both fail.
- math-verify and sympy are the installed versions (the reference pins math-verify 0.6.0 and sympy
  1.13.3); check (c) calls math-verify with the reference's arguments.
- Time limits: the reference's math-verify calls have one second each (check (c) also starts under
  a one-second SIGALRM, which the first of them cancels) and nothing else has a limit. Here the
  math-verify calls get the same one-second limits (in a process's main thread; elsewhere none),
  and the grading pool's per-item timeout bounds the rest (a sympy ``simplify`` that would run for
  minutes scores 0 instead of stalling). A label decided by a one-second limit depends on the
  machine's speed, in the reference as here.
- A ground truth that is not a string, number or list raises TypeError (the reference fails with
  UnboundLocalError).
"""

from __future__ import annotations

import functools
import re
import threading
import unicodedata

__all__ = ["luffy_answer", "luffy_eval_score", "luffy_graded_text"]


# ----------------------------------------------------------------------------- graded text and answer

_THINK_END = "</think>"
_BOX_OPEN = "\\boxed{"
_BRACES = re.compile(r"[{}]")


def luffy_graded_text(response: str) -> str:
    """The part of ``response`` LUFFY's evaluation grades: the text between the first and the second
    ``</think>`` (to the end when there is one), or all of it when there is none."""
    parts = response.split(_THINK_END, 2)
    return parts[1] if len(parts) > 1 else response


def _last_boxed(text: str) -> str | None:
    """Content of the box that starts at the last ``\\boxed`` in ``text``, or None.

    Braces are counted from that ``\\boxed`` on, escaped or not; the box ends at the first ``}`` that
    brings the count back to zero. None when there is no ``\\boxed``, the count never returns to zero,
    or the box does not start ``\\boxed{`` (``\\boxed 5``, ``\\boxedA{..}``).
    """
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    depth = 0
    for match in _BRACES.finditer(text, start):
        if match.group() == "{":
            depth += 1
            continue
        depth -= 1
        if depth == 0:
            box = text[start : match.end()]
            return box[len(_BOX_OPEN) : -1] if box.startswith(_BOX_OPEN) else None
    return None


def luffy_answer(response: str) -> str | None:
    """The answer LUFFY's evaluation reads from ``response``: its graded text's last ``\\boxed{}``."""
    return _last_boxed(luffy_graded_text(response))


def luffy_eval_score(response: str, ground_truth) -> float:
    """1.0 when LUFFY's evaluation labels ``response`` correct for ``ground_truth``, else 0.0.

    ``ground_truth``: a string (bare LaTeX, possibly ``$``-delimited or boxed), an int or float (read
    as ``str()``), or a list or tuple of those (correct when any one matches). See the module docstring
    for the steps.
    """
    if isinstance(ground_truth, (list, tuple)):
        truths = [str(t) if isinstance(t, (int, float)) else t for t in ground_truth]
    elif isinstance(ground_truth, (str, int, float)):
        truths = [str(ground_truth)]
    else:
        raise TypeError(f"ground truth must be a string, a number or a list, not {type(ground_truth).__name__}")
    if not isinstance(response, str):
        return 0.0
    answer = luffy_answer(response)
    if answer is None:
        return 0.0
    return 1.0 if any(_grade(answer, truth) for truth in truths) else 0.0


def _grade(answer: str, ground_truth: str) -> bool:
    if "\\boxed" in ground_truth:
        ground_truth = _last_boxed(ground_truth)
        if ground_truth is None:
            return False
    return (_mathd_normalize(answer) == _mathd_normalize(ground_truth)
            or _sympy_grade(answer, ground_truth)
            or _math_verify_equal(answer, ground_truth))


# ----------------------------------------------------------------------------- (a) MATH normalisation


class _Unreadable(Exception):
    """A step of the MATH normalisation cannot read the string; the normalisation then returns the
    string as it was before those steps."""


# Whole answer in \text{...}: its content is the answer.
_TEXT_WRAPPED = re.compile(r"^\\text\{(?P<text>.+?)\}$")
_ARRAY_BEGIN = re.compile(r"\\begin\{array\}\{.*?\}")
_ARRAY_END = re.compile(r"\\end\{array\}")
# A trailing \text{...} (a unit): from the first \text{ on, when the string ends in "}".
_TEXT_TAIL = re.compile(r"\\text\{.*?\}$")

# Unit words (mostly MathQA's) removed where they stand alone (between the ends of the string and
# non-word characters), in this order, then the same words with an "s", the whole list twice. They
# are regular expressions: "." matches any character. One word a line, spaces inside a word kept.
_UNIT_WORDS = """\
east
degree
mph
kmph
ft
m sqaure
 m east
sq m
deg
mile
q .
monkey
prime
ratio
profit of rs
rd
o
gm
p . m
lb
tile
per
dm
lt
gain
ab
way
west
a .
b .
c .
d .
e .
f .
g .
h .
t
a
h
no change
men
soldier
pie
bc
excess
st
inches
noon
percent
by
gal
kmh
c
acre
rise
a . m
th
π r 2
sq
mark
l
toy
coin
sq . m
gallon
° f
profit
minw
yr
women
feet
am
pm
hr
cu cm
square
v â € ™
are
rupee
rounds
cubic
cc
mtr
s
ohm
number
kmph
day
hour
minute
min
second
man
woman
sec
cube
mt
sq inch
mp
∏ cm ³
hectare
more
sec
unit
cu . m
cm 2
rs .
rs
kg
g
month
km
m
cm
mm
apple
liter
loss
yard
pure
year
increase
decrease
d
less
Surface
litre
pi sq m
s .
metre
meter
inch""".split("\n")
_UNIT_PATTERNS = tuple(re.compile(r"(^|\W)" + word + r"($|\W)")
                       for word in _UNIT_WORDS + [word + "s" for word in _UNIT_WORDS])


def _mathd_normalize(answer: str) -> str:
    """MATH-style normalisation: the answer in the form two equal answers share."""
    answer = answer.strip()
    match = _TEXT_WRAPPED.search(answer)
    if match is not None:
        answer = match.group("text").strip()
    try:
        return _mathd_steps(answer)
    except _Unreadable:
        return answer


def _mathd_steps(s: str) -> str:
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = _ARRAY_END.sub(r"\\end{pmatrix}", _ARRAY_BEGIN.sub(r"\\begin{pmatrix}", s))
    s = s.replace("bmatrix", "pmatrix").replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
    s = s.replace("\\left", "").replace("\\right", "")
    # A trailing \text{...} goes unless nothing would be left; the strip applies whenever the
    # result differs (so surrounding spaces go too).
    without_tail = _TEXT_TAIL.sub("", s).strip()
    if without_tail and without_tail != s:
        s = without_tail
    for _ in range(2):
        for pattern in _UNIT_PATTERNS:
            removed = pattern.sub(r"\1\2", s)
            if removed:
                s = removed
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    if "\\text{ " in s:  # a unit after "\text{ ": what precedes it is the answer
        pieces = s.split("\\text{ ")
        if len(pieces) != 2:
            raise _Unreadable
        s = pieces[0]
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "x = 3", "k=3" -> "3"
        s = sides[1]
    s = _mathd_braced_sqrt(s).replace(" ", "")
    s = _mathd_braced_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _mathd_slash_fraction(s)


def _mathd_braced_sqrt(s: str) -> str:
    r"""``\sqrt3`` -> ``\sqrt{3}`` (one character); a ``\sqrt`` at the very end is unreadable."""
    pieces = s.split("\\sqrt")
    out = pieces[0]
    for piece in pieces[1:]:
        if not piece:
            raise _Unreadable
        out += "\\sqrt" + (piece if piece[0] == "{" else "{" + piece[0] + "}" + piece[1:])
    return out


def _mathd_braced_fracs(s: str) -> str:
    r"""``\frac12`` -> ``\frac{1}{2}``, ``\frac1{72}`` -> ``\frac{1}{72}`` (single characters).

    A ``\frac`` followed by one character leaves the whole string as it was; one at the very end is
    unreadable.
    """
    pieces = s.split("\\frac")
    out = pieces[0]
    for piece in pieces[1:]:
        out += "\\frac"
        if not piece:
            raise _Unreadable
        if piece[0] == "{":
            out += piece
        elif len(piece) < 2:
            return s
        elif piece[1] != "{":
            out += "{" + piece[0] + "}{" + piece[1] + "}" + piece[2:]
        else:
            out += "{" + piece[0] + "}" + piece[1:]
    return out


def _mathd_slash_fraction(s: str) -> str:
    r"""``3/4`` -> ``\frac{3}{4}`` when both sides are integers written plainly."""
    sides = s.split("/")
    if len(sides) != 2:
        return s
    try:
        a, b = int(sides[0]), int(sides[1])
    except ValueError:
        return s
    if s != f"{a}/{b}":
        return s
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


# ----------------------------------------------------------------------------- (b) PRM800K + sympy

_PRM_UNITS = ("degree", "cm", "centimeter", "meter", "mile", "second", "minute", "hour", "day", "week",
              "month", "year", "foot", "feet", "inch", "yard")
_PRM_UNIT_PATTERNS = tuple(re.compile(unit + r"(es)?(s)? *(\^[0-9]+)?") for unit in _PRM_UNITS)
_CARET_CIRC = re.compile(r"\^ *\\circ")
_THIN_SPACE_COMMA = re.compile(r",\\! *")
_MINUS_SPACES = re.compile(r"- *")
_MIXED_NUMBER = re.compile(r"([0-9]) +([0-9])")  # "7 3/4" -> "7+3/4"
_THOUSANDS_COMMA = re.compile(r"(\d)(,)(\d\d\d)($|\D)")
_PLAIN_FRACTION = re.compile(r"^-?[0-9]+.?/0*[1-9][0-9]*.?$")
_TUPLE_CHARS = "()[]"
# sympy may hang on these: such answers are not given to it
_POWER_GROUPS = ("^{", "^(")
_LONG_POWERS = (re.compile(r"\^[0-9]+\^"), re.compile(r"\^[0-9][0-9]+"))
# After rendering LaTeX as text: the characters the sympy parser reads differently.
_TEXT_SYMBOLS = (("√", "sqrt"), ("π", "pi"), ("∞", "inf"), ("∪", "U"), ("·", "*"), ("×", "*"))


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_int(x: float) -> bool:
    try:
        return abs(x - int(round(x))) <= 1e-7
    except (ValueError, OverflowError):  # NaN, infinity
        return False


def _strip_thousands_commas(text: str) -> str:
    while True:
        stripped = _THOUSANDS_COMMA.sub(r"\1\3\4", text)
        if stripped == text:
            return stripped
        text = stripped


def _str_is_int(text: str) -> bool:
    try:
        return _is_int(float(_strip_thousands_commas(text)))
    except ValueError:
        return False


def _str_to_int(text: str) -> int:
    return int(float(text.replace(",", "")))  # truncates: "2.99999999" -> 2


def _prm_normalize(expr: str) -> str:
    """PRM800K-style normalisation: the answer as a plain, lower-case expression string."""
    match = _TEXT_WRAPPED.search(expr)
    if match is not None:
        expr = match.group("text")
    expr = expr.replace("\\%", "%").replace("\\$", "$").replace("$", "").replace("%", "")
    expr = expr.replace(" or ", " , ").replace(" and ", " , ")
    expr = expr.replace("million", "*10^6").replace("billion", "*10^9").replace("trillion", "*10^12")
    for pattern in _PRM_UNIT_PATTERNS:
        expr = pattern.sub("", expr)
    expr = _CARET_CIRC.sub("", expr)
    if expr and expr[0] == "{" and expr[-1] == "}":
        expr = expr[1:-1]
    expr = _THIN_SPACE_COMMA.sub("", expr)
    if _is_float(expr) and _is_int(float(expr)):
        expr = str(int(round(float(expr))))
    if "\\" in expr:
        try:
            expr = _latex_as_text(expr)
        except (_Unrenderable, RecursionError):  # kept as it was
            pass
    expr = _MINUS_SPACES.sub("-", expr)
    expr = _MIXED_NUMBER.sub(r"\1+\2", expr)
    expr = expr.replace(" ", "").replace("{", "").replace("}", "").lower()
    if _str_is_int(expr):
        expr = str(_str_to_int(expr))
    return expr


def _latex_as_text(expr: str) -> str:
    expr = expr.replace("\\tfrac", "\\frac").replace("\\dfrac", "\\frac")
    expr = expr.replace("\\frac", " \\frac")  # "3\frac12" becomes the mixed number "3 1/2"
    expr = _LatexText(expr).render()
    for symbol, name in _TEXT_SYMBOLS:
        expr = expr.replace(symbol, name)
    return expr.strip()


def _split_tuple(expr: str) -> list[str]:
    """The elements of a tuple or interval ``(a,b)`` / ``[a,b)`` (no brackets inside), else ``[expr]``."""
    expr = _strip_thousands_commas(expr)
    if not expr:
        return []
    if (len(expr) > 2 and expr[0] in _TUPLE_CHARS and expr[-1] in _TUPLE_CHARS
            and not any(ch in expr[1:-1] for ch in _TUPLE_CHARS)):
        return [element.strip() for element in expr[1:-1].split(",")]
    return [expr]


def _sympy_allowed(expr: str) -> bool:
    letters = {ch for ch in expr.replace("sqrt", "").replace("frac", "") if ch.isalpha()}
    if len(letters) > 2:  # text, or a function of more than two variables
        return False
    if any(group in expr for group in _POWER_GROUPS):
        return False
    return not any(pattern.search(expr) for pattern in _LONG_POWERS)


def _sympy_equal(ground_truth: str, given: str) -> bool:
    expr = f"({ground_truth})-({given})"
    if not _sympy_allowed(expr):
        return False
    try:
        import sympy
        from sympy.parsing import sympy_parser

        transformations = sympy_parser.standard_transformations + (sympy_parser.implicit_multiplication_application,)
        difference = sympy_parser.parse_expr(expr.replace("^", "**"), transformations=transformations)
        return sympy.simplify(difference) == 0
    except Exception:  # noqa: BLE001 - anything sympy cannot read or simplify is "not equal"
        return False


def _sympy_grade(given: str, ground_truth: str) -> bool:
    truth = _prm_normalize(ground_truth)
    answer = _prm_normalize(given)
    if truth == answer:
        return True
    if not answer:
        return False
    truth_elements = _split_tuple(truth)
    answer_elements = _split_tuple(answer)
    # A tuple must keep its brackets ("(1,2)" is not "[1,2)") and its length.
    if len(truth_elements) > 1 and (truth[0] != answer[0] or truth[-1] != answer[-1]):
        return False
    if len(truth_elements) != len(answer_elements):
        return False
    for truth_element, answer_element in zip(truth_elements, answer_elements):
        if _PLAIN_FRACTION.search(truth_element) and _PLAIN_FRACTION.search(answer_element):
            equal = truth_element == answer_element  # an unreduced fraction is not the reduced one
        elif _str_is_int(truth_element) != _str_is_int(answer_element):
            equal = False  # an integer must be matched by an integer
        else:
            equal = _sympy_equal(truth_element, answer_element)
        if not equal:
            return False
    return True


# ----------------------------------------------------------------------------- (c) math-verify


def _is_repetitive(text: str) -> bool:
    """True when the longest common prefixes of ``text``'s sorted adjacent suffixes add up to more
    than a fifth of the number of character pairs ``n (n + 1) / 2``."""
    n = len(text)
    if n <= 1:
        return False
    order = _suffix_array(text)
    rank = [0] * n
    for position, suffix in enumerate(order):
        rank[suffix] = position
    # Kasai: the common prefix with the preceding suffix in sorted order, in text order.
    total = common = 0
    for i in range(n):
        if rank[i] == 0:
            common = 0
            continue
        j = order[rank[i] - 1]
        while i + common < n and j + common < n and text[i + common] == text[j + common]:
            common += 1
        total += common
        if common:
            common -= 1
    return total * 2 / (n * (n + 1)) > 0.2


def _suffix_array(text: str) -> list[int]:
    """Start positions of ``text``'s suffixes in sorted order (prefix doubling)."""
    n = len(text)
    rank = [ord(ch) for ch in text]
    order = list(range(n))
    width = 1
    while True:
        # order by the first 2 * width characters: (rank of the first width, rank of the next width)
        keys = [(rank[i], rank[i + width] if i + width < n else -1) for i in range(n)]
        order.sort(key=keys.__getitem__)
        rank = [0] * n
        for previous, current in zip(order, order[1:]):
            rank[current] = rank[previous] + (keys[previous] != keys[current])
        if rank[order[-1]] == n - 1:  # all distinct: sorted
            return order
        width *= 2


@functools.lru_cache(maxsize=1)
def _math_verify_config():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


def _math_verify_equal(given: str, ground_truth: str) -> bool:
    """math-verify's verdict on the two strings (each wrapped in ``$...$`` unless it has a ``$``).

    The reference first compares the PRM800K normalisations again; check (b) has already done that.
    """
    if (len(given) > 128 and _is_repetitive(given)) or (len(ground_truth) > 128 and _is_repetitive(ground_truth)):
        return False
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    # math-verify's signal-based limits only work in a process's main thread.
    limit = 1 if threading.current_thread() is threading.main_thread() else None
    config = _math_verify_config()

    def read(text: str) -> list:
        # extraction_mode is a list as in the reference (math-verify expects a string there, so this
        # reads as its default, "any_match").
        return parse(text if "$" in text else f"${text}$", extraction_config=config, fallback_mode="no_fallback",
                     extraction_mode=["first_match"], parsing_timeout=limit)

    try:
        return bool(verify(read(ground_truth), read(given), timeout_seconds=limit))
    except (Exception, TimeoutException):  # noqa: BLE001 - TimeoutException is a BaseException
        return False


# ----------------------------------------------------------------------------- LaTeX as text


class _Unrenderable(Exception):
    """pylatexenc fails on the source (``\\sqrt`` with no argument, ``\\begin`` / ``\\end`` with no name,
    an empty matrix); the PRM800K normalisation then goes on with the LaTeX unrendered."""


# Macros without arguments -> text. Unknown macros render as nothing.
_SYMBOLS: dict[str, str] = dict(line.split(" ", 1) for line in """\
hbar ħ
ell ℓ
forall ∀
complement ∁
partial ∂
exists ∃
nexists ∄
varnothing ∅
emptyset ∅
aleph ℵ
nabla ∇
in ∈
notin ∉
ni ∋
prod ∏
coprod ∐
sum ∑
setminus ∖
smallsetminus ∖
ast ∗
circ ∘
bullet ∙
propto ∝
infty ∞
parallel ∥
nparallel ∦
wedge ∧
vee ∨
cap ∩
cup ∪
int ∫
iint ∬
iiint ∭
oint ∮
sim ∼
backsim ∽
simeq ≃
approx ≈
neq ≠
equiv ≡
le ≤
ge ≥
leq ≤
geq ≥
leqslant ⩽
geqslant ⩾
leqq ≦
geqq ≧
lneqq ≨
gneqq ≩
ll ≪
gg ≫
nless ≮
ngtr ≯
nleq ≰
ngeq ≱
lesssim ≲
gtrsim ≳
lessgtr ≶
gtrless ≷
prec ≺
succ ≻
preceq ≼
succeq ≽
precsim ≾
succsim ≿
nprec ⊀
nsucc ⊁
subset ⊂
supset ⊃
subseteq ⊆
supseteq ⊇
nsubseteq ⊈
nsupseteq ⊉
subsetneq ⊊
supsetneq ⊋
cdot ·
times ×
otimes ⊗
oplus ⊕
bigotimes ⊗
bigoplus ⊕
cos cos
sin sin
tan tan
arccos arccos
arcsin arcsin
arctan arctan
cosh cosh
sinh sinh
tanh tanh
arccosh arccosh
arcsinh arcsinh
arctanh arctanh
ln ln
log log
exp exp
max max
min min
sup sup
inf inf
lim lim
limsup lim sup
liminf lim inf
prime '
dag †
dagger †
pm ±
mp ∓
textpm ±
textmp ∓
ldots …
cdots ⋯
ddots ⋱
iddots ⋰
vdots ⋮
dots …
dotsc …
dotsb …
dotsm …
dotsi …
dotso …
langle ⟨
rangle ⟩
lvert |
rvert |
vert |
lVert ‖
rVert ‖
Vert ‖
mid |
nmid ∤
uparrow ↑
downarrow ↓
rightarrow →
to →
leftarrow ←
longrightarrow ⟶
longleftarrow ⟵
div ÷
Rightarrow ⇒
Leftarrow ⇐
Leftrightarrow ⇔
leftrightarrow ↔
Longrightarrow ⟹
Longleftarrow ⟸
Longleftrightarrow ⟺
longleftrightarrow ⟷
perp ⊥
angle ∠
measuredangle ∡
sphericalangle ∢
cong ≅
square □
star ⋆
bigcup ⋃
bigcap ⋂
lnot ¬
mapsto ↦
therefore ∴
because ∵
lbrace {
rbrace }
lceil ⌈
rceil ⌉
lfloor ⌊
rfloor ⌋
bigtriangleup △
top ⊤
surd √
textdegree °
mho ℧
vdash ⊢
dashv ⊣
backslash \\
textbackslash \\
texteuro €
oe œ
ae æ
ss ß
i ı
j ȷ
o ø
l ł
L Ł
O Ø
AA Å
AE Æ
Bumpeq ≎
Downarrow ⇓
Lleftarrow ⇚
Lsh ↰
OE Œ
Rrightarrow ⇛
Rsh ↱
Subset ⋐
Supset ⋑
Uparrow ⇑
Updownarrow ⇕
Vdash ⊩
Vvdash ⊪
aa å
amalg ⨿
approxeq ≊
asymp ≍
backepsilon ϶
barwedge ⌅
beth ℶ
between ≬
bigcirc ◯
bigtriangledown ▽
bigvee ⋁
bigwedge ⋀
blacklozenge ⧫
blacksquare ▪
blacktriangle ▴
blacktriangledown ▾
bowtie ⋈
boxdot ⊡
boxminus ⊟
boxplus ⊞
boxtimes ⊠
bumpeq ≏
circeq ≗
circlearrowleft ↺
circlearrowright ↻
circledS Ⓢ
circledast ⊛
curlyeqprec ⋞
curlyeqsucc ⋟
curlyvee ⋎
curlywedge ⋏
curvearrowleft ↶
curvearrowright ↷
daleth ℸ
diamond ♢
digamma ϝ
divideontimes ⋇
doteq ≐
doteqdot ≑
dotplus ∔
downdownarrows ⇊
eqcirc ≖
eth ƪ
fallingdotseq ≒
flat ♭
frown ⌢
gimel ℷ
gnapprox ⪊
gneq ⪈
gnsim ⋧
gtrdot ⋗
gtreqless ⋛
hookleftarrow ↩
hookrightarrow ↪
hslash ℏ
intercal ⊺
leftarrowtail ↢
leftharpoondown ↽
leftharpoonup ↼
leftleftarrows ⇇
leftrightarrows ⇆
leftrightharpoons ⇋
leftrightsquigarrow ↭
leftthreetimes ⋋
lessdot ⋖
lesseqgtr ⋚
llcorner ⌞
lnapprox ⪉
lneq ⪇
lnsim ⋦
longmapsto ⟼
looparrowleft ↫
looparrowright ↬
lozenge ◊
lrcorner ⌟
ltimes ⋉
multimap ⊸
nLeftarrow ⇍
nLeftrightarrow ⇎
nRightarrow ⇏
nVDash ⊯
nVdash ⊮
natural ♮
nearrow ↗
nleftarrow ↚
nleftrightarrow ↮
nrightarrow ↛
ntriangleleft ⋪
ntriangleright ⋫
nvDash ⊭
nvdash ⊬
nwarrow ↖
odot ⊙
ominus ⊖
oslash ⊘
pitchfork ⋔
preccurlyeq ≼
precnapprox ⪹
rightarrowtail ↣
rightharpoondown ⇁
rightharpoonup ⇀
rightleftarrows ⇄
rightleftharpoons ⇌
rightrightarrows ⇉
rightsquigarrow ⇝
rightthreetimes ⋌
risingdotseq ≓
rtimes ⋊
searrow ↘
sharp ♯
smile ⌣
sqcap ⊓
sqcup ⊔
sqsubset ⊏
sqsubseteq ⊑
sqsupset ⊐
sqsupseteq ⊒
subsetneqq ⫋
succcurlyeq ≽
succnapprox ⪺
succnsim ⋩
supsetneqq ⫌
swarrow ↙
textcelsius ℃
textmu µ
textperthousand ‰
triangledown ▿
triangleleft ◃
trianglelefteq ⊴
triangleq ≜
triangleright ▹
trianglerighteq ⊵
twoheadleftarrow ↞
twoheadrightarrow ↠
ulcorner ⌜
updownarrow ↕
uplus ⊎
upuparrows ⇈
urcorner ⌝
vartriangle ▵
vartriangleleft ⊲
vartriangleright ⊳
veebar ⊻
wp ℘
wr ≀""".split("\n"))
# Control symbols (a backslash and one non-letter).
_SYMBOLS.update({"{": "{", "}": "}", "&": "&", "$": "$", "%": "%", "#": "#", "_": "_", ",": " ", ";": " ",
                 ":": " ", " ": " ", "!": "", "-": "\N{SOFT HYPHEN}"})
_SYMBOLS.update({"quad": "  ", "qquad": "    "})


def _greek() -> dict[str, str]:
    letters = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
               "tau upsilon phi chi psi omega").split()
    table = {}
    for letter in letters:
        name = "LAMDA" if letter == "lambda" else letter.upper()
        # \epsilon and \phi are the symbol forms (ϵ, ϕ); \varepsilon and \varphi the letters
        small = {"EPSILON": "GREEK LUNATE EPSILON SYMBOL", "PHI": "GREEK PHI SYMBOL"}.get(name)
        table[letter] = unicodedata.lookup(small or "GREEK SMALL LETTER " + name)
        table[letter[0].upper() + letter[1:]] = unicodedata.lookup("GREEK CAPITAL LETTER " + name)
    table.update(varepsilon="ε", vartheta="ϑ", varpi="ϖ", varrho="ϱ", varsigma="ς", varphi="φ", varkappa="ϰ")
    return table


_SYMBOLS.update(_greek())

# Macros with arguments: "{" a mandatory one, "[" an optional one, "*" an optional star.
_ACCENTS = {"'": "\u0301", "`": "\u0300", '"': "\u0308", "c": "\u0327", "^": "\u0302", "~": "\u0303",
            "H": "\u030b", "k": "\u0328", "=": "\u0304", "b": "\u0331", ".": "\u0307", "d": "\u0323",
            "r": "\u030a", "u": "\u0306", "v": "\u030c", "vec": "\u20d7", "dot": "\u0307", "hat": "\u0302",
            "check": "\u030c", "breve": "\u0306", "acute": "\u0301", "grave": "\u0300", "tilde": "\u0303",
            "bar": "\u0305", "ddot": "\u0308", "not": "\u0338"}
# Rendered as their arguments' text.
_KEEP_ARGUMENTS = {"emph", "textrm", "textit", "textbf", "textsc", "textsl", "text", "mathrm"}
_SHOW_ARGUMENT = {"overline", "underline", "widehat", "widetilde", "wideparen", "overleftarrow", "overrightarrow",
                  "overleftrightarrow", "underleftarrow", "underrightarrow", "underleftrightarrow", "overbrace",
                  "underbrace", "overgroup", "undergroup", "overbracket", "underbracket", "overlinesegment",
                  "underlinesegment", "overleftharpoon", "overrightharpoon"}
# Letters in the Unicode mathematical alphanumeric styles: (first capital, first small letter) and the
# letters that sit elsewhere (the Letterlike Symbols block).
_STYLES = {
    "mathbf": ((0x1D400, 0x1D41A), {}),
    "mathit": ((0x1D434, 0x1D44E), {"h": "\u210e"}),
    "mathsf": ((0x1D5A0, 0x1D5BA), {}),
    "mathtt": ((0x1D670, 0x1D68A), {}),
    "mathbb": ((0x1D538, 0x1D552), dict(zip("CHNPQRZ", "ℂℍℕℙℚℝℤ"))),
    "mathfrak": ((0x1D504, 0x1D51E), dict(zip("CHIRZ", "ℭℌℑℜℨ"))),
    "mathcal": ((0x1D49C, 0x1D4B6), dict(zip("BEFHILMRego", "ℬℰℱℋℐℒℳℛℯℊℴ"))),
}
_STYLES["mathscr"] = _STYLES["mathcal"]
_ARGUMENTS = {
    "frac": "{{", "nicefrac": "{{", "sqrt": "[{", "texorpdfstring": "{{", "ket": "{", "bra": "{", "braket": "{{",
    "ketbra": "{{", "url": "{", "footnote": "[{", "textcolor": "[{{", "colorbox": "[{{", "fcolorbox": "[{[{{",
    "hspace": "*{", "vspace": "*{", "color": "[{", "xleftarrow": "[{", "xrightarrow": "[{", "hphantom": "[{",
    "vphantom": "[{", "mbox": "{", "textmd": "{", "textsf": "{", "texttt": "{", "textup": "{", "label": "{",
    "ref": "{", "autoref": "{", "cref": "{", "Cref": "{", "eqref": "{", "ensuremath": "{", "hypersetup": "{",
    "keywords": "{", "input": "{", "include": "{", "title": "{", "author": "{", "date": "{",
    **{name: "{" for name in (*_ACCENTS, *_KEEP_ARGUMENTS, *_SHOW_ARGUMENT, *_STYLES)},
}
# Macros rendered from their arguments' text ({0} the first argument).
_TEMPLATES = {"texorpdfstring": "{1}", "ket": "|{0}⟩", "bra": "⟨{0}|", "braket": "⟨{0}|{1}⟩", "ketbra": "|{0}⟩⟨{1}|",
              "url": "<{0}>", "footnote": "[{1}]", "textcolor": "{2}", "colorbox": "{2}", "fcolorbox": "{4}",
              "vspace": "\n", "ref": "<ref>", "autoref": "<ref>", "cref": "<ref>", "Cref": "<Ref>", "eqref": "(<ref>)"}
_MATRICES = {"array", "pmatrix", "bmatrix", "smallmatrix", "psmallmatrix", "bsmallmatrix"}
_ENVIRONMENT_ARGUMENTS = {"array": "[{", "tabular": "{", "tabular*": "{{", "tabularx": "{[{", "alignat": "{",
                          "alignat*": "{"}
_CENTERED = {"center", "flushleft", "flushright"}
# Two- and three-character ligatures: -- and --- dashes, `` and '' quotes, inverted ! and ?.
_LIGATURES = (("---", "\N{EM DASH}"), ("--", "\N{EN DASH}"), ("``", "\N{LEFT DOUBLE QUOTATION MARK}"),
              ("''", "\N{RIGHT DOUBLE QUOTATION MARK}"), ("!`", "\N{INVERTED EXCLAMATION MARK}"),
              ("?`", "\N{INVERTED QUESTION MARK}"))
_PLAIN_RUN = re.compile(r"[^\\{}\[\]&~\-`'!?]+")
_LETTERS = re.compile(r"[A-Za-z]+")
_SPACE = re.compile(r"\s*")
_COLUMN, _ROW = object(), object()  # "&" and "\\" in the parts of a sequence


def _styled(text: str, style: str) -> str:
    (capital, small), elsewhere = _STYLES[style]
    out = []
    for ch in text:
        if ch in elsewhere:
            out.append(elsewhere[ch])
        elif "A" <= ch <= "Z":
            out.append(chr(capital + ord(ch) - ord("A")))
        elif "a" <= ch <= "z":
            out.append(chr(small + ord(ch) - ord("a")))
        else:
            out.append(ch)
    return "".join(out)


def _accented(text: str | None, combining: str) -> str:
    text = " " if text is None else text.strip()
    return "".join(unicodedata.normalize("NFC", {"ı": "i", "ȷ": "j"}.get(ch, ch) + combining) for ch in text)


class _LatexText:
    """LaTeX as plain text, the way pylatexenc 2.10's ``LatexNodes2Text().latex_to_text`` renders it.

    ``\\frac{a}{b}`` -> ``a/b``, ``\\sqrt[3]{x}`` -> ``√(x)``, ``\\text{..}``/``\\mathrm{..}`` -> their
    content, ``\\mathbb{R}`` -> ``ℝ``, ``\\hat{x}`` -> ``x̂``, symbols to their Unicode characters
    (``_SYMBOLS``), groups to their content, unknown macros (``\\left``, ``\\displaystyle``, ``\\ne``)
    to nothing, with the spaces after a macro's name dropped; matrices as ``[ a b; c d ]``, ``&`` as
    three spaces and ``\\\\`` as a line break elsewhere.
    """

    def __init__(self, source: str):
        self.source = source

    def render(self) -> str:
        parts, _ = self._sequence(0, None)
        return self._join(parts)

    @staticmethod
    def _join(parts: list) -> str:
        return "".join("   " if p is _COLUMN else "\n" if p is _ROW else p for p in parts)

    def _sequence(self, pos: int, stop: str | None) -> tuple[list, int]:
        """Parts up to ``stop`` ("}", "]", or "end" for an environment) or the end of the source, and
        the position after it. A ``}`` that closes nothing is dropped."""
        s, n = self.source, len(self.source)
        parts: list = []
        while pos < n:
            ch = s[pos]
            if ch == stop:
                return parts, pos + 1
            if ch == "\\":
                name, after = self._macro_name(pos)
                if name == "end":
                    _, pos = self._braced_name(after)
                    if stop == "end":
                        return parts, pos
                    continue  # an \end without its \begin
                if name == "begin":
                    text, pos = self._environment(after)
                    parts.append(text)
                elif name == "\\":
                    parts.append(_ROW)
                    pos = self._row_break_arguments(after)
                else:
                    text, pos = self._macro(name, after)
                    parts.append(text)
            elif ch == "{":
                inner, pos = self._sequence(pos + 1, "}")
                parts.append(self._join(inner))
            elif ch == "}":
                pos += 1
            elif ch == "&":
                parts.append(_COLUMN)
                pos += 1
            elif ch == "~":
                parts.append("\N{NO-BREAK SPACE}")
                pos += 1
            else:
                for ligature, text in _LIGATURES:
                    if s.startswith(ligature, pos):
                        parts.append(text)
                        pos += len(ligature)
                        break
                else:
                    run = _PLAIN_RUN.match(s, pos)
                    end = run.end() if run else pos + 1
                    parts.append(s[pos:end])
                    pos = end
        return parts, pos

    def _macro_name(self, pos: int) -> tuple[str, int]:
        """The name of the macro whose backslash is at ``pos``, and the position after it (and after
        the spaces that follow a name made of letters)."""
        letters = _LETTERS.match(self.source, pos + 1)
        if letters:
            return letters.group(), _SPACE.match(self.source, letters.end()).end()
        return self.source[pos + 1 : pos + 2], min(pos + 2, len(self.source))

    def _braced_name(self, pos: int) -> tuple[str, int]:
        """An environment's name after ``\\begin`` / ``\\end``; a missing one makes the source unrenderable."""
        pos = _SPACE.match(self.source, pos).end()
        end = self.source.find("}", pos)
        if not self.source.startswith("{", pos) or end < 0:
            raise _Unrenderable("\\begin or \\end without {name}")
        return self.source[pos + 1 : end], end + 1

    def _row_break_arguments(self, pos: int) -> int:
        # \\* and \\[2mm], with no space before them
        if self.source.startswith("*", pos):
            pos += 1
        if self.source.startswith("[", pos):
            _, pos = self._sequence(pos + 1, "]")
        return pos

    def _arguments(self, spec: str, pos: int) -> tuple[list, int] | None:
        """The arguments ``spec`` describes and the position after them; None when the source ends
        before a mandatory one (the macro then has no arguments). A mandatory argument cut short by
        the ``}`` of an enclosing group is empty."""
        s, n = self.source, len(self.source)
        values: list = []
        for kind in spec:
            start = _SPACE.match(s, pos).end()
            if kind == "*":
                star = s.startswith("*", start)
                values.append("*" if star else None)
                pos = start + 1 if star else pos
            elif kind == "[":
                if s.startswith("[", start):
                    inner, pos = self._sequence(start + 1, "]")
                    values.append(self._join(inner))
                else:
                    values.append(None)
            elif start >= n:
                return None
            elif s[start] == "}":
                values.append("")
                pos = start
            elif s[start] == "{":
                inner, pos = self._sequence(start + 1, "}")
                values.append(self._join(inner))
            elif s[start] == "\\":  # a macro as an argument is the macro alone, without arguments
                name, pos = self._macro_name(start)
                values.append(self._bare(name))
            else:
                values.append(s[start])
                pos = start + 1
        return values, pos

    @staticmethod
    def _bare(name: str) -> str:
        """A macro rendered without its arguments."""
        if name in ("frac", "nicefrac"):
            return "%s/%s"  # the unfilled template
        if name == "sqrt":
            raise _Unrenderable("\\sqrt without an argument")
        if name in _SHOW_ARGUMENT:
            return "%s"
        if name in _ACCENTS:
            return _accented(None, _ACCENTS[name])
        return _SYMBOLS.get(name, "")

    def _macro(self, name: str, pos: int) -> tuple[str, int]:
        spec = _ARGUMENTS.get(name)
        read = None if spec is None else self._arguments(spec, pos)
        if read is None:
            return self._bare(name), pos
        args, pos = read
        text = [a or "" for a in args]
        if name in ("frac", "nicefrac"):
            return f"{text[0]}/{text[1]}", pos
        if name == "sqrt":
            return f"\N{SQUARE ROOT}({text[1]})", pos
        if name in _KEEP_ARGUMENTS:
            return "".join(text), pos
        if name in _SHOW_ARGUMENT:
            return text[0], pos
        if name in _STYLES:
            return _styled(text[0], name), pos
        if name in _ACCENTS:
            return _accented(args[0], _ACCENTS[name]), pos
        template = _TEMPLATES.get(name)
        # the rest (\label, \mbox, \texttt, \hspace, ...) render as nothing
        return ("" if template is None else template.format(*text)), pos

    def _environment(self, pos: int) -> tuple[str, int]:
        name, pos = self._braced_name(pos)
        if name in _ENVIRONMENT_ARGUMENTS:  # \begin{array}{cc}: the column spec is not content
            read = self._arguments(_ENVIRONMENT_ARGUMENTS[name], pos)
            pos = pos if read is None else read[1]
        parts, pos = self._sequence(pos, "end")
        if name in _MATRICES:
            return self._matrix(parts), pos
        if name in _CENTERED:
            return "\n" + self._join(parts) + "\n", pos
        return self._join(parts), pos

    def _matrix(self, parts: list) -> str:
        rows: list[list[str]] = []
        row: list[str] = []
        cell: list = []
        for part in parts + [_ROW]:
            if part is _COLUMN or part is _ROW:
                if cell:
                    row.append(self._join(cell).strip())
                cell = []
                if part is _ROW:
                    rows.append(row)
                    row = []
            else:
                cell.append(part)
        widths = [len(entry) for r in rows for entry in r]
        if not widths:
            raise _Unrenderable("empty matrix")
        width = max(widths)
        return "[ " + "; ".join(" ".join(entry.rjust(width) for entry in r) for r in rows) + " ]"
