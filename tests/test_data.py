"""Properties of data.py: every format loads through one adapter to {"problem", "answer", "id", ...};
refused rows are counted and named; files that cannot be read fail loudly and precisely."""

import json
import sys
import types

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import data
import tasks

texts = st.text(min_size=1, max_size=30).filter(str.strip)
plain_answers = texts.filter(lambda s: "\n" not in s and "####" not in s and "\\" not in s)
extras = st.dictionaries(st.sampled_from(["id", "source", "level"]), st.integers() | texts, max_size=2)

# One small fixture per common layout: (rows, load keyword arguments, expected (problem, answer)s,
# how the answers were found).
GSM8K = [
    {"question": "Tom has 3 bags of 24 apples. How many apples?", "answer": "3*24 = 72\n#### 72"},
    {"question": "What is 999 + 235?", "answer": "999 + 235 = 1234\nSo:\n#### 1,234"},
]
MATH = [
    {
        "problem": "What is $1/4 + 1/4$?",
        "level": "Level 1",
        "type": "Prealgebra",
        "solution": "We add: $\\frac{1}{4}+\\frac{1}{4} = \\boxed{\\frac{1}{2}}$.",
    },
    {"problem": "Solve $x^2 = 4$, $x > 0$.", "solution": "Try $\\boxed{1}$? No.\nSo $x = \\fbox{2}$."},
]
DAPO = [
    {
        "data_source": "math_dapo",
        "ability": "MATH",
        "prompt": [
            {"role": "system", "content": "Reason step by step."},
            {"role": "user", "content": "A first draft."},
            {"role": "user", "content": "What is 17 * 2?"},
        ],
        "reward_model": {"ground_truth": "34", "style": "rule-math"},
        "extra_info": {"index": "a-1"},
    }
]
AIME = [
    {"ID": "2024-I-1", "Problem": "Find the answer to this AIME problem.", "Answer": 204},
    {"ID": "2024-I-2", "Problem": "And this one.", "Answer": 25},
]
STYLES = {
    "gsm8k": (GSM8K, {}, [(GSM8K[0]["question"], "72"), (GSM8K[1]["question"], "1234")], data.FROM_HASHES),
    "math": (MATH, {}, [(MATH[0]["problem"], "\\frac{1}{2}"), (MATH[1]["problem"], "2")], data.FROM_BOXED),
    "dapo_auto": (DAPO, {}, [("What is 17 * 2?", "34")], data.AS_GIVEN),
    "dapo_keyed": (DAPO, {"answer_key": "reward_model.ground_truth"}, [("What is 17 * 2?", "34")], data.AS_GIVEN),
    "aime": (AIME, {}, [(AIME[0]["Problem"], "204"), (AIME[1]["Problem"], "25")], data.AS_GIVEN),
}


def write(tmp_path, rows, fmt):
    """rows written as a data file of format fmt: jsonl, json (an array), json_data ({"data": [...]})
    or parquet (skipped without pyarrow)."""
    path = tmp_path / f"set.{fmt.split('_')[0]}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt.startswith("json"):
        value = {"data": rows} if fmt == "json_data" else rows
        path.write_text(json.dumps(value, indent=1), encoding="utf-8")
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


@pytest.fixture
def fake_datasets(monkeypatch):
    """A stand-in `datasets` module (the package is optional and the hub is offline): load_dataset
    records (name, config, split) in .asked and returns the list of dicts in .tables[name]."""
    fake = types.ModuleType("datasets")
    fake.asked, fake.tables = [], {}

    def load_dataset(name, config=None, split=None):
        fake.asked.append((name, config, split))
        return fake.tables[name]

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    return fake


@pytest.mark.parametrize("fmt", ["jsonl", "json", "json_data", "parquet"])
@pytest.mark.parametrize("style", sorted(STYLES))
def test_each_layout_loads_to_problem_and_final_answer_in_each_format(tmp_path, style, fmt):
    """GSM8K, MATH, DAPO (chat prompt, nested ground truth) and AIME rows in every file format give
    the problem text, the gold final answer as a string, a made id, and the other columns kept."""
    rows, keys, expected, how = STYLES[style]
    path = write(tmp_path, rows, fmt)
    loaded, summary = data.load(path, **keys)
    assert [(r["problem"], r["answer"]) for r in loaded] == expected
    assert [r["id"] for r in loaded] == [f"set-{k}" for k in range(len(rows))]
    assert summary == f"{path}: {len(rows)} rows, {len(rows)} answers ({len(rows)} {how}), 0 refused"
    for row, source in zip(loaded, rows):
        others = {k: v for k, v in source.items() if k not in ("question", "prompt", "Problem", "answer")}
        assert all(row[k] == v for k, v in others.items())  # extra columns pass through, nested too
    if style.startswith("dapo"):
        assert loaded[0]["messages"] == DAPO[0]["prompt"] and "prompt" not in loaded[0]
    if style == "gsm8k":
        assert loaded[0]["solution"] == GSM8K[0]["answer"]  # the worked solution is kept


@given(st.lists(st.tuples(texts, plain_answers | st.integers(), extras, st.booleans()), min_size=1, max_size=8))
def test_jsonl_round_trips_with_extra_keys_and_question_alias(tmp_path_factory, rows):
    """Whatever is written (problem or question, extra keys, blank lines) loads back in order,
    with 'problem' set, a short answer as its (stripped) string and the extra keys kept."""
    path = tmp_path_factory.mktemp("d") / "p.jsonl"
    lines = []
    for problem, answer, extra, as_question in rows:
        lines.append(json.dumps({("question" if as_question else "problem"): problem, "answer": answer, **extra}))
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    loaded = data.load_problems(str(path))
    assert [p["problem"] for p in loaded] == [r[0] for r in rows]
    assert [p["answer"] for p in loaded] == [str(r[1]).strip() for r in rows]
    for p, (_, _, extra, _) in zip(loaded, rows):
        assert all(p[k] == v for k, v in extra.items()) and "question" not in p


@given(st.integers())
def test_any_integer_as_a_gsm8k_answer_with_thousands_separators_extracts_to_the_integer(n):
    """'#### 1,234,567' (any integer, commas every three digits) gives the integer's digits."""
    assert data.final_answer(f"First step.\nSecond step = {n}.\n#### {n:,}") == (str(n), data.FROM_HASHES)


no_markup = st.text(st.characters(exclude_characters="{}\\#"), max_size=8)


def braced(before, inside, after):
    return f"{before}{{{inside}}}{after}"


balanced = st.recursive(no_markup, lambda inner: st.builds(braced, inner, inner, inner), max_leaves=6)


@given(balanced, balanced, no_markup, st.sampled_from(["\\boxed", "\\fbox", "\\boxed "]))
def test_the_last_boxed_content_is_the_answer_with_nested_braces(content, earlier, after, box):
    """In any text, the answer is the content of the last \\boxed{...} / \\fbox{...}, however its
    braces nest, and not an earlier boxed value or the text after it."""
    assume(content.strip())
    text = f"Work \\boxed{{{earlier}}}.\nMore work: {box}{{{content}}}{after}"
    assert data.final_answer(text) == (content.strip(), data.FROM_BOXED)


@pytest.mark.parametrize(
    "value, expected",
    [
        (204, ("204", data.AS_GIVEN)),
        (204.0, ("204", data.AS_GIVEN)),
        (" 1/2 ", ("1/2", data.AS_GIVEN)),
        ("3\n\nSo the answer is 3.", (None, "no final answer")),
        ("x" * 101, (None, "no final answer")),
        ("work\n####  ", (None, "no final answer")),
        ("\\boxed{1", (None, "no final answer")),
        (["3"], (None, "no final answer")),
        ("  ", (None, "no answer")),
    ],
)
def test_a_plain_value_is_its_string_and_a_long_solution_without_a_final_answer_is_none(value, expected):
    """A number or a short one-line text is the answer as given; a worked solution (several lines or
    over 100 characters) with neither '#### N' nor \\boxed, an empty or unclosed one, is none."""
    assert data.final_answer(value) == expected


def test_refused_rows_are_skipped_counted_by_reason_and_the_first_of_each_named(tmp_path):
    """Rows without a usable problem or answer are skipped; the summary counts them per reason and
    names the file:line of the first of each, in order of appearance."""
    path = tmp_path / "gsm8k.jsonl"
    rows = [
        GSM8K[0],
        None,
        {"question": "Q", "answer": "A long\nworked solution\nwith no final line"},
        {"answer": "3"},
        {"question": "  ", "answer": "3"},
        {"question": "Q2"},
        {"question": "Q3", "answer": "So $\\boxed{5}$"},
        {"question": "Q4", "answer": None},
    ]
    path.write_text("".join("\n" if r is None else json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    loaded, summary = data.load(str(path))
    assert [(r["problem"], r["answer"], r["id"]) for r in loaded] == [
        (GSM8K[0]["question"], "72", "gsm8k-0"),
        ("Q3", "5", "gsm8k-5"),
    ]
    p = str(path)
    assert summary == (
        f"{p}: 7 rows, 2 answers (1 {data.FROM_HASHES}, 1 {data.FROM_BOXED}), 5 refused (1 no final answer: "
        f"first {p}:3; 1 no problem: first {p}:4; 1 empty problem: first {p}:5; 2 no answer: first {p}:6)"
    )


def test_every_row_refused_is_an_error_naming_the_reasons_and_the_first_rows_keys(tmp_path):
    """When no row is usable (a wrong key, say), the DataError names each reason and lists the
    first row's keys, nested ones as dotted paths, so the right problem_key / answer_key shows."""
    path = write(tmp_path, [{"query": "1+1?", "meta": {"gold": "2"}}] * 2, "json")
    refused = r"every row was refused \(2 no problem: first .*set.json row 0\)"
    with pytest.raises(data.DataError, match=refused + r".*keys: query, meta, meta.gold"):
        data.load(path)
    with pytest.raises(data.DataError, match=r"2 no answer: first .*keys: query, meta, meta.gold"):
        data.load(path, problem_key="query")
    loaded, _ = data.load(path, problem_key="query", answer_key="meta.gold")
    assert [(r["problem"], r["answer"], r["meta"]) for r in loaded] == [("1+1?", "2", {"gold": "2"})] * 2


def test_dotted_keys_reach_into_nested_columns_and_a_literal_dotted_column_wins(tmp_path):
    """problem_key / answer_key as dotted paths read nested values (the nested column is kept whole);
    a column whose own name has a dot is read as it is."""
    rows = [{"extra_info": {"question": "2+3?"}, "reward_model": {"ground_truth": 5}, "a.b": "7"}]
    path = write(tmp_path, rows, "jsonl")
    (row,), _ = data.load(path, problem_key="extra_info.question", answer_key="reward_model.ground_truth")
    assert (row["problem"], row["answer"], row["extra_info"]) == ("2+3?", "5", {"question": "2+3?"})
    (row,), _ = data.load(path, problem_key="extra_info.question", answer_key="a.b")
    assert row["answer"] == "7"


def test_a_chat_prompt_uses_the_last_user_message_and_keeps_the_messages(tmp_path):
    """A problem given as chat messages is the last user message's content, with the list kept as
    'messages'; a chat list without a user message is refused as an empty problem."""
    chats = [DAPO[0], {"prompt": [{"role": "system", "content": "Be brief."}], "answer": "1"}]
    loaded, summary = data.load(write(tmp_path, chats, "jsonl"))
    assert [r["problem"] for r in loaded] == ["What is 17 * 2?"]
    assert loaded[0]["messages"] == DAPO[0]["prompt"]
    assert summary.endswith("1 refused (1 empty problem: first " + str(tmp_path / "set.jsonl") + ":2)")


def test_trajectories_need_turns_and_rows_without_them_are_refused(tmp_path):
    """With trajectories=True a row also needs 'turns', a non-empty list of non-empty texts; the
    others are counted as 'no turns'."""
    rows = [
        {"problem": "1+1?", "answer": "2", "turns": ["```python\nprint(1+1)\n```", "\\boxed{2}"]},
        {"problem": "2+2?", "answer": "4", "turns": []},
        {"problem": "3+3?", "answer": "6", "turns": ["", "x"]},
        {"problem": "4+4?", "answer": "8"},
    ]
    path = write(tmp_path, rows, "jsonl")
    loaded, summary = data.load(path, trajectories=True)
    assert [r["turns"] for r in loaded] == [rows[0]["turns"]]
    assert data.load_trajectories(path) == loaded
    assert summary.endswith(f"3 refused (3 no turns: first {path}:2)")
    assert len(data.load(path)[0]) == 4  # as problems, every row is usable


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", r":3: not valid JSON"),
        ('["a list"]', r":3: expected a JSON object, got list"),
        ("17", r":3: expected a JSON object, got int"),
    ],
)
def test_a_bad_line_is_an_error_naming_the_file_and_line(tmp_path, bad, message):
    """A line that is not JSON or not an object raises DataError with file:line (the real line number)."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"problem": "1+1?", "answer": "2"}\n\n' + bad + "\n", encoding="utf-8")
    with pytest.raises(data.DataError, match=rf"{path}{message}"):
        data.load(str(path))


@pytest.mark.parametrize(
    "text, message",
    [
        ('[{"problem": "1+1?", "answer": 2},\n {"problem": oops}]', r"set.json:2: not valid JSON"),
        ('[{"problem": "1+1?", "answer": 2}, "text"]', r"set.json row 1: expected a JSON object, got str"),
        ('{"data": [], "more": []}', r"exactly one list of rows.*has 2: \['data', 'more'\]"),
        ('{"data": 3}', r"exactly one list of rows.*has 0"),
        ('"text"', r"expected a JSON array of objects, got str"),
        ("[]", r"set.json: no rows"),
        ("  \n", r"set.json: no rows"),
    ],
)
def test_a_bad_json_file_is_an_error_naming_the_file_and_line_or_row(tmp_path, text, message):
    """A .json file that is not JSON (its line named), not a list of objects (the row named), or
    empty is a DataError."""
    (tmp_path / "set.json").write_text(text, encoding="utf-8")
    with pytest.raises(data.DataError, match=message):
        data.load(str(tmp_path / "set.json"))


def test_a_missing_or_empty_file_or_an_unknown_format_is_an_error(tmp_path):
    """A path that does not exist, a file with no rows, or an unknown suffix is a DataError naming
    the path (and, for a suffix, the accepted formats)."""
    with pytest.raises(data.DataError, match="missing.jsonl: no such file"):
        data.load(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(data.DataError, match="empty.jsonl: no rows"):
        data.load_problems(str(tmp_path / "empty.jsonl"))
    for name in ("set.csv", "set"):
        with pytest.raises(data.DataError, match=rf"{name}: unknown format .*accepted: .jsonl, .json, .parq"):
            data.load(str(tmp_path / name))


def test_read_jsonl_reads_any_jsonl_file_through_parse_and_names_bad_lines(tmp_path):
    """read_jsonl (eval.py reads train.py's metrics with it) passes every line's value and its
    file:line to parse, and a missing file, a file with nothing or a bad line is a DataError."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n[2]\n', encoding="utf-8")
    assert data.read_jsonl(str(path), lambda obj, where: (obj, where), "metrics") == [
        ({"step": 1}, f"{path}:1"),
        ([2], f"{path}:3"),
    ]
    for text, message in (
        ("\n", "metrics.jsonl: no metrics in the file"),
        ('{"step": 1}\n{', "metrics.jsonl:2: not valid JSON"),
    ):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(data.DataError, match=message):
            data.read_jsonl(str(path), lambda obj, where: obj, "metrics")
    with pytest.raises(data.DataError, match="nothing.jsonl: no such file"):
        data.read_jsonl(str(tmp_path / "nothing.jsonl"), lambda obj, where: obj, "metrics")


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    """Reading .parquet without the optional pyarrow package is a DataError saying pip install pyarrow."""
    (tmp_path / "set.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # an import of it now fails
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(data.DataError, match=r"set.parquet: .*pip install pyarrow"):
        data.load(str(tmp_path / "set.parquet"))


@pytest.mark.parametrize(
    "spec, asked",
    [
        ("hf:good", ("good", None, "train")),
        ("hf:good:test", ("good", None, "test")),
        ("hf:good:validation", ("good", None, "validation")),
        ("hf:good:dev", ("good", None, "dev")),
        ("hf:good:main", ("good", "main", "train")),
        ("hf:good:main:test", ("good", "main", "test")),
        ("hf:good:train[:10]", ("good", None, "train[:10]")),
        ("hf:good:main:test[5:9]", ("good", "main", "test[5:9]")),
        ("hf:good::test", ("good", None, "test")),
    ],
)
def test_hf_spec_names_the_set_config_and_split(fake_datasets, spec, asked):
    """hf:NAME[:CONFIG][:SPLIT] asks `datasets` for that name, config and split: a lone second part
    is the split if it is a known split name or a slice, else the config; the split defaults to train."""
    fake_datasets.tables["good"] = GSM8K
    loaded, summary = data.load(spec)
    assert fake_datasets.asked == [asked]
    assert [r["answer"] for r in loaded] == ["72", "1234"] and loaded[0]["id"] == "good-0"
    assert summary.startswith(f"{spec}: 2 rows, 2 answers")


def test_hf_rows_go_through_the_same_adapters_and_refusals(fake_datasets):
    """hf: rows are adapted as file rows are (chat prompt, dotted answer key, made ids), refused rows
    are named "spec row k", the old load_hf_dataset still works, and a bad spec is an error."""
    no_problem = {"text": "1+0?", "reward_model": {"ground_truth": "1"}}
    fake_datasets.tables["org/dapo"] = DAPO + [{"prompt": "No answer here."}, no_problem] + AIME[:1]
    loaded, summary = data.load("hf:org/dapo:train", answer_key="reward_model.ground_truth")
    assert [(r["problem"], r["answer"], r["id"]) for r in loaded] == [("What is 17 * 2?", "34", "org/dapo-0")]
    assert summary.endswith(
        "3 refused (2 no answer: first hf:org/dapo:train row 1; 1 no problem: first hf:org/dapo:train row 2)"
    )
    assert [r["answer"] for r in data.load_hf_dataset("hf:org/dapo")] == ["34", "204"]
    for bad in ("hf:", "hf:a:b:c:d"):
        with pytest.raises(data.DataError, match=r"expected hf:NAME\[:CONFIG\]\[:SPLIT\]"):
            data.load(bad)
    failed = r"hf:missing: datasets.load_dataset\('missing', split='train'\) failed: KeyError"
    with pytest.raises(data.DataError, match=failed):
        data.load("hf:missing")


def test_hf_without_the_datasets_package_says_how_to_install_it(monkeypatch):
    """Without the optional `datasets` package an hf: set is a DataError saying pip install datasets."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # an import of it now fails
    with pytest.raises(data.DataError, match="hf:good: .*pip install datasets"):
        data.load("hf:good")


def test_word_problems_load_through_the_gsm8k_adapter(tmp_path):
    """The built-in GSM8K-format word problems load with every answer taken from '#### N'."""
    rows = tasks.word_problems(30, seed=3)
    loaded, summary = data.load(write(tmp_path, rows, "jsonl"))
    assert [r["answer"] for r in loaded] == [r["answer"].rsplit("#### ", 1)[1] for r in rows]
    assert summary.endswith(f"30 rows, 30 answers (30 {data.FROM_HASHES}), 0 refused")


def test_toy_held_out_and_validation_sets_are_disjoint_from_training_and_each_other():
    """The held-out set and the validation set (a third draw that excludes the held-out set)
    share no problem with the training draw or with each other, and cover every family."""
    train = {p["problem"] for p in tasks.toy_problems(3000, seed=0)}
    held_out = tasks.toy_held_out(100)
    validation = tasks.toy_held_out(50, seed=2, exclude=held_out)
    held, val = {p["problem"] for p in held_out}, {p["problem"] for p in validation}
    assert not (held & train) and not (val & train) and not (held & val)
    assert {p["family"] for p in validation} == set(tasks.TOY_FAMILIES)
