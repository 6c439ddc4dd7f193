"""Problem sets: JSONL files of math problems with their answers, and the built-in toy task.

    problems = load_problems("dapo17k.jsonl")       # [{"problem": ..., "answer": ..., ...}, ...]
    rows = load_trajectories("sft.jsonl")           # SFT: {"problem", "answer", "turns": [...]}
    problems = load_hf_dataset("hf:org/name:train") # needs the optional `datasets` package
    problems = toy_problems(1000, seed=0)           # the toy task, each with its teacher's turns

One JSON object per line with "problem" (or "question") and "answer"; other keys are kept; blank
lines are skipped. Any bad line is an error that names the file, the line number and what is
wrong, and nothing is half-loaded.
"""

import json
import os
import random


class DataError(ValueError):
    """A problem file that cannot be used, with the file and line in the message."""


def parse_problem(obj, where):
    """One problem dict from a decoded JSON value; `where` ("file:line") prefixes any error."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    problem = obj.get("problem", obj.get("question"))
    if not isinstance(problem, str) or not problem.strip():
        raise DataError(f"{where}: needs a non-empty string 'problem' (or 'question'); keys: {sorted(obj)}")
    if "answer" not in obj or obj["answer"] is None or str(obj["answer"]).strip() == "":
        raise DataError(f"{where}: needs a non-empty 'answer'")
    out = {k: v for k, v in obj.items() if k != "question"}
    out["problem"], out["answer"] = problem, str(obj["answer"])
    return out


def parse_trajectory(obj, where):
    """An SFT row: a problem (see parse_problem) plus "turns", the assistant's turn texts."""
    row = parse_problem(obj, where)
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
        raise DataError(f"{where}: needs 'turns', a non-empty list of the assistant's turn texts")
    return row


def read_jsonl(path, parse, what):
    """Every line of a JSONL file through parse(obj, "file:line"); blank lines skipped; a missing
    or empty file or a bad line is a DataError naming the file and line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            rows.append(parse(obj, where))
    if not rows:
        raise DataError(f"{path}: no {what} in the file")
    return rows


def load_problems(path):
    """All problems of a JSONL file, in file order."""
    return read_jsonl(path, parse_problem, "problems")


def load_trajectories(path):
    """All SFT trajectories of a JSONL file ({"problem", "answer", "turns": [...]}), in file order.
    Tool calls in the turns are run by the sandbox when the trajectory is built, so the tool
    outputs the model is trained after are real (and masked, as in RL)."""
    return read_jsonl(path, parse_trajectory, "trajectories")


def load_hf_dataset(spec):
    """Problems from the Hugging Face hub or cache, "hf:NAME[:SPLIT]" (default split "train"),
    mapping problem/question/prompt and answer/solution columns. Needs the `datasets` package,
    which is optional."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{spec}: the optional `datasets` package is not installed (pip install datasets)"
        ) from None
    name, _, split = spec[3:].partition(":")
    table = datasets.load_dataset(name, split=split or "train")
    problems = []
    for k, row in enumerate(table):
        obj = {
            "problem": row.get("problem") or row.get("question") or row.get("prompt"),
            "answer": row.get("answer", row.get("solution")),
            "id": row.get("id", f"{name}-{k}"),
        }
        problems.append(parse_problem(obj, f"{spec} row {k}"))
    return problems


# ---------------------------------------------------------------- the built-in toy task
#
# Problems a small model cannot do in its head but can with a tool: modular powers, products of
# large numbers, counting with a condition; and two-step problems whose second tool call needs the
# first call's printed output (two dependent tool turns). Every answer is computed here; the
# teacher writes what a solver would: one code block per tool turn, then the boxed answer, and
# with probability mistake_rate one call with a mistake (an undefined name) before the right one,
# so SFT shows reading an error and fixing it in the next turn.

TOY_FAMILIES = ("pow", "mul", "count", "chain_pow", "chain_digits")
TWO_STEP_FAMILIES = ("chain_pow", "chain_digits")


def _toy_problem(family, rng):
    """(problem text, answer, steps); steps[k] = (code, the same code with a mistake) of tool turn
    k, with earlier outputs written in as the literals a solver would copy from the output."""
    r = rng.randint
    if family == "pow":
        a, b, m = r(2, 99), r(10, 999), r(100, 9999)
        code = f"print(pow({a}, {b}, {m}))"
        return f"What is {a}^{b} mod {m}?", pow(a, b, m), [(code, code.replace("pow", "powmod"))]
    if family == "mul":
        a, b = r(100, 9999), r(100, 9999)
        return f"What is {a} * {b}?", a * b, [(f"print({a} * {b})", f"print({a} * b)")]
    if family == "count":
        x, a, b = r(100, 9999), r(2, 19), r(2, 19)
        code = f"print(sum(1 for n in range(1, {x} + 1) if n % {a} == 0 or n % {b} == 0))"  # x as written
        count = sum(1 for n in range(1, x + 1) if n % a == 0 or n % b == 0)
        return (
            f"How many n from 1 to {x} are multiples of {a} or {b}?",
            count,
            [(code, code.replace("n %", "k %", 1))],
        )
    if family == "chain_pow":
        a, b, m, c = r(2, 99), r(10, 999), r(100, 9999), r(11, 999)
        x, first = pow(a, b, m), f"print(pow({a}, {b}, {m}))"
        steps = [(first, first.replace("pow", "powmod")), (f"print({x} * {c})", f"print(x * {c})")]
        return f"Let x = {a}^{b} mod {m}. What is x * {c}?", x * c, steps
    if family == "chain_digits":
        a, b, c = r(2, 99), r(10, 99), r(11, 999)
        s, first = sum(map(int, str(a**b))), f"print(sum(int(d) for d in str({a} ** {b})))"
        steps = [(first, first.replace("int(d)", "int(digit)")), (f"print({s} * {c})", f"print(s * {c})")]
        return f"Let s be the digit sum of {a}^{b}. What is s * {c}?", s * c, steps
    raise ValueError(f"unknown toy family {family!r}; known: {TOY_FAMILIES}")


def toy_problems(n, seed=0, families=TOY_FAMILIES, mistake_rate=0.25):
    """n toy problems, families in turn; each holds problem, answer, id, family and teacher (the
    assistant's turn texts: at most 4, for a two-step problem with a mistake). The same arguments
    give the same problems."""
    rng = random.Random(seed)
    problems = []
    for k in range(n):
        family = families[k % len(families)]
        text, answer, steps = _toy_problem(family, rng)
        slip = rng.randrange(len(steps)) if rng.random() < mistake_rate else None  # at most one mistake
        teacher = []
        for j, (code, wrong) in enumerate(steps):
            if j == slip:
                teacher.append(f"```python\n{wrong}\n```")  # the error comes back; the next turn fixes it
            teacher.append(f"```python\n{code}\n```")
        teacher.append(f"\\boxed{{{answer}}}")
        problems.append(
            {
                "problem": text,
                "answer": str(answer),
                "id": f"toy-{seed}-{k}",
                "family": family,
                "teacher": teacher,
            }
        )
    return problems


def toy_held_out(n, train_size=3000, train_mistake_rate=0.25, seed=1, exclude=()):
    """The toy task's held-out set: n problems drawn with another seed than training's
    (toy_problems(train_size, 0, mistake_rate=train_mistake_rate)), any that also occur in
    training or in `exclude` (problems, e.g. the held-out set when drawing a validation set) removed."""
    seen = {p["problem"] for p in toy_problems(train_size, seed=0, mistake_rate=train_mistake_rate)}
    seen |= {p["problem"] for p in exclude}
    return [p for p in toy_problems(n, seed=seed) if p["problem"] not in seen]
