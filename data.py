"""Problem sets: every data file or hub set goes through load(); a train.py run's sets.

    rows, summary = load("gsm8k.jsonl")                        # rows: [{"problem", "answer", "id", ...}]
    rows, summary = load("hf:openai/gsm8k:main:test")          # needs the optional `datasets` package
    rows, summary = load("dapo.parquet", answer_key="reward_model.ground_truth")  # needs `pyarrow`
    rows, summary = load("sft.jsonl", trajectories=True)       # SFT rows: each also has "turns"
    sets = load_run(cfg)                                        # a train.py run's RL, held-out, SFT sets

summary is one line for the log, e.g. "gsm8k.jsonl: 150 rows, 148 answers (148 from '#### N'),
2 refused (2 no answer: first gsm8k.jsonl:7)". ("toy" is not a file: the callers draw it themselves.)

Formats, by suffix: .jsonl (one JSON object per line; blank lines skipped), .json (an array of
objects, or an object with exactly one list-valued key, as {"data": [...]}), .parquet, and
hf:NAME[:CONFIG][:SPLIT] (split "train" by default). In hf:NAME:X, X is the split if it is one of
train, test, validation, dev or holds "[" (a slice: "train[:100]"), and else the config.

Each row becomes {"problem": str, "answer": str (the gold final answer), "id", every other column
as it was}: a reward function gets the whole row. The column the problem came from ("question",
say) is replaced by "problem"; a worked solution that "answer" held is kept as "solution". "id" is
the row's own or "<set name>-<row index>". problem_key and answer_key name a column or a dotted
path into nested columns ("reward_model.ground_truth"); "auto" takes the first present (not null)
of PROBLEM_KEYS and of ANSWER_KEYS, short final answers before worked solutions.

A problem given as chat messages [{"role", "content"}, ...] is the content of the LAST "user"
message only (a system message or earlier turns are not used); the list is kept as "messages".
The gold answer is what follows the last "####" (GSM8K; "1,234" -> "1234"), else the content of
the last \\boxed{...} or \\fbox{...} (MATH; braces nest), else the value itself (a number, or a
text of one line and at most 100 characters). A longer text with neither is no final answer.

A row with no problem, no answer, no final answer or (trajectories=True) no "turns" (a non-empty
list of non-empty texts) is skipped and counted by reason, and the summary names the first of
each reason, as file:line (JSONL) or "file row k" (k from 0). What makes the file unusable as a
whole (missing, empty, not JSON, a row that is not an object) is a DataError naming the file and
line, and nothing is half-loaded; so is a set whose every row is refused (listing the first row's
keys, so a wrong problem_key shows).
"""

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass

import tasks

PROBLEM_KEYS = ("problem", "question", "prompt", "Problem", "Question", "input")
ANSWER_KEYS = (
    "answer",
    "final_answer",
    "ground_truth",
    "reward_model.ground_truth",
    "Answer",
    "solution",
    "Solution",
    "output",
)
HF_SPLITS = ("train", "test", "validation", "dev")
FORMATS = ".jsonl, .json, .parquet or hf:NAME[:CONFIG][:SPLIT]"
SHORT_ANSWER = 100  # characters: a longer answer value without '####' or \boxed is a worked solution
FROM_HASHES, FROM_BOXED, AS_GIVEN = "from '#### N'", "from \\boxed{}", "as given"  # how an answer was found
THOUSANDS = re.compile(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?")
BOXED = re.compile(r"\\(?:boxed|fbox)\b")  # a text that boxes its answer: \boxed{...}, \fbox{...}, \boxed 5


class DataError(ValueError):
    """A data set that cannot be used, with the file and line (or row) in the message."""


def load(spec, problem_key="auto", answer_key="auto", trajectories=False):
    """(rows, summary) of a data set (see the module docstring): every usable row adapted to
    {"problem", "answer", "id", ...}, and one line saying how many were loaded and refused, and why."""
    name, records = read_records(spec)
    if not records:
        raise DataError(f"{spec}: no rows in it")
    rows, sources, refused = [], Counter(), {}  # refused: reason -> [count, where the first was]
    for index, (where, obj) in enumerate(records):
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        row, outcome = adapt_row(obj, f"{name}-{index}", problem_key, answer_key, trajectories)
        if row is None:
            refused.setdefault(outcome, [0, where])[0] += 1
        else:
            rows.append(row)
            sources[outcome] += 1
    reasons = "; ".join(f"{n} {reason}: first {where}" for reason, (n, where) in refused.items())
    if not rows:
        keys = ", ".join(keys_of(records[0][1]))
        raise DataError(
            f"{spec}: every row was refused ({reasons}); the first row's keys: {keys} "
            "(name the columns with problem_key / answer_key)"
        )
    how = ", ".join(f"{n} {source}" for source, n in sources.items())
    summary = f"{spec}: {len(records)} rows, {len(rows)} answers ({how}), {len(records) - len(rows)} refused"
    return rows, summary + (f" ({reasons})" if refused else "")


def load_problems(path):
    """The rows of load(path), for callers that do not print its summary."""
    return load(path)[0]


def load_trajectories(path):
    """The SFT rows of load(path, trajectories=True): {"problem", "answer", "turns": [...], ...}.
    Tool calls in the turns are run by the sandbox when the trajectory is built, so the tool
    outputs the model is trained after are real (and masked, as in RL)."""
    return load(path, trajectories=True)[0]


def load_hf_dataset(spec):
    """The rows of load("hf:NAME[:CONFIG][:SPLIT]"); needs the optional `datasets` package."""
    return load(spec)[0]


# ---------------------------------------------------------------- adapting one row


def adapt_row(obj, made_id, problem_key, answer_key, trajectories):
    """(row, how its answer was found) if the row is usable, else (None, why it is refused)."""
    problem_from, problem = pick(obj, problem_key, PROBLEM_KEYS)
    if problem_from is None:
        return None, "no problem"
    text = problem_text(problem)
    if text is None:
        return None, "empty problem"
    answer_from, answer = pick(obj, answer_key, ANSWER_KEYS)
    if answer_from is None:
        return None, "no answer"
    final, how = final_answer(answer)
    if final is None:
        return None, how
    if trajectories and not has_turns(obj):
        return None, "no turns"
    row = dict(obj)
    if problem_from in obj and problem_from != "problem":
        del row[problem_from]  # the same value is now "problem" (or "messages")
    if isinstance(problem, list):
        row["messages"] = problem
    if answer_from == "answer" and how != AS_GIVEN:
        row.setdefault("solution", answer)
    row["problem"], row["answer"] = text, final
    if row.get("id") is None:
        row["id"] = made_id
    return row, how


def has_turns(obj):
    """Whether the row has "turns", a non-empty list of the assistant's (non-empty) turn texts."""
    turns = obj.get("turns")
    return isinstance(turns, list) and bool(turns) and all(t and isinstance(t, str) for t in turns)


def lookup(obj, key):
    """obj[key] if the row has that column, else the value at the dotted path key ("a.b" is
    obj["a"]["b"]); None if there is none."""
    if key in obj:
        return obj[key]
    value = obj
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def pick(obj, key, auto_keys):
    """(key, value) of `key`, or with "auto" of the first of auto_keys present (not null);
    (None, None) if there is none."""
    for k in auto_keys if key == "auto" else (key,):
        value = lookup(obj, k)
        if value is not None:
            return k, value
    return None, None


def problem_text(value):
    """The problem text: a string as it is, or the content of the last "user" message of a list
    of chat messages; None if that is not a non-blank string."""
    if isinstance(value, list):
        users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
        value = users[-1] if users else None
    return value if isinstance(value, str) and value.strip() else None


def final_answer(value):
    """(gold final answer, how it was found: FROM_HASHES, FROM_BOXED or AS_GIVEN) of an answer
    value, or (None, why there is none: "no answer" or "no final answer")."""
    if isinstance(value, (list, tuple, dict)):
        return None, "no final answer"
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 204.0 (a float column) is the answer 204
    text = str(value).strip()
    if not text:
        return None, "no answer"
    if "####" in text:  # GSM8K: the worked solution, then "#### N"
        tail = text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
        tail = tail.replace(",", "") if THOUSANDS.fullmatch(tail) else tail
        return (tail, FROM_HASHES) if tail else (None, "no final answer")
    if BOXED.search(text):
        boxed = boxed_answer(text)
        return (boxed, FROM_BOXED) if boxed else (None, "no final answer")
    if "\n" in text or len(text) > SHORT_ANSWER:
        return None, "no final answer"
    return text, AS_GIVEN


def closing_braces(text):
    """{index of each '{': index of its matching '}'} in one pass (unmatched ones absent)."""
    pairs, open_at = {}, []
    for k, ch in enumerate(text):
        if ch == "{":
            open_at.append(k)
        elif ch == "}" and open_at:
            pairs[open_at.pop()] = k
    return pairs


def boxed_answer(text):
    """The content of the last \\boxed{...} or \\fbox{...} whose braces close (they may nest), else
    of a bare "\\boxed 5"; None when there is neither. Gold solutions (here) and the model's final
    turn (grading.extract_answer) are read alike."""
    starts = [m.end() - 1 for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    pairs = closing_braces(text) if starts else {}
    for start in reversed(starts):
        if start in pairs:
            return text[start + 1 : pairs[start]].strip()
    match = re.search(r"\\boxed\s+([^\s$]+)", text)
    return match.group(1).strip() if match else None


def keys_of(obj):
    """The row's keys, each dict-valued one followed by its own keys as dotted paths (as
    problem_key and answer_key take them)."""
    keys = []
    for k, v in obj.items():
        keys.append(k)
        keys += [f"{k}.{sub}" for sub in v] if isinstance(v, dict) else []
    return keys


# ---------------------------------------------------------------- reading each format


def read_records(spec):
    """(set name, [(where, record)]) of a data set in any accepted format; where is "file:line"
    or "file row k". A file that cannot be read is a DataError naming it."""
    if spec.startswith("hf:"):
        return read_hf(spec)
    readers = {".jsonl": jsonl_records, ".json": read_json, ".parquet": read_parquet}
    suffix = os.path.splitext(spec)[1].lower()
    if suffix not in readers:
        raise DataError(f"{spec}: unknown format {suffix or '(no suffix)'!r}; accepted: {FORMATS}")
    if not os.path.isfile(spec):
        raise DataError(f"{spec}: no such file")
    try:
        return os.path.splitext(os.path.basename(spec))[0], readers[suffix](spec)
    except UnicodeDecodeError as e:
        raise DataError(f"{spec}: not UTF-8 text (byte {e.start})") from None


def jsonl_records(path):
    """[(file:line, decoded value)] of every non-blank line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                where = f"{path}:{number}"
                try:
                    records.append((where, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    return records


def read_jsonl(path, parse, what):
    """Every line of any JSONL file (train.py's metrics, say) through parse(value, "file:line");
    a missing or empty file or a line that is not JSON is a DataError naming the file and line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    rows = [parse(obj, where) for where, obj in jsonl_records(path)]
    if not rows:
        raise DataError(f"{path}: no {what} in the file")
    return rows


def read_json(path):
    """[(file row k, value)] of a JSON array, or of the one list in a JSON object ({"data": [...]})."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        value = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(value, dict):
        lists = [k for k, v in value.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(
                f"{path}: a JSON object must hold exactly one list of rows, as "
                f'{{"data": [...]}}; this one has {len(lists)}: {lists}'
            )
        value = value[lists[0]]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(value).__name__}")
    return [(f"{path} row {k}", obj) for k, obj in enumerate(value)]


def read_parquet(path):
    """[(file row k, row dict)] of a parquet file; needs the optional `pyarrow` package."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs the optional `pyarrow` package (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowIOError and ArrowInvalid
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    return [(f"{path} row {k}", obj) for k, obj in enumerate(table.to_pylist())]


def parse_hf_spec(spec):
    """(name, config or None, split) of "hf:NAME[:CONFIG][:SPLIT]" (the rule for hf:NAME:X is in
    the module docstring); colons inside a slice ("train[:100]") do not split."""
    parts = re.split(r":(?![^\[]*\])", spec.removeprefix("hf:"))
    if not parts[0] or len(parts) > 3:
        raise DataError(f"{spec}: expected hf:NAME[:CONFIG][:SPLIT]")
    if len(parts) == 2 and (parts[1] in HF_SPLITS or "[" in parts[1]):
        parts.insert(1, None)
    name, config, split = parts + [None] * (3 - len(parts))
    return name, config or None, split or "train"


def read_hf(spec):
    """(name, [(spec row k, row)]) of a Hugging Face hub (or cached) set; needs the optional
    `datasets` package."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: the optional `datasets` package is not installed (pip install datasets)") from None
    name, config, split = parse_hf_spec(spec)
    args = (name, config) if config else (name,)
    try:
        table = datasets.load_dataset(*args, split=split)
    except Exception as e:  # the hub, the cache and a bad config or split each raise their own kind
        call = f"datasets.load_dataset({', '.join(map(repr, args))}, split={split!r})"
        raise DataError(f"{spec}: {call} failed: {type(e).__name__}: {e}") from None
    return name, [(f"{spec} row {k}", row) for k, row in enumerate(table)]


# ---------------------------------------------------------------- the problems of a train.py run


@dataclass
class RunData:
    train: list  # RL problems (and, for files, the SFT checks' validation problems: the first val_size)
    held_out: list  # evaluated before and after RL
    validation: list  # greedy-checked during SFT
    sft_rows: list  # SFT trajectories {problem, answer, turns}
    sft_steps: int  # --sft_steps, or one pass over sft_rows (config.ONE_PASS)


def load_run(cfg, log=print):
    """A train.py config's problem sets. The toy task is the same for every seed; its validation
    problems are a third draw, disjoint from the other two. Files and hf: sets go through load(),
    whose one-line summary goes to log (None: silent, as on ranks other than 0)."""

    def read(spec, trajectories=False):
        rows, summary = load(spec, problem_key=cfg.problem_key, answer_key=cfg.answer_key, trajectories=trajectories)
        if log:
            log(f"data: {summary}")
        return rows

    toy = cfg.data == "toy"
    train = tasks.toy_problems(cfg.toy_size, seed=0, mistake_rate=cfg.toy_mistake_rate) if toy else read(cfg.data)
    held_out = []
    if (cfg.eval_data == "toy" or cfg.eval_data == "auto" and toy) and cfg.eval_size:
        held_out = tasks.toy_held_out(cfg.eval_size, cfg.toy_size, cfg.toy_mistake_rate)
    elif cfg.eval_data not in ("auto", "", "none") and cfg.eval_size:
        held_out = read(cfg.eval_data)[: cfg.eval_size]
    sft_rows = []
    if cfg.sft_steps != 0 and cfg.sft_data == "toy":
        teachers = train if toy else tasks.toy_problems(cfg.toy_size, seed=0)
        sft_rows = [dict(p, turns=p["teacher"]) for p in teachers]
    elif cfg.sft_steps != 0:
        sft_rows = read(cfg.sft_data, trajectories=True)
    validation = []
    if cfg.sft_steps != 0 and cfg.sft_check_every and cfg.val_size:
        validation = (
            tasks.toy_held_out(cfg.val_size, cfg.toy_size, cfg.toy_mistake_rate, seed=2, exclude=held_out)
            if toy
            else train[: cfg.val_size]
        )
    steps = math.ceil(len(sft_rows) / cfg.sft_batch_size) if cfg.sft_steps is None else cfg.sft_steps
    return RunData(train=train, held_out=held_out, validation=validation, sft_rows=sft_rows, sft_steps=steps)
