"""Grading: the final answer of a trajectory, and whether it equals the gold answer.

rewards.outcome_scores turns this into the outcome reward (1 if correct, else 0) unless a reward
plug-in replaces it; eval.py and train.py's held-out evaluation grade with it too.

Grading, in order (each step only when the previous did not already decide "equal"):
    1. extract_answer: the last \\boxed{...} (or \\fbox{...}) with nested braces; when there is
       none, the fallback is a final "answer is X" / "Answer: X" / "#### X" line; else None.
    2. normalise both strings: spaces, $ and \\$, \\left/\\right, \\!, \\text{...}, ^\\circ and
       degrees, a trailing period, "x =" prefixes, \\dfrac/\\tfrac -> \\frac, thousands separators,
       "50 percent" -> 50%, "3 1/2" -> 3\\frac{1}{2}, and units: when the other answer is a plain
       number, a plain number followed only by words is the number (5 apples = 5 cm^2 = 5), unless
       a word changes the value (5 million, 2 dozen, 3 fifths, 5 squared); two answers that both
       carry words keep them (10 pm != 10 am). Units are dropped, never converted: 50 cents != 0.5.
    3. numbers: integers, decimals, fractions (a/b, \\frac{a}{b}), mixed numbers, percentages,
       \\sqrt, \\pi: equal when exactly equal as rationals, or within 1e-9 relative as floats.
       A percentage x% has two readings, x/100 and x: a percentage and a number are equal when
       either reading equals the number (50% = 0.5 = 50, as GSM8K's gold drops the sign); two
       percentages compare as written (50% != 0.5%). A documented choice: a rounded decimal is
       NOT equal to the exact value (0.3333 != 1/3), since the model could have computed it exactly.
    4. symbols: sympy decides a - b == 0, run in a sandbox session (sympify evaluates its input,
       which here is model-written) under a time limit, so no expression can stall a rollout.
    Tuples and intervals are compared element by element, brackets included.

Shapes: N trajectories.
"""

import math
import re
from fractions import Fraction

import torch

import data
import sandbox

# ---------------------------------------------------------------- answers


def extract_answer(text):
    """The final answer in text: the last balanced \\boxed{...} or \\fbox{...}; else a final
    "answer is X" / "Answer: X" / GSM8K's "#### X" line (markdown bold ignored); else None. Chat
    special tokens (<|im_end|>) are ignored."""
    if text is None:
        return None
    text = re.sub(r"<\|[a-z_]+\|>", "", text)
    boxed = data.boxed_answer(text)
    if boxed is not None:
        return boxed
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if lines:
        last = lines[-1].replace("**", "")  # markdown bold: "**Answer:** 42", "is **42**"
        match = re.search(r"(?:answer is:?|answer:|^\s*####)\s*(.+?)\.?\s*$", last, re.IGNORECASE)
        if match:
            return match.group(1).strip().strip("$").strip()
    return None


UNIT_WORDS = (
    r"(?:units?|cm|m|km|kg|g|mg|s|sec|seconds?|minutes?|hours?|days?|degrees?|dollars?|cents?"
    r"|meters?|inches?|feet|ft|mph|sq|square)"
)
UNIT_POWER = r"(?:\^\{?[23]\}?)?"  # cm^2, m^{3}: the power belongs to the unit, not to the number
# Words that change the value of the number before them: "5 million" is not 5, "5 apples" is.
VALUE_WORDS = (
    r"(?:hundred|thousand|million|billion|trillion|dozen|half|halve|third|quarter|fifth|sixth|seventh|eighth|ninth"
    r"|tenth|hundredth|thousandth|squared|cubed|pi|sqrt)s?"
)
PLAIN_NUMBER = r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:\s+\d+/\d+|/\d+)?"  # 12, 1,250.5, 3/4, 3 1/2


def _drop_trailing_words(s):
    """ "5 apples" -> "5": a plain number followed only by words keeps the number (the words name
    a unit or the things counted), unless a word changes its value (VALUE_WORDS)."""
    m = re.fullmatch(f"({PLAIN_NUMBER})\\s+([a-zA-Z]{{2,}}(?:\\s+[a-zA-Z]+)*)", s)
    if m and not any(re.fullmatch(VALUE_WORDS, w, re.IGNORECASE) for w in m[2].split()):
        return m[1]
    return s


def normalize_answer(s, drop_words=True):
    """A canonical string for comparison (see the module docstring, step 2); drop_words: "5 apples"
    -> "5" (see _drop_trailing_words)."""
    s = str(s).strip().replace("\u2212", "-")  # the unicode minus
    s = re.sub(r"\\(?:text|textrm|mathrm|mbox)\{\s*" + UNIT_WORDS + r"\s*\}" + UNIT_POWER, "", s)
    s = re.sub(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    s = (
        s.replace("\\dfrac", "\\frac")
        .replace("\\tfrac", "\\frac")
        .replace("^\\circ", "")
        .replace("^{\\circ}", "")
        .replace("\\degree", "")
    )
    s = s.replace("°", "").replace("\\$", "").replace("$", "").replace("\\displaystyle", "")
    s = re.sub(r"^\s*[a-zA-Z]\s*=\s*", "", s).strip().rstrip(".").strip()  # "x = 5", "5 cm."
    s = re.sub(r"(?<=\d)\s*percent$", "%", s, flags=re.IGNORECASE)  # "50 percent" is 50%
    s = _drop_trailing_words(s) if drop_words else s  # "5 apples"
    s = re.sub(r"\s+" + UNIT_WORDS + UNIT_POWER + r"\s*$", "", s)  # "2\\sqrt{3} cm", "5 cm^2"
    s = re.sub(r"^([-+]?\d+)\s+(\d+)/(\d+)$", r"\1\\frac{\2}{\3}", s)  # a mixed number: "3 1/2"
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s) if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s) else s
    s = s.replace(" ", "").rstrip(".")
    return s


MAX_DIGITS = 1000  # longer numbers, or exponents beyond +-1000, are left to sympy (time-limited)


def _number(s):
    """s as a Fraction (exact) or float, or None. Handles a/b, \\frac{a}{b}, %, \\sqrt{n}, \\pi."""
    s = s.replace("{,}", "")
    exponent = re.search(r"[eE]([+-]?\d+)$", s)
    if len(s) > MAX_DIGITS or (exponent and abs(int(exponent[1][:6])) > MAX_DIGITS):
        return None
    percent = s.endswith("\\%") or s.endswith("%")
    s = s.removesuffix("\\%").removesuffix("%")
    sign = -1 if s.startswith("-") else 1
    s = s.removeprefix("-").removeprefix("+")
    value = None
    if re.fullmatch(r"(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?", s):
        value = Fraction(s)
    elif m := re.fullmatch(r"(\d+)\\frac\{(\d+)\}\{(\d+)\}", s):  # a mixed number: 3\frac{1}{2} = 3.5
        value = Fraction(m[1]) + Fraction(m[2]) / Fraction(m[3]) if int(m[3]) else None
    elif (m := re.fullmatch(r"(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)", s)) or (
        m := re.fullmatch(r"\\frac\{?(-?\d+(?:\.\d+)?)\}?\{?(\d+(?:\.\d+)?)\}?", s)
    ):
        value = Fraction(m[1]) / Fraction(m[2]) if Fraction(m[2]) else None
    elif m := re.fullmatch(r"(\d*(?:\.\d+)?)\\sqrt\{?(\d+(?:\.\d+)?)\}?", s):
        value = float(m[1] or 1) * math.sqrt(float(m[2]))
    elif m := re.fullmatch(r"(\d*(?:\.\d+)?)\\pi", s):
        value = float(m[1] or 1) * math.pi
    if value is None:
        return None
    value = sign * value
    return value / 100 if percent else value


def _split_top_level(s):
    """('(', items, ')') for a tuple or interval like (1,2] at the top level, else None."""
    if len(s) < 2 or s[0] not in "([" or s[-1] not in ")]":
        return None
    items, depth, current = [], 0, ""
    for ch in s[1:-1]:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    return (s[0], items, s[-1]) if len(items) > 1 else None


def _numbers_equal(a, b):
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    except OverflowError:  # a Fraction beyond float range against an irrational: not equal
        return False


def _readings(s, value):
    """The values a normalised answer can mean (module docstring, step 3): x% is x/100 or x."""
    return (value, value * 100) if s.endswith("%") else (value,)


def _numbers_match(p, g, a, b):
    """a = _number(p) and b = _number(g) agree (step 3). Two percentages compare as written,
    since their readings would cross: 50% would equal 0.5% via 0.5."""
    if p.endswith("%") and g.endswith("%"):
        return _numbers_equal(a, b)
    return any(_numbers_equal(x, y) for x in _readings(p, a) for y in _readings(g, b))


def latex_to_python(s):
    """The common LaTeX of answers in Python syntax for sympy: \\frac, \\sqrt, \\pi, \\cdot, ^."""
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("^", "**")
    for name in (
        "pi",
        "alpha",
        "beta",
        "gamma",
        "theta",
        "lambda",
        "mu",
        "sigma",
        "phi",
        "omega",
        "infty",
        "sin",
        "cos",
        "tan",
        "exp",
    ):
        s = s.replace("\\" + name, f" {'oo' if name == 'infty' else name} ")  # spaced: \\pi r -> pi r
    s = re.sub(r"\\binom\{([^{}]*)\}\{([^{}]*)\}", r"binomial(\1,\2)", s)
    s = re.sub(r"\\log_\{?([^{}\s]+?)\}?\s*\{?([^{}\s]+)\}?$", r"log(\2,\1)", s)
    s = s.replace("\\ln", " log ").replace("\\log", " log ")
    s = re.sub(r"\|([^|]*)\|", r"Abs(\1)", s)
    for _ in range(10):  # innermost first, so nested fractions and roots unfold
        s2 = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        s2 = re.sub(r"\\sqrt\[([^{}\]]*)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))", s2)
        s2 = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s2)
        s2 = re.sub(r"\\sqrt(\d+)", r"sqrt(\1)", s2)
        if s2 == s:
            break
        s = s2
    return s.replace("{", "(").replace("}", ")").replace("\\", "")


class Grader:
    """is_equivalent with a sandbox session for the symbolic step (created on first need)."""

    def __init__(self, timeout=2.0):
        self.timeout = timeout
        self.session = None

    def symbolic_equal(self, a, b):
        """sympy: simplify(a - b) == 0 on the LaTeX turned into Python syntax, in a sandbox, within
        the time limit (a timeout or a parse error is "not equal")."""
        if self.session is None:
            self.session = sandbox.Session(timeout=self.timeout, memory_mb=1024)
        code = (
            "from sympy import simplify\n"
            "from sympy.parsing.sympy_parser import parse_expr, standard_transformations as st,"
            " implicit_multiplication_application as imp, convert_xor as xor, rationalize as rat\n"
            "t = st + (imp, xor, rat)\n"
            f"a = parse_expr({latex_to_python(a)!r}, transformations=t)\n"
            f"b = parse_expr({latex_to_python(b)!r}, transformations=t)\n"
            "d = simplify(a - b)\n"  # exact; else, for numbers, equal to 1e-9 relative
            "close = d.is_number and d.is_finite is True and b.is_finite is True\n"
            "print(d == 0 or bool(close and abs(d.evalf()) <= 1e-9 * max(1, abs(b.evalf()))))"
        )
        result = self.session.run(code)
        return result.ok and result.stdout.strip() == "True"

    def equal(self, pred, gold):
        """Whether pred and gold are the same answer; never raises (an error means "not equal")."""
        try:
            return self._equal(pred, gold)
        except Exception:  # noqa: BLE001 - a grader must not crash a training step
            return False

    def _equal(self, pred, gold):
        if pred is None or gold is None:
            return False
        p, g = normalize_answer(pred, drop_words=False), normalize_answer(gold, drop_words=False)
        if (_number(p) is None) != (_number(g) is None):  # words after one number only: the unit or
            p, g = normalize_answer(pred), normalize_answer(gold)  # the things counted (10 pm != 10 am)
        if p.isalpha() and g.isalpha():  # words: compared as text (sympy would equate anagrams)
            return p.casefold() == g.casefold()
        if p == g:
            return True
        if not p or not g:
            return False
        tp, tg = _split_top_level(p), _split_top_level(g)
        if tp or tg:
            return (
                bool(tp and tg)
                and tp[0] == tg[0]
                and tp[2] == tg[2]
                and len(tp[1]) == len(tg[1])
                and all(self._equal(x, y) for x, y in zip(tp[1], tg[1]))
            )
        np_, ng = _number(p), _number(g)
        if np_ is not None and ng is not None:
            return _numbers_match(p, g, np_, ng)
        return self.symbolic_equal(p, g)

    def close(self):
        if self.session is not None:
            self.session.close()
            self.session = None


_default_grader = None


def is_equivalent(pred, gold):
    """Whether the predicted answer equals the gold one (see the module docstring)."""
    global _default_grader
    if _default_grader is None:
        _default_grader = Grader()
    return _default_grader.equal(pred, gold)


# ---------------------------------------------------------------- trajectories


def grade(trajs, golds, grader=None):
    """(N,) bool: the final answer of each trajectory's last turn equals its gold answer."""
    equal = grader.equal if grader is not None else is_equivalent
    return torch.tensor([equal(extract_answer(t.final_text), gold) for t, gold in zip(trajs, golds)])
