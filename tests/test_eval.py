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

import config
import data
import eval as evaluation
import grading
import parallel
import reports
import sandbox
import tasks
import train

from conftest import SMALL, run_script, torchrun

# The rollout limits come from the checkpoint's training config.json (SMALL's).
LIMITS = dict(max_turn_tokens=SMALL["max_turn_tokens"], max_total_tokens=SMALL["max_total_tokens"], max_turns=4)


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
    diff, low, high = reports.paired_bootstrap(a, b, resamples=2000)
    assert diff == pytest.approx(sum(y - x for x, y in pairs) / len(pairs), abs=1e-9)
    assert low <= high
    back = reports.paired_bootstrap(b, a, resamples=2000)
    assert back == pytest.approx((-diff, -high, -low), abs=1e-9)
    top = [max(x, y) for x, y in pairs]
    assert reports.paired_bootstrap(a, top, resamples=2000)[1] >= 0
    shifted = [min(x + 0.25, 1.25) for x in a]  # the same difference on every problem: no spread
    assert reports.paired_bootstrap(a, shifted, resamples=2000) == pytest.approx((0.25, 0.25, 0.25))


def test_the_paired_bootstrap_interval_has_the_normal_width():
    """On many problems the 95% interval of a mean difference is about mean +- 1.96 sd / sqrt(P)."""
    rng = evaluation.np.random.default_rng(1)
    a, b = rng.random(400), rng.random(400)
    diff, low, high = reports.paired_bootstrap(a, b)
    half = 1.96 * (b - a).std(ddof=1) / 400**0.5
    assert low == pytest.approx(diff - half, abs=0.15 * half) and high == pytest.approx(diff + half, abs=0.15 * half)


def test_summarize_counts_what_the_readme_says():
    """The figures of hand-built records: accuracy is the mean per-problem share correct,
    tool-call rate the share of trajectories that ran a call, tool error rate the share of calls
    that failed, format error and answer rates per trajectory, tokens the sampled ones."""
    ok, bad = {"ok": True}, {"ok": False}
    call = lambda result, tokens: {"result": result, "tokens": tokens}  # noqa: E731
    samples = [
        {
            "correct": True,
            "answer": "1",
            "format_error": False,
            "stop": "answer",
            "turns": [call(ok, 10), call(None, 5)],
        },
        {"correct": False, "answer": None, "format_error": True, "stop": "max_length", "turns": [call(None, 20)]},
        {
            "correct": False,
            "answer": "2",
            "format_error": False,
            "stop": "answer",
            "turns": [call(bad, 4), call(ok, 4), call(None, 2)],
        },
        {"correct": True, "answer": "3", "format_error": False, "stop": "answer", "turns": [call(ok, 6)]},
    ]
    records = [
        {"set": "s", "num_correct": 1, "samples": samples[:2]},
        {"set": "s", "num_correct": 1, "samples": samples[2:]},
    ]
    got = evaluation.summarize(records)
    assert got["accuracy"] == 0.5 and got["pass_at_k"] == {"1": 0.5, "2": 1.0}
    assert got["mean_turns"] == (2 + 1 + 3 + 1) / 4 and got["tool_call_rate"] == 3 / 4
    assert got["mean_tool_calls"] == 4 / 4 and got["tool_error_rate"] == 1 / 4
    assert got["format_error_rate"] == 1 / 4 and got["answer_rate"] == 3 / 4
    assert got["mean_tokens"] == (15 + 20 + 10 + 6) / 4
    assert got["stop_reasons"]["answer"] == 3 / 4 and got["stop_reasons"]["max_length"] == 1 / 4


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A tiny policy SFT-trained on the teacher trajectories of the 12 held-out toy problems the
    tests evaluate: greedy, it solves some of them (a checkpoint inside a run directory)."""
    out = tmp_path_factory.mktemp("memorised")
    with open(out / "teacher.jsonl", "w") as f:
        for p in tasks.toy_held_out(100)[:12]:
            f.write(json.dumps({"problem": p["problem"], "answer": p["answer"], "turns": p["teacher"]}) + "\n")
    train.main(
        config.TrainConfig(
            out_dir=str(out), sft_data=str(out / "teacher.jsonl"), sft_steps=200, max_steps=0, **{**SMALL, "lr": 6e-4}
        )
    )
    return str(out / "checkpoints" / "step_0")


def cfg_for(model_dir, out, **overrides):
    settings = dict(model=model_dir, data=["toy"], out=str(out), limit=12, sandbox_workers=4)
    return config.EvalConfig(**{**settings, **overrides})


def test_greedy_evaluation_is_deterministic_and_agrees_with_training(memorised, tmp_path):
    """Greedy evaluation gives the same report twice, and its accuracy is exactly train.py's
    held-out greedy accuracy for the same checkpoint and problems (the same rollout and grader).
    The report records the versions, device and compute dtype it was measured with."""
    first = evaluation.main(cfg_for(memorised, tmp_path / "a.json"))
    second = evaluation.main(cfg_for(memorised, tmp_path / "b.json"))
    assert first == second
    assert first["settings"]["training_config"] and first["settings"]["max_turn_tokens"] == SMALL["max_turn_tokens"]
    assert first["problems"] and all(len(r["samples"]) == 1 for r in first["problems"])
    assert first["environment"]["torch"] == evaluation.torch.__version__ and first["environment"]["device"] == "cpu"
    assert first["settings"]["compute_dtype"] == "fp32"  # what --compute_dtype auto chose here
    problems = tasks.toy_held_out(100)[:12]
    policy, tokenizer = evaluation.policies.load_policy(memorised)
    world = parallel.World(0, 1, evaluation.torch.device("cpu"))
    cfg = config.TrainConfig(model=memorised, **{**SMALL, "max_turns": 4})
    with sandbox.Pool(4) as pool:
        grader = grading.Grader()
        run = train.RunState(
            cfg=cfg,
            derived=config.check_config(cfg, world),
            world=world,
            policy=policy,
            tokenizer=tokenizer,
            wrapped=policy,
            pool=pool,
            grader=grader,
            problems=[],
        )
        trained = train.evaluate(run, problems, temperature=0.0)
        grader.close()
    assert first["accuracy"] == trained > 0


def test_a_report_round_trips_and_an_interrupted_run_resumes_to_the_same_report(sft_model, tmp_path, monkeypatch):
    """A run killed after its first batch (the partial file cut mid-line) and run again
    evaluates only the missing batches and writes the same report as an uninterrupted run; the
    report reloads equal; a partial file or report from other settings is an error naming the
    setting, and a finished report is never overwritten by another evaluation."""
    sampled = dict(samples=2, temperature=1.0, batch_size=8)  # 4 problems per batch: 3 batches
    whole = evaluation.main(cfg_for(sft_model, tmp_path / "whole.json", **sampled))
    assert reports.load_report(tmp_path / "whole.json") == whole
    assert whole["num_samples"] == 2 and set(whole["pass_at_k"]) == {"1", "2"}
    out = tmp_path / "resumed.json"
    header = {"settings": {**whole["settings"], "model": sft_model}}
    lines = [json.dumps(header)] + [json.dumps(r) for r in whole["problems"][:4]]
    partial = tmp_path / "resumed.json.partial.jsonl"
    partial.write_text("\n".join(lines) + '\n{"key": "toy/4", "se')
    sets = {"toy": tasks.toy_held_out(100)[:12]}
    assert len(evaluation.read_partial(str(partial), whole["settings"], sets)) == 4
    assert partial.read_text() == "\n".join(lines) + "\n"  # the cut line is gone: appending is safe
    calls = []
    real = evaluation.evaluate_batch
    monkeypatch.setattr(evaluation, "evaluate_batch", lambda *a, **k: calls.append(a[0][1]) or real(*a, **k))
    resumed = evaluation.main(cfg_for(sft_model, out, **sampled))
    assert calls == [1, 2] and resumed == whole
    moved = [dict(whole["problems"][0], problem="Another problem?")]
    with pytest.raises(data.DataError, match="toy/0 holds another problem"):
        evaluation.check_same_problems("r.json", moved, sets)
    assert not partial.exists()
    with pytest.raises(config.ConfigError, match="seed=0.*seed=1"):
        evaluation.main(cfg_for(sft_model, out, seed=1, **sampled))
    (tmp_path / "other.json.partial.jsonl").write_text(json.dumps(header) + "\n")
    with pytest.raises(config.ConfigError, match="samples=2.*samples=1"):
        evaluation.main(cfg_for(sft_model, tmp_path / "other.json"))


def test_sharded_evaluation_under_torchrun_gives_the_same_report(sft_model, tmp_path):
    """`torchrun --nproc_per_node 2 eval.py` (3 batches dealt over 2 ranks, sampled at T = 1)
    writes exactly the report of one process: each batch is seeded by its set and number."""
    flags = [
        "--model",
        sft_model,
        "--data",
        "toy",
        "--limit",
        "12",
        "--samples",
        "2",
        "--temperature",
        "1",
        "--batch_size",
        "8",
        "--sandbox_workers",
        "4",
    ]
    one = run_script([sys.executable, "eval.py", *flags, "--out", str(tmp_path / "one.json")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_script(torchrun("eval.py", *flags, "--out", str(tmp_path / "two.json")), timeout=400)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a["num_problems"] == 12 and a["problems"] == b["problems"] and a["accuracy"] == b["accuracy"]


def test_an_error_on_one_rank_ends_every_rank_with_one_message(tmp_path):
    """Under torchrun, a problem too long for --max_total_tokens in rank 1's batch is raised on
    every rank, so the run ends at once (no rank is left waiting in a collective) and the error,
    naming the problem, is printed once."""
    path = tmp_path / "long.jsonl"
    rows = [{"problem": "What is 1 + 1?", "answer": "2"}] * 3 + [{"problem": "x " * 200, "answer": "1"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = [
        "--model",
        "demo",
        "--demo_size",
        "64x2",
        "--data",
        str(path),
        "--batch_size",
        "2",
        "--system_prompt",
        "none",
        "--max_turn_tokens",
        "8",
        "--max_total_tokens",
        "128",
        "--out",
        str(tmp_path / "r.json"),
    ]
    done = run_script(torchrun("eval.py", *flags), timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("eval.py: error: long/3: the prompt has") == 1, done.stderr[-2000:]


def test_an_empty_set_is_an_error(monkeypatch):
    """A set with no problems (an empty hf: split, say) is an error naming it, not a crash later."""
    monkeypatch.setattr(data, "load", lambda spec, **keys: ([], f"{spec}: 0 rows"))
    with pytest.raises(data.DataError, match="hf:org/empty: no problems"):
        evaluation.load_sets(config.EvalConfig(data=["hf:org/empty"]))


def test_compare_pairs_problems_by_key_and_reports_the_difference(tmp_path, capsys):
    """--compare pairs the problems both reports hold, per set: B - A is the mean per-problem
    accuracy difference; a report against itself differs by exactly 0, with nothing noted; a
    version that differs is noted; a training sample dump is refused."""

    def report(path, correct, torch_version="2.13.0"):
        records = [
            {
                "key": f"s/{i}",
                "set": "s",
                "index": i,
                "id": None,
                "problem": f"p{i}",
                "answer": "1",
                "num_correct": c,
                "samples": [
                    {"correct": j < c, "answer": "1", "stop": "answer", "format_error": False, "turns": []}
                    for j in range(2)
                ],
            }
            for i, c in enumerate(correct)
        ]
        environment = {"torch": torch_version, "threads": 2}
        path.write_text(json.dumps(evaluation.make_report({"samples": 2}, records, environment=environment)))
        return str(path)

    a, b = (report(tmp_path / "a.json", [0, 1, 2, 2]), report(tmp_path / "b.json", [2, 1, 2], torch_version="2.14.1"))
    (row,) = reports.compare(a, b)
    assert row["problems"] == 3 and row["diff"] == pytest.approx((1.0 + 0 + 0) / 3)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: torch differs: A '2.13.0', B '2.14.1'"]
    (same,) = reports.compare(a, a)
    assert same["diff"] == same["ci_low"] == same["ci_high"] == 0
    assert "note:" not in capsys.readouterr().out
    dump = tmp_path / "dump.json"
    dump.write_text(json.dumps({"kind": "samples", "problems": []}))
    with pytest.raises(data.DataError, match="takes eval.py reports"):
        reports.compare(a, str(dump))


def test_the_view_marks_trained_and_masked_text(sft_model, tmp_path):
    """--show prints every turn's sampled text on T| lines and its tool output on M| lines, with
    the token counts of the record; --html escapes the text and writes next to the report."""
    report = evaluation.main(cfg_for(sft_model, tmp_path / "r.json", limit=5))
    record = next(r for r in report["problems"] if any(t["observation_tokens"] for t in r["samples"][0]["turns"]))
    text = reports.show_text(reports.find_problem(report, record["key"]))
    trained = "\n".join(line[3:] for line in text.split("\n") if line.startswith("T| "))
    masked = "\n".join(line[3:] for line in text.split("\n") if line.startswith("M| "))
    turns = record["samples"][0]["turns"]
    assert trained == "\n".join(t["text"] for t in turns)
    assert masked == "\n".join(t["observation"].strip("\n") for t in turns if t["observation_tokens"])
    assert f"turn 1 · {turns[0]['tokens']} tokens trained" in text
    evaluation.main(config.EvalConfig(show=str(tmp_path / "r.json"), html=True))
    page = (tmp_path / "r.html").read_text()
    assert "&lt;|im_end|&gt;" in page and "<|im_end|>" not in page and page.count("<details><summary><b>") == 5


def test_plot_draws_every_run_into_one_png(tmp_path):
    """--plot reads metrics.jsonl files and writes a PNG; a bad line names its file and line."""
    pytest.importorskip("matplotlib")
    paths = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        path = tmp_path / run / "metrics.jsonl"
        path.write_text(
            "".join(json.dumps({"step": s, "reward": s / 10, "accuracy": 0.5, "kl": 0.0}) + "\n" for s in range(1, 6))
        )
        paths.append(str(path))
    out = reports.plot(paths, str(tmp_path / "curves.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "a" / "metrics.jsonl").write_text('{"step": 1}\n{"step": \n')
    with pytest.raises(data.DataError, match=r"a/metrics.jsonl:2"):
        reports.plot(paths, str(tmp_path / "curves.png"))


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(data=["missing.jsonl"]), data.DataError, "missing.jsonl: no such file"),
        (dict(data=["BAD"]), data.DataError, r"bad.jsonl:2: not valid JSON"),
        (dict(samples=4, temperature=0.0), config.ConfigError, "--samples 4 with --temperature 0"),
        (dict(show="x.json"), config.ConfigError, "exactly one of"),
        (dict(data=[], compare=["a.json"]), config.ConfigError, "two reports"),
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
    overrides = {k: [fix.get(x, x) for x in v] if isinstance(v, list) else fix.get(v, v) for k, v in overrides.items()}
    if "show" in overrides:
        overrides["problem"] = "toy/999"
    cfg = dataclasses.replace(cfg_for("demo", tmp_path / "r.json"), **overrides)
    with pytest.raises(error, match=message):
        evaluation.main(cfg)


def test_help_explains_every_flag_and_a_bad_flag_is_one_line(capsys):
    """--help of each entry script exits 0 and lists every config field with its meaning; an
    unknown flag value is one error line (exit 2), a missing file one line (exit 1; the real
    command, the others parsed in this process)."""
    for script, config_cls in (("train.py", config.TrainConfig), ("eval.py", config.EvalConfig)):
        with pytest.raises(SystemExit) as done:
            config.parse_config(config_cls, script, "", ["--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        for f in dataclasses.fields(config_cls):
            assert re.search(rf"--{f.name}\b", out), (script, f.name)
    with pytest.raises(SystemExit) as bad:
        config.parse_config(config.EvalConfig, "eval.py", "", ["--samples", "many"])
    err = capsys.readouterr().err
    assert bad.value.code == 2 and err.count("\n") == 1 and "--samples" in err
    missing = run_script([sys.executable, "eval.py", "--model", "demo", "--data", "nope.jsonl"], timeout=60)
    assert missing.returncode == 1 and missing.stderr.strip() == "eval.py: error: nope.jsonl: no such file"
