"""Properties of grading.py: answer extraction and the equivalence of answers."""

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import grading

# (prediction, gold, equal?) — the forms of math answers, and near misses that must NOT match.
GRADING = [
    # integers, signs, spacing, punctuation
    ("42", "42", True),
    ("42.", "42", True),
    (" 42 ", "42", True),
    ("+42", "42", True),
    ("042", "42", True),
    ("2", "-2", False),
    ("-2", "-2", True),
    ("-0", "0", True),
    ("41", "42", False),
    ("4 2", "42", True),
    ("100", "1000", False),
    ("7", "7.0", True),
    ("7.00", "7", True),
    ("7.01", "7", False),
    ("1e3", "1000", True),
    # thousands separators
    ("1,000", "1000", True),
    ("1,000,000", "1000000", True),
    ("12,345.5", "12345.5", True),
    ("1{,}000", "1000", True),
    ("1,000", "1", False),
    ("10,00", "1000", False),
    # decimals and fractions
    ("0.5", "1/2", True),
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
    ("\\tfrac{1}{2}", "0.5", True),
    ("\\frac12", "0.5", True),
    ("1/2", "2", False),
    ("2/4", "1/2", True),
    ("\\frac{3}{4}", "0.75", True),
    ("0.75", "3/4", True),
    ("\\frac{-3}{4}", "-0.75", True),
    ("-\\frac{3}{4}", "-0.75", True),
    ("0.3333", "\\frac{1}{3}", False),
    ("0.333333333333", "1/3", False),
    ("\\frac{1}{3}", "1/3", True),
    ("\\frac{2}{3}", "0.6667", False),
    ("\\frac{7}{2}", "3.5", True),
    ("3\\frac{1}{2}", "3.5", True),
    ("\\frac{10}{4}", "2.5", True),
    ("1/0", "0", False),
    ("0.1", "1/10", True),
    (".5", "0.5", True),
    ("5.", "5", True),
    ("\\frac{1}{2}", "\\frac{2}{4}", True),
    # percentages
    ("50\\%", "0.5", True),
    ("50%", "50", True),  # GSM8K writes the gold of "what percent" without its sign
    ("50\\%", "50\\%", True),
    ("12.5\\%", "\\frac{1}{8}", True),
    ("100\\%", "1", True),
    ("5\\%", "0.5", False),
    # roots, pi and other symbols
    ("\\sqrt{2}", "\\sqrt{2}", True),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", True),
    ("2\\sqrt{3}", "\\sqrt{12}", True),
    ("\\sqrt{8}", "2\\sqrt{2}", True),
    ("\\sqrt{3}", "1.7320508075688772", True),
    ("\\sqrt{3}", "1.732", False),
    ("\\sqrt[3]{27}", "3", True),
    ("\\pi", "3.141592653589793", True),
    ("2\\pi", "2*pi", True),
    ("\\pi", "3.14", False),
    ("\\frac{\\pi}{2}", "\\pi/2", True),
    ("\\pi^2", "\\pi\\cdot\\pi", True),
    ("3\\pi", "\\pi", False),
    ("e", "e", True),
    ("2^{10}", "1024", True),
    ("2^10", "1024", True),
    ("10^{-2}", "0.01", True),
    ("3 \\times 4", "12", True),
    ("3\\cdot 4", "12", True),
    # algebra
    ("x^2+2x+1", "(x+1)^2", True),
    ("x^2 + 2x + 1", "(x+1)^{2}", True),
    ("x^2", "x^3", False),
    ("2x", "x+x", True),
    ("\\frac{x}{2}", "x/2", True),
    ("\\frac{x+1}{x}", "1+\\frac{1}{x}", True),
    ("a+b", "b+a", True),
    ("a-b", "b-a", False),
    ("x^2-1", "(x-1)(x+1)", True),
    ("\\sqrt{x^2}", "x", False),
    ("2(x+3)", "2x+6", True),
    ("x y", "xy", True),
    ("n(n+1)/2", "\\frac{n^2+n}{2}", True),
    ("3x+2", "3x-2", False),
    ("\\frac{1}{x}", "x^{-1}", True),
    # "x =", units, degrees, text
    ("x = 5", "5", True),
    ("x=5", "5", True),
    ("y = -3", "-3", True),
    ("5 cm", "5", True),
    ("5\\text{ cm}", "5", True),
    ("5 \\text{cm}", "5", True),
    ("12 meters", "12", True),
    ("90^\\circ", "90", True),
    ("90^{\\circ}", "90", True),
    ("90°", "90", True),
    ("45 degrees", "45", True),
    ("\\$5", "5", True),
    ("$5$", "5", True),
    ("\\text{5}", "5", True),
    ("\\mathrm{5}", "5", True),
    ("3 hours", "3", True),
    ("30 minutes", "3", False),
    ("\\$1,000", "1000", True),
    ("10 dollars", "10", True),
    ("\\textbf{7}", "7", True),
    ("\\left(1,2\\right)", "(1,2)", True),
    ("\\displaystyle\\frac{1}{2}", "0.5", True),
    ("5\\,000", "5000", True),
    ("5\\!", "5", True),
    # tuples and intervals
    ("(1, 2)", "(1,2)", True),
    ("(1,2)", "(2,1)", False),
    ("(1,2,3)", "(1,2)", False),
    ("(0.5, 1)", "(\\frac{1}{2}, 1)", True),
    ("[1,2]", "[1, 2]", True),
    ("(1,2]", "(1,2)", False),
    ("[0,1)", "[0,1)", True),
    ("[0,1)", "(0,1)", False),
    ("(-\\infty, 0)", "(-\\infty,0)", True),
    ("(1,2)", "1,2", False),
    ("(x, y)", "(y, x)", False),
    ("(2x, 4)", "(x+x, 2^2)", True),
    ("(\\sqrt{2}, 1)", "(\\frac{2}{\\sqrt{2}}, 1)", True),
    ("[-1, 1]", "[-1,1]", True),
    ("(1, (2, 3))", "(1,(2,3))", True),
    # text answers and junk
    ("\\text{yes}", "yes", True),
    ("no", "yes", False),
    ("A", "A", True),
    ("B", "A", False),
    ("", "0", False),
    ("0", "", False),
    ("None", "0", False),
    ("NaN", "0", False),
    ("inf", "0", False),
    ("\\infty", "\\infty", True),
    ("x", "5", False),
    ("2+", "2", False),
    ("((", "(", False),
    ("}", "{", False),
    ("\\frac{1}{", "0.5", False),
    ("1/2/3", "1/6", True),
    # large integers and exact rationals
    ("123456789012345678901234567890", "123456789012345678901234567890", True),
    ("123456789012345678901234567891", "123456789012345678901234567890", False),
    ("2^{100}", "1267650600228229401496703205376", True),
    ("10^{30}", "1000000000000000000000000000000", True),
    ("0.1+0.2", "0.3", True),
    ("\\frac{1}{3}+\\frac{1}{6}", "\\frac{1}{2}", True),
    ("99999999999999999", "1e17", False),
    ("1000000007", "1000000007", True),
    ("1000000007", "1000000009", False),
    ("-\\frac{1}{2}", "-0.5", True),
    ("-1/2", "1/2", False),
    ("3/6", "0.5", True),
    ("6/3", "2", True),
    ("0.125", "\\frac{1}{8}", True),
    ("0.2", "\\frac{1}{5}", True),
    ("1.5", "\\frac{3}{2}", True),
    ("2.50", "2.5", True),
    ("2.5", "5/2", True),
    ("0.0", "0", True),
    ("-0.0", "0", True),
    ("1.0e-3", "0.001", True),
    ("3.14159", "\\pi", False),
    ("17", "\\boxed{17}", False),
    ("\\sqrt{16}", "4", True),
    ("4!", "24", True),
    ("\\binom{5}{2}", "10", True),
    ("C(5,2)", "10", False),
    ("|{-3}|", "3", True),
    ("\\log_2 8", "3", True),
    # ---- answers as models write them on GSM8K and MATH
    # percentages (rewards' docstring, step 3): beside a number x% reads as x/100 or as x;
    # two percentages compare as written
    ("50%", "50\\%", True),
    ("12.5%", "12.5", True),
    ("50 percent", "50", True),
    ("50 percent", "0.5", True),
    ("25\\%", "\\frac{1}{4}", True),
    ("200\\%", "2", True),
    ("-5\\%", "-5", True),
    ("0.5\\%", "0.005", True),
    ("50%", "5", False),
    ("0.5%", "50", False),
    ("50\\%", "0.5\\%", False),
    ("50\\%", "500", False),
    # money
    ("\\$1,250.00", "1250", True),
    ("$18", "18", True),
    ("\\$18.00", "18", True),
    ("18 dollars", "18", True),
    ("\\$0.50", "0.5", True),
    ("-\\$5", "-5", True),
    ("\\$1,250", "125", False),
    ("50 cents", "0.5", False),  # units are dropped, not converted
    # thousands separators
    ("1,234,567", "1234567", True),
    ("1,234,567", "1,234,567.00", True),
    ("-1,234", "-1234", True),
    ("1,234", "1234.0", True),
    ("1,234", "1.234", False),
    ("1,234,567", "1234.567", False),
    ("1,2", "12", False),  # not a thousands separator
    # units and the things counted
    ("5 \\text{ apples}", "5", True),
    ("5 apples", "5", True),
    ("18\\text{ eggs}", "18", True),
    ("12 square feet", "12", True),
    ("6 \\text{cm}^2", "6", True),
    ("6 cm^2", "6", True),
    ("6\\text{ m}^{3}", "6", True),
    ("7 miles per hour", "7", True),
    ("18 apples.", "18", True),
    ("6 \\text{cm}^2", "36", False),
    ("5 million", "5", False),  # a word that changes the value is kept
    ("2 dozen", "2", False),
    ("5 squared", "5", False),
    ("5 squared", "25", False),
    ("2 pi", "2", False),
    # degrees
    ("30^\\circ", "30", True),
    ("30°", "30^{\\circ}", True),
    ("30 degrees", "30^\\circ", True),
    ("30\\degree", "30", True),
    ("-30^\\circ", "-30", True),
    ("30^\\circ", "300", False),
    # "x =", trailing periods, trailing zeros, signs
    ("x = 5.", "5", True),
    ("18.00", "18", True),
    ("18.50", "18.5", True),
    ("18.05", "18.5", False),
    ("12", "120", False),
    ("-5", "5", False),
    ("\u22125", "-5", True),
    ("-5.0", "-5", True),
    ("(-5)", "-5", True),
    # \dfrac, \tfrac, fractions vs decimals, mixed numbers
    ("\\dfrac{3}{4}", "0.75", True),
    ("\\tfrac{1}{4}", "0.25", True),
    ("\\dfrac34", "0.75", True),
    ("0.333", "\\frac{1}{3}", False),  # a documented choice: rounded is not exact
    ("3 1/2", "3.5", True),
    ("3 1/2", "\\frac{7}{2}", True),
    ("-3\\frac{1}{2}", "-3.5", True),
    ("3 \\frac{1}{2}", "3.5", True),
    ("3\\dfrac{1}{2}", "\\frac{7}{2}", True),
    ("2 3/4 cups", "2.75", True),
    ("3 1/2", "31/2", False),
    ("3 1/2", "1.5", False),
    # multiple-choice and word answers
    ("\\text{(B)}", "B", True),
    ("\\text{Tuesday}", "tuesday", True),
]

SLOW_SYMBOLIC = ("2^{2^{40}}", "3")  # an exact power with 2^40 bits: sympy would take hours


@pytest.fixture(scope="module")
def grader():
    g = grading.Grader(timeout=2.0)
    yield g
    g.close()


def test_the_grading_table_has_at_least_150_cases_of_both_outcomes():
    """The table is big enough to mean something, and has near misses as well as matches."""
    assert len(GRADING) >= 150
    assert sum(1 for *_, equal in GRADING if not equal) >= 40


@pytest.mark.parametrize("pred,gold,equal", GRADING, ids=[f"{p!r}~{g!r}" for p, g, _ in GRADING])
def test_grading_table(grader, pred, gold, equal):
    """Each (prediction, gold) pair is judged as the table says, in both argument orders."""
    assert grader.equal(pred, gold) is equal
    assert grader.equal(gold, pred) is equal


@pytest.mark.parametrize(
    "text,answer",
    [
        ("so \\boxed{\\frac{1}{2}}, and finally \\boxed{3}.", "3"),
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),
        ("\\fbox{a{b}c}", "a{b}c"),
        ("\\boxed {7}", "7"),
        ("\\boxed 5 is it", "5"),
        ("\\boxed{unbalanced", None),
        ("The answer is 42.", "42"),
        ("Thinking...\nAnswer: $x = 3$", "x = 3"),
        ("no answer here", None),
        ("", None),
        ("so the answer is 42.<|im_end|>", "42"),
        ("I unboxed 3 gifts; the answer is 7", "7"),
        ("\\boxed{" * 5000, None),
        ("\\boxed{\\$18}", "\\$18"),
        ("Therefore, \\boxed{x = 5}.", "x = 5"),
        ("The final answer is $\\boxed{18}$. I hope it is correct.", "18"),
        ("The answer is: 42", "42"),
        ("**Answer:** 42", "42"),
        ("The answer is **42**.", "42"),
        ("The answer is \\$18.", "\\$18"),
        ("She earns 3 * 6 = 18 dollars.\n#### 18", "18"),
    ],
)
def test_answer_extraction(text, answer):
    """The last balanced \\boxed{} wins, nested braces kept; else a final 'answer is' / 'Answer:' /
    '####' line, markdown bold ignored; else None."""
    assert grading.extract_answer(text) == answer


@pytest.mark.parametrize(
    "text,gold",
    [
        ("So she pays \\boxed{\\$18}.", "18"),
        ("The discount is \\boxed{50\\%}.", "50"),
        ("The price rose by $\\boxed{25\\%}$", "0.25"),
        ("**Answer:** \\$1,250.00", "1250"),
        ("The answer is 42 apples.", "42"),
        ("#### 1,234,567", "1234567"),
        ("\\boxed{x = -3}", "-3"),
        ("\\boxed{30^\\circ}", "30"),
        ("\\boxed{\\dfrac{1}{2}}", "0.5"),
        ("\\boxed{5 \\text{ cm}^2}", "5"),
    ],
)
def test_model_written_answers_earn_credit_against_the_gold(grader, text, gold):
    """What models write at the end of a GSM8K or MATH solution, extracted then graded, is correct."""
    assert grader.equal(grading.extract_answer(text), gold) is True


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40))
def test_the_grader_never_raises_and_keeps_its_time_limit(grader, pred, gold):
    """On arbitrary strings the grader returns a bool within its time limit (+1 s), never raising."""
    start = time.monotonic()
    assert grader.equal(pred, gold) in (True, False)
    assert time.monotonic() - start < grader.timeout + 1.0


@pytest.mark.parametrize(
    "pred,gold",
    [("1e50000000", "2"), ("1" * 5000, "1"), ("1e400", "\\sqrt{2}"), ("9" * 400, "\\pi"), ("{" * 3000, "1")],
)
def test_huge_or_malformed_numbers_are_graded_within_the_limit(grader, pred, gold):
    """Numbers with enormous exponents or thousands of digits neither raise nor run past the limit."""
    start = time.monotonic()
    assert grader.equal(pred, gold) is False
    assert time.monotonic() - start < grader.timeout + 1.0


def test_a_pathological_expression_is_cut_off_by_the_time_limit():
    """A symbolic comparison too slow for the limit is 'not equal', returned in time."""
    g = grading.Grader(timeout=1.0)
    try:
        assert g.equal("x+x", "2x")  # warm: sympy imported; the limit applies per comparison
        start = time.monotonic()
        assert g.equal(*SLOW_SYMBOLIC) is False
        assert time.monotonic() - start < 1.0 + 1.0
        assert g.equal("x+x", "2x"), "the grader works again after the cut-off"
    finally:
        g.close()


@pytest.mark.parametrize("a,b", [("10 pm", "10 am"), ("2 boys", "2 girls"), ("3 fifths", "3"), ("5 tenths", "5")])
def test_words_are_dropped_only_against_a_plain_number(a, b):
    """Words after a number are its unit only when the other answer is a plain number: two
    answers that both carry words keep them, and fraction words change the value."""
    grader = grading.Grader()
    assert not grader.equal(a, b) and not grader.equal(b, a)
    assert grader.equal("5 apples", "5") and grader.equal("5", "5 apples")
    grader.close()
