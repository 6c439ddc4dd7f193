"""eval.py: the pass@k estimator, reports that round-trip and resume, evaluation independent of
the number of ranks, greedy determinism, the comparison, the trajectory view and clear errors."""

import dataclasses
import itertools
import json
import re
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

import data
import eval as evaluation
import launch
import rewards
import sandbox
import train
from conftest import SMALL, run_script, torchrun

# The rollout limits come from the checkpoint's training config.json (SMALL's).
LIMITS = dict(
    max_turn_tokens=SMALL["max_turn_tokens"], max_total_tokens=SMALL["max_total_tokens"], max_turns=4
)


@st.composite
def counts(draw):
    n = draw(st.integers(1, 10))
    return n, draw(st.integers(0, n)), draw(st.integers(1, n))


@given(counts())
def test_pass_at_k_is_the_share_of_k_subsets_holding_a_correct_sample(nck):
    """pass_at_k(n, c, k) equals, by brute-force enumeration, the share of the C(n, k) ways to
    pick k of n samples (c of them correct) that hold at least one correct sample."""
    n, c, k = nck
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(any(i < c for i in s) for s in subsets)
    assert evaluation.pass_at_k(n, c, k) == pytest.approx(hits / len(subsets), abs=1e-12)


@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=40))
def test_the_paired_bootstrap_is_antisymmetric_and_brackets_dominance(pairs):
    """The paired bootstrap's difference is mean(b - a), its interval contains it and is ordered;
    swapping a and b negates both; when b >= a on every problem the interval is >= 0."""
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    diff, low, high = evaluation.paired_bootstrap(a, b, resamples=2000)
    assert diff == pytest.approx(sum(y - x for x, y in pairs) / len(pairs), abs=1e-9)
    assert low <= high
    back = evaluation.paired_bootstrap(b, a, resamples=2000)
    assert back == pytest.approx((-diff, -high, -low), abs=1e-9)
    top = [max(x, y) for x, y in pairs]
    assert evaluation.paired_bootstrap(a, top, resamples=2000)[1] >= 0


def cfg_for(model_dir, out, **overrides):
    settings = dict(model=model_dir, data=["toy"], out=str(out), limit=12, sandbox_workers=4)
    return evaluation.Config(**{**settings, **overrides})


def test_greedy_evaluation_is_deterministic_and_agrees_with_training(sft_model, tmp_path):
    """Greedy evaluation gives the same report twice, and its accuracy is exactly train.py's
    held-out greedy accuracy for the same checkpoint and problems (the same rollout and grader).
    The report's figures match its records."""
    first = evaluation.main(cfg_for(sft_model, tmp_path / "a.json"))
    second = evaluation.main(cfg_for(sft_model, tmp_path / "b.json"))
    assert first == second
    assert (
        first["settings"]["training_config"]
        and first["settings"]["max_turn_tokens"] == SMALL["max_turn_tokens"]
    )
    assert first["problems"] and all(len(r["samples"]) == 1 for r in first["problems"])
    problems = data.toy_held_out(100)[:12]
    policy, tokenizer = evaluation.policies.load_policy(sft_model)
    world = launch.World(0, 1, evaluation.torch.device("cpu"))
    cfg = train.Config(model=sft_model, **{**SMALL, "max_turns": 4})
    with sandbox.Pool(4) as pool:
        grader = rewards.Grader()
        trained = train.evaluate(
            policy, policy, tokenizer, problems, cfg, pool, grader, world, temperature=0.0
        )
        grader.close()
    assert first["accuracy"] == trained
    assert first == evaluation.make_report(first["settings"], json.loads(json.dumps(first["problems"])))


def test_a_report_round_trips_and_an_interrupted_run_resumes_to_the_same_report(
    sft_model, tmp_path, monkeypatch
):
    """A run killed after its first batch (the partial file cut mid-line) and run again
    evaluates only the missing batches and writes the same report as an uninterrupted run; the
    report reloads equal; a partial file or report from other settings is an error naming the
    setting, and a finished report is never overwritten by another evaluation."""
    sampled = dict(samples=2, temperature=1.0, batch_size=8)  # 4 problems per batch: 3 batches
    whole = evaluation.main(cfg_for(sft_model, tmp_path / "whole.json", **sampled))
    assert evaluation.load_report(tmp_path / "whole.json") == whole
    assert whole["num_samples"] == 2 and set(whole["pass_at_k"]) == {"1", "2"}
    out = tmp_path / "resumed.json"
    header = {"settings": {**whole["settings"], "model": sft_model}}
    lines = [json.dumps(header)] + [json.dumps(r) for r in whole["problems"][:4]]
    partial = tmp_path / "resumed.json.partial.jsonl"
    partial.write_text("\n".join(lines) + '\n{"key": "toy/4", "se')
    assert len(evaluation.read_partial(str(partial), whole["settings"])) == 4
    assert partial.read_text() == "\n".join(lines) + "\n"  # the cut line is gone: appending is safe
    calls = []
    real = evaluation.evaluate_batch
    monkeypatch.setattr(evaluation, "evaluate_batch", lambda *a: calls.append(a[6]) or real(*a))
    resumed = evaluation.main(cfg_for(sft_model, out, **sampled))
    assert calls == [1, 2] and resumed == whole
    assert not partial.exists()
    with pytest.raises(launch.ConfigError, match="seed=0.*seed=1"):
        evaluation.main(cfg_for(sft_model, out, seed=1, **sampled))
    (tmp_path / "other.json.partial.jsonl").write_text(json.dumps(header) + "\n")
    with pytest.raises(launch.ConfigError, match="samples=2.*samples=1"):
        evaluation.main(cfg_for(sft_model, tmp_path / "other.json"))


def test_sharded_evaluation_under_torchrun_gives_the_same_report(sft_model, tmp_path):
    """`torchrun --nproc_per_node 2 eval.py` (3 batches dealt over 2 ranks, sampled at T = 1)
    writes exactly the report of one process: each batch is seeded by its set and number."""
    flags = ["--model", sft_model, "--data", "toy", "--limit", "12", "--samples", "2", "--temperature", "1",
             "--batch_size", "8", "--sandbox_workers", "4"]  # fmt: skip
    one = run_script([sys.executable, "eval.py", *flags, "--out", str(tmp_path / "one.json")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_script(torchrun("eval.py", *flags, "--out", str(tmp_path / "two.json")), timeout=400)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a["num_problems"] == 12 and a["problems"] == b["problems"] and a["accuracy"] == b["accuracy"]


def test_compare_pairs_problems_by_key_and_reports_the_difference(tmp_path):
    """--compare pairs the problems both reports hold, per set: B - A is the mean per-problem
    accuracy difference; a report against itself differs by exactly 0."""

    def report(path, correct):
        records = [{"key": f"s/{i}", "set": "s", "index": i, "id": None, "problem": f"p{i}", "answer": "1",
                    "correct": c, "samples": [{"correct": j < c, "answer": "1", "stop": "answer", "format_error": False,
                                               "turns": []} for j in range(2)]} for i, c in enumerate(correct)]  # fmt: skip
        path.write_text(json.dumps(evaluation.make_report({"samples": 2}, records)))
        return str(path)

    a, b = report(tmp_path / "a.json", [0, 1, 2, 2]), report(tmp_path / "b.json", [2, 1, 2])
    (row,) = evaluation.compare(a, b)
    assert row["problems"] == 3 and row["diff"] == pytest.approx((1.0 + 0 + 0) / 3)
    (same,) = evaluation.compare(a, a)
    assert same["diff"] == same["ci_low"] == same["ci_high"] == 0


def test_the_view_marks_trained_and_masked_text(sft_model, tmp_path):
    """--show prints every turn's sampled text on T| lines and its tool output on M| lines, with
    the token counts of the record; --html escapes the text and writes next to the report."""
    report = evaluation.main(cfg_for(sft_model, tmp_path / "r.json", limit=5))
    record = next(
        r for r in report["problems"] if any(t["observation_tokens"] for t in r["samples"][0]["turns"])
    )
    text = evaluation.show_text(evaluation.find_problem(report, record["key"]))
    trained = "\n".join(line[3:] for line in text.split("\n") if line.startswith("T| "))
    masked = "\n".join(line[3:] for line in text.split("\n") if line.startswith("M| "))
    turns = record["samples"][0]["turns"]
    assert trained == "\n".join(t["text"] for t in turns)
    assert masked == "\n".join(t["observation"].strip("\n") for t in turns if t["observation_tokens"])
    assert f"turn 1 · {turns[0]['tokens']} tokens trained" in text
    evaluation.main(evaluation.Config(show=str(tmp_path / "r.json"), html=True))
    page = (tmp_path / "r.html").read_text()
    assert (
        "&lt;|im_end|&gt;" in page and "<|im_end|>" not in page and page.count("<details><summary><b>") == 5
    )


def test_plot_draws_every_run_into_one_png(tmp_path):
    """--plot reads metrics.jsonl files and writes a PNG; a bad line names its file and line."""
    pytest.importorskip("matplotlib")
    paths = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        path = tmp_path / run / "metrics.jsonl"
        path.write_text(
            "".join(
                json.dumps({"step": s, "reward": s / 10, "accuracy": 0.5, "kl": 0.0}) + "\n"
                for s in range(1, 6)
            )
        )
        paths.append(str(path))
    out = evaluation.plot(paths, str(tmp_path / "curves.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "a" / "metrics.jsonl").write_text('{"step": 1}\n{"step": \n')
    with pytest.raises(data.DataError, match=r"a/metrics.jsonl:2"):
        evaluation.plot(paths, str(tmp_path / "curves.png"))


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(data=["missing.jsonl"]), data.DataError, "missing.jsonl: no such file"),
        (dict(data=["BAD"]), data.DataError, r"bad.jsonl:2: not valid JSON"),
        (dict(samples=4), launch.ConfigError, "--samples 4 with --temperature 0"),
        (dict(show="x.json"), launch.ConfigError, "exactly one of"),
        (dict(data=[], compare=["a.json"]), launch.ConfigError, "two reports"),
        (dict(data=[], show="NOPE"), data.DataError, "no problem 'toy/999'"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, overrides, error, message):
    """Each bad input raises the error that main turns into one line, naming the file, line or flag."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": \n')
    shown = tmp_path / "shown.json"
    shown.write_text(json.dumps({"kind": "eval", "problems": [{"key": "toy/0", "index": 0}]}))
    fix = {"BAD": str(bad), "NOPE": str(shown)}
    overrides = {
        k: [fix.get(x, x) for x in v] if isinstance(v, list) else fix.get(v, v) for k, v in overrides.items()
    }
    if "show" in overrides:
        overrides["problem"] = "toy/999"
    cfg = dataclasses.replace(cfg_for("demo", tmp_path / "r.json"), **overrides)
    with pytest.raises(error, match=message):
        evaluation.main(cfg)


def test_help_explains_every_flag_and_a_bad_flag_is_one_line():
    """--help of each entry script exits 0 and lists every config field with its meaning; an
    unknown flag value is one error line (exit 2), a missing file one line (exit 1)."""
    for script, config in (("train.py", train.Config), ("eval.py", evaluation.Config)):
        done = run_script([sys.executable, script, "--help"], timeout=60)
        assert done.returncode == 0, done.stderr
        for f in dataclasses.fields(config):
            assert re.search(rf"--{f.name}\b", done.stdout), (script, f.name)
    bad = run_script([sys.executable, "eval.py", "--samples", "many"], timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--samples" in bad.stderr
    missing = run_script([sys.executable, "eval.py", "--model", "demo", "--data", "nope.jsonl"], timeout=60)
    assert missing.returncode == 1 and missing.stderr.strip() == "eval.py: error: nope.jsonl: no such file"
