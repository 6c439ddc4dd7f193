"""Problem sets: JSONL files of math problems with their answers.

    problems = load_problems("dapo17k.jsonl")      # [{"problem": ..., "answer": ..., ...}, ...]

One JSON object per line with "problem" (or "question") and "answer"; other keys are kept; blank
lines are skipped. Any bad line is an error that names the file, the line number and what is
wrong, and nothing is half-loaded. (The built-in toy task belongs here too; it comes with the
training loop.)
"""

import json
import os


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


def load_problems(path):
    """All problems of a JSONL file, in file order."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    problems = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            problems.append(parse_problem(obj, where))
    if not problems:
        raise DataError(f"{path}: no problems in the file")
    return problems
