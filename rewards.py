"""Rewards: final answers and their grading, format checks, the turn reward matrix, GRPO's
trajectory reward, and the code-similarity shaping of GTPO (with pluggable embedders).

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

Shapes: N trajectories, K max turns.
"""

import importlib
import importlib.util
import math
import numbers
import os
import re
from fractions import Fraction

import torch

import data
import rollout
import sandbox

FORMAT_PENALTY = -0.1

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
    """"5 apples" -> "5": a plain number followed only by words keeps the number (the words name
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
    elif (m := re.fullmatch(r"(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)", s)) or (m := re.fullmatch(r"\\frac\{?(-?\d+(?:\.\d+)?)\}?\{?(\d+(?:\.\d+)?)\}?", s)):
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
    for name in ("pi", "alpha", "beta", "gamma", "theta", "lambda", "mu", "sigma", "phi", "omega", "infty",
                 "sin", "cos", "tan", "exp"):  # fmt: skip
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


# ---------------------------------------------------------------- format and turn rewards


def turn_format_penalties(turns, penalty=FORMAT_PENALTY, runtime_errors=False, first_call=True):
    """Per turn: `penalty` for an invalid tool call (unterminated fence, empty code, code that does
    not parse), and with first_call (the paper's rule) on turn 1 also for making no tool call at
    all. A call whose code raises when run is feedback, not a format error, unless runtime_errors."""
    penalties = []
    for j, turn in enumerate(turns):
        invalid = turn.valid_call is False
        if runtime_errors and turn.result is not None and not turn.result.ok:
            invalid = True
        no_call_first = first_call and j == 0 and turn.code is None
        penalties.append(penalty if invalid or no_call_first else 0.0)
    return penalties


def grade(trajs, golds, grader=None):
    """(N,) bool: the final answer of each trajectory's last turn equals its gold answer."""
    equal = grader.equal if grader is not None else is_equivalent
    return torch.tensor([equal(extract_answer(t.final_text), gold) for t, gold in zip(trajs, golds)])


def turn_reward_matrix(trajs, outcomes, max_turns, penalty=FORMAT_PENALTY, runtime_errors=False, first_call=True):
    """GTPO's turn rewards r_ij = r_acc_ij + r_fmt_ij: (rewards (N, K), turn_mask (N, K)).

    outcomes (N,) float: r_acc of each trajectory's last turn (1 if correct, the shaped partial
    credit or 0 otherwise); every other turn's r_acc is 0. turn_mask is True for turns that exist.
    """
    N = len(trajs)
    rewards = torch.zeros(N, max_turns)  # (N, K)
    turn_mask = torch.zeros(N, max_turns, dtype=torch.bool)  # (N, K)
    for i, traj in enumerate(trajs):
        T = len(traj.turns)
        assert 1 <= T <= max_turns, f"trajectory {i} has {T} turns, max_turns is {max_turns}"
        turn_mask[i, :T] = True
        rewards[i, :T] = torch.tensor(turn_format_penalties(traj.turns, penalty, runtime_errors, first_call))
        rewards[i, T - 1] += float(outcomes[i])
    return rewards, turn_mask


def grpo_rewards(trajs, scores, runtime_errors=False, first_call=True):
    """GRPO's trajectory reward: the outcome score (1 iff correct with the built-in grader) when no
    turn has a format error, else 0. (N,)"""
    clean = [not any(turn_format_penalties(t.turns, -1.0, runtime_errors, first_call)) for t in trajs]
    return scores.float() * torch.tensor(clean)


# ---------------------------------------------------------------- a reward of your own


class RewardFnError(ValueError):
    """A --reward_fn that cannot be loaded, or that returned something other than a score."""


def load_reward_fn(spec):
    """The function named by "path/to/file.py:function" or "package.module:function"; None for
    "none" or "" (the built-in grader)."""
    if spec in ("", "none"):
        return None
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise RewardFnError(f"--reward_fn {spec!r}: expected 'file.py:function' or 'module:function'")
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise RewardFnError(f"--reward_fn {spec!r}: no such file {where}")
            loader = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(where))[0], where)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except RewardFnError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's module failed to import: say which and why
        raise RewardFnError(f"--reward_fn {spec!r}: importing {where} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardFnError(f"--reward_fn {spec!r}: {where} has no function {name!r}")
    return fn


def outcome_scores(trajs, rows, grader=None, reward_fn=None):
    """(N,) float in [0, 1]: 1 or 0 from the built-in grader against row["answer"], or
    reward_fn(record, row) with record = rollout.trajectory_record(traj) plus its "answer" (what
    extract_answer finds) and "final_text"; True/False count as 1/0."""
    if reward_fn is None:
        return grade(trajs, [row["answer"] for row in rows], grader).float()
    scores = []
    for traj, row in zip(trajs, rows, strict=True):
        record = {**rollout.trajectory_record(traj), "answer": extract_answer(traj.final_text),
                  "final_text": traj.final_text}  # fmt: skip
        value = reward_fn(record, row)
        if isinstance(value, numbers.Real) and 0 <= value <= 1:  # bool is a Real; NaN fails the test
            scores.append(float(value))
        else:
            name = getattr(reward_fn, "__name__", reward_fn)
            raise RewardFnError(f"--reward_fn {name} returned {value!r} for problem {row.get('id', row['problem'][:40])!r}: "
                                "expected True/False or a number in [0, 1]")  # fmt: skip
    return torch.tensor(scores)


# ---------------------------------------------------------------- shaping


def shape_outcomes(correct, code_embeddings, group_index, alpha=0.5):
    """GTPO's self-supervised shaping of the outcome reward. (N,)

        correct trajectory i:                    1
        failed i, its group has correct ones,
        and i has code (a non-zero embedding):   alpha * mean_{p correct in group} max(cos(e_i, e_p), 0)
        otherwise:                               0

    correct (N,) bool; code_embeddings (N, D) float, a zero row for a trajectory without code;
    group_index (N,) long. Cosines are computed in float64 and clipped to [0, 1].
    """
    assert correct.dtype == torch.bool and correct.dim() == 1, "correct must be (N,) bool"
    assert code_embeddings.dim() == 2 and code_embeddings.shape[0] == correct.shape[0], (
        "embeddings must be (N, D)"
    )
    e = code_embeddings.double()
    norms2 = (e * e).sum(dim=1)  # (N,)
    has_code = norms2 > 0
    dots = e @ e.T  # (N, N)
    cos = (dots / (norms2[:, None] * norms2[None, :]).sqrt().clamp(min=1e-300)).clamp(0.0, 1.0)  # (N, N)
    reference = (group_index[:, None] == group_index[None, :]) & correct[
        None, :
    ]  # (N, N) p correct, same group
    count = reference.sum(dim=1)  # (N,)
    mean_cos = (cos * reference).sum(dim=1) / count.clamp(min=1)
    shaped = torch.where(~correct & (count > 0) & has_code, alpha * mean_cos, 0.0)
    return torch.where(correct, 1.0, shaped).float()


def trajectory_code(traj):
    """The concatenated code of all turns (what shaping compares)."""
    return "\n".join(t.code for t in traj.turns if t.code)


class TokenCountEmbedder:
    """Cosine of token-count vectors from the policy's tokenizer: no extra model. Vectors are
    counts over the distinct token ids of the batch, so D stays small."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts):
        ids = [self.tokenizer.encode(t, add_special_tokens=False) if t else [] for t in texts]
        vocab = {tok: k for k, tok in enumerate(sorted({tok for row in ids for tok in row}))}
        counts = torch.zeros(len(texts), max(len(vocab), 1), dtype=torch.float64)  # (N, D)
        for i, row in enumerate(ids):
            for tok in row:
                counts[i, vocab[tok]] += 1
        return counts


class MeanPooledEmbedder:
    """Mean-pooled last hidden states of a Hugging Face encoder (or of the policy itself),
    batched, with a cache by text that new_step() clears."""

    def __init__(self, encoder, tokenizer, batch_size=32, max_length=512):
        self.encoder, self.tokenizer = encoder, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.cache = {}

    def new_step(self):
        self.cache.clear()

    @torch.no_grad()
    def _embed(self, texts):
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        batch = {k: v.to(self.encoder.device) for k, v in batch.items()}
        base = getattr(self.encoder, "model", self.encoder)  # a causal LM's body, or the encoder
        hidden = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return ((hidden * weights).sum(1) / weights.sum(1).clamp(min=1)).double().cpu()  # (B, H)

    def __call__(self, texts):
        todo = sorted({t for t in texts if t and t not in self.cache})
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            for text, vector in zip(chunk, self._embed(chunk)):
                self.cache[text] = vector
        width = next(iter(self.cache.values())).shape[0] if self.cache else 1
        zero = torch.zeros(width, dtype=torch.float64)
        return torch.stack([self.cache[t] if t else zero for t in texts])  # (N, H)


def make_embedder(spec, tokenizer=None, policy=None):
    """'tokens' (the default: free, and it measures what the paper's shaping rewards — shared
    code — without a second model), 'hf:<path>' (a local Hugging Face encoder), or 'policy'."""
    if spec == "tokens":
        return TokenCountEmbedder(tokenizer)
    if spec == "policy":
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return MeanPooledEmbedder(policy, tokenizer)
    if spec.startswith("hf:"):
        from transformers import AutoModel, AutoTokenizer

        path = spec[3:]
        return MeanPooledEmbedder(AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path))
    raise ValueError(f"unknown embedder {spec!r}: use 'tokens', 'policy' or 'hf:<path>'")


# ---------------------------------------------------------------- metrics


def reward_metrics(correct, outcomes, format_errors):
    """What the trainer logs: accuracy, format-error rate, the share of failed trajectories that
    got partial credit, their mean credit, and the correlation of outcome reward with correctness
    over the batch (a falling correlation warns of similarity hacking)."""
    failed = ~correct
    shaped = failed & (outcomes > 0)
    c, o = correct.double(), outcomes.double()
    corr = (
        torch.corrcoef(torch.stack([c, o]))[0, 1]
        if c.std() > 0 and o.std() > 0
        else torch.tensor(float("nan"))
    )
    return {
        "accuracy": float(c.mean()),
        "format_error_rate": float(format_errors.double().mean()),
        "shaped_share": float(shaped.sum() / failed.sum().clamp(min=1)),
        "shaped_mean": float(o[shaped].mean()) if shaped.any() else 0.0,
        "reward_correctness_corr": float(corr),
    }
