"""Properties of data.py: JSONL problem files load exactly, and bad lines fail loudly and precisely."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import data

texts = st.text(min_size=1, max_size=30).filter(str.strip)
extras = st.dictionaries(st.sampled_from(["id", "source", "level"]), st.integers() | texts, max_size=2)


@given(st.lists(st.tuples(texts, texts | st.integers(), extras, st.booleans()), min_size=1, max_size=8))
def test_jsonl_round_trips_with_extra_keys_and_question_alias(tmp_path_factory, rows):
    """Whatever is written (problem or question, extra keys, blank lines) loads back in order,
    with 'problem' set, the answer as a string and the extra keys kept."""
    path = tmp_path_factory.mktemp("d") / "p.jsonl"
    lines = []
    for problem, answer, extra, as_question in rows:
        lines.append(
            json.dumps({("question" if as_question else "problem"): problem, "answer": answer, **extra})
        )
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    loaded = data.load_problems(str(path))
    assert [p["problem"] for p in loaded] == [r[0] for r in rows]
    assert [p["answer"] for p in loaded] == [str(r[1]) for r in rows]
    for p, (_, _, extra, _) in zip(loaded, rows):
        assert all(p[k] == v for k, v in extra.items()) and "question" not in p


@pytest.mark.parametrize(
    "bad,message",
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"answer": "1"}', "needs a non-empty string 'problem'"),
        ('{"problem": "  ", "answer": "1"}', "needs a non-empty string 'problem'"),
        ('{"problem": "What?"}', "needs a non-empty 'answer'"),
        ('{"problem": "What?", "answer": null}', "needs a non-empty 'answer'"),
    ],
)
def test_a_bad_line_is_an_error_naming_the_file_and_line(tmp_path, bad, message):
    """A bad line raises DataError whose message has file:line (the real line number) and the fault."""
    path = tmp_path / "p.jsonl"
    path.write_text('{"problem": "1+1?", "answer": "2"}\n\n' + bad + "\n", encoding="utf-8")
    with pytest.raises(data.DataError, match=rf"{path}:3: .*{message}"):
        data.load_problems(str(path))


def test_a_missing_or_empty_file_is_an_error(tmp_path):
    """A path that does not exist, or a file with no problems, is a DataError naming the path."""
    with pytest.raises(data.DataError, match="no such file"):
        data.load_problems(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(data.DataError, match="no problems"):
        data.load_problems(str(tmp_path / "empty.jsonl"))


def test_hf_datasets_are_mapped_by_column_and_bad_rows_are_named(monkeypatch):
    """hf:NAME:SPLIT asks `datasets` for that split and maps problem/question/prompt and
    answer/solution; a row without a problem is an error naming the spec and the row; without
    the optional package the error says how to install it. (`datasets` is stood in for here:
    the package is optional and the hub is offline.)"""
    import sys
    import types

    asked = []
    tables = {"good": [{"question": "1+1?", "answer": 2}, {"prompt": "2+2?", "solution": "4", "id": "x"}],
              "bad": [{"problem": "ok", "answer": 1}, {"answer": 3}]}  # fmt: skip
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, split: asked.append((name, split)) or tables[name]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    problems = data.load_hf_dataset("hf:good:test")
    assert asked == [("good", "test")]
    got = [(p["problem"], p["answer"], p["id"]) for p in problems]
    assert got == [("1+1?", "2", "good-0"), ("2+2?", "4", "x")]
    with pytest.raises(data.DataError, match=r"hf:bad row 1: needs a non-empty string 'problem'"):
        data.load_hf_dataset("hf:bad")
    assert asked[-1] == ("bad", "train")
    monkeypatch.setitem(sys.modules, "datasets", None)  # an import of it now fails
    with pytest.raises(data.DataError, match="pip install datasets"):
        data.load_hf_dataset("hf:good")


def test_toy_held_out_and_validation_sets_are_disjoint_from_training_and_each_other():
    """The held-out set and the validation set (a third draw that excludes the held-out set)
    share no problem with the training draw or with each other, and cover every family."""
    train = {p["problem"] for p in data.toy_problems(3000, seed=0)}
    held_out = data.toy_held_out(100)
    validation = data.toy_held_out(50, seed=2, exclude=held_out)
    held, val = {p["problem"] for p in held_out}, {p["problem"] for p in validation}
    assert not (held & train) and not (val & train) and not (held & val)
    assert {p["family"] for p in validation} == set(data.TOY_FAMILIES)
