"""tools/repro.py: every variant and seed trains from the seed's SFT start, and a rerun reads the
finished runs back to the same table."""

import importlib.util
import json
import os
import sys
import types

import pytest
import torch

import config
import parallel
import train
from tools import repro

from conftest import ROOT, SMALL, constraint_pins, run_script


@pytest.mark.slow  # about a minute: four train.py and eval.py runs, twice; the README test parses its command
def test_repro_trains_each_variant_and_a_rerun_gives_the_same_table(sft_model, tmp_path):
    """`python -m tools.repro --jobs 2` runs train.py once per variant and seed from the seed's SFT
    start (the variant's flags applied, two at a time), writes a table row per variant, each
    variant's credit view (a table, and credit.png), a by-kind table from eval.py on each final
    checkpoint and the start, and results.json; run again, it trains and evaluates nothing and
    writes the same tables."""
    start = os.path.dirname(os.path.dirname(sft_model))
    small = [f"--{k}={v}" for k, v in SMALL.items()]
    args = [
        sys.executable,
        "-m",
        "tools.repro",
        "--seeds",
        "0",
        "--starts",
        start,
        "--variants",
        "grpo",
        "gtpo_code",
        "--max_steps",
        "2",
        "--eval_samples",
        "1",
        "--jobs",
        "2",
        "--out",
        str(tmp_path),
        "--",
        *small,
        "--eval_size=8",
    ]
    first = run_script(args, timeout=400)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("seed 0:") == 2
    table = (tmp_path / "results.md").read_text()
    sections = table.split("\n\n")
    main, by_kind = sections[0], sections[-1]
    for variant in ("grpo", "gtpo_code"):  # each variant's credit view, as a table and in the figure
        assert f"credit view, {variant}: mean advantage" in table
        assert "| 1 | " in table and "turns of correct trajectories with A < 0" in table
    assert (tmp_path / "credit.png").exists() or importlib.util.find_spec("matplotlib") is None
    assert [line.split(" | ")[0] for line in main.splitlines()[2:]] == ["| grpo", "| gtpo_code"]
    assert [line.split(" | ")[0] for line in by_kind.splitlines()[2:]] == ["| SFT start", "| grpo", "| gtpo_code"]
    with open(tmp_path / "grpo" / "seed0" / "eval_final.json") as f:  # the final checkpoint, evaluated
        assert json.load(f)["settings"]["model"].endswith("step_2")
    for variant, algo in (("grpo", "grpo"), ("gtpo_code", "gtpo")):
        with open(tmp_path / variant / "seed0" / "config.json") as f:
            saved = json.load(f)["config"]
        assert saved["algo"] == algo and saved["model"].startswith(start) and saved["max_steps"] == 2
        with open(tmp_path / variant / "seed0" / "summary.json") as f:
            assert json.load(f)["held_out_problems"] == 8
    again = run_script(args, timeout=200)
    assert again.returncode == 0 and "seed 0:" not in again.stdout
    assert (tmp_path / "results.md").read_text() == table


def test_an_rl_run_from_a_demo_checkpoint_directory_gets_the_demos_tuning_not_a_real_models():
    """tools/repro.py's RL command starts from a checkpoint directory, which train.py would give a real
    model's defaults (lr 1e-6, 1,024-token turns): parsed, it has the demo's value of every flag
    whose default follows --model (but the run directory), and a flag after -- still wins."""
    args = types.SimpleNamespace(max_steps=40, train_flags=["--lr=1e-4"])
    command = repro.rl_command(args, "gtpo_turn_norm", 3, "runs/x/sft_seed3", "runs/x/gtpo_turn_norm/seed3")
    cfg, demo = train.parse_args(command[2:]), config.TrainConfig()
    real = config.TrainConfig(model=cfg.model)
    assert cfg.model == "runs/x/sft_seed3/checkpoints/step_0" and cfg.adv_norm == "turn" and cfg.seed == 3
    assert real.lr == 1e-6 and real.max_turn_tokens == 1024  # what the directory alone would get
    for name in config.MODEL_DEFAULTS:
        if name not in ("out_dir", "sft_steps", "lr"):
            assert getattr(cfg, name) == getattr(demo, name), name
    assert cfg.lr == 1e-4 and cfg.sft_steps == 0 and cfg.out_dir == "runs/x/gtpo_turn_norm/seed3"


def test_paired_differences_are_per_seed_with_a_t_interval():
    """repro_paired subtracts GRPO's accuracy seed by seed: the mean of the differences, a 95%
    interval of mean +- t(0.975, n-1) * SE, and the seeds a 3-point difference needs at that
    spread, ((1.96 + 0.84) sd / 0.03)^2."""
    after = {"grpo": [0.40, 0.50, 0.45], "gtpo_code": [0.45, 0.52, 0.44]}
    finished = {(v, s): ({"after_rl_sampled": a[s]}, []) for v, a in after.items() for s in range(3)}
    table, rows = repro.repro_paired(finished, ["grpo", "gtpo_code"], [0, 1, 2])
    (row,) = rows
    assert row["diffs"] == pytest.approx([0.05, 0.02, -0.01])
    assert row["mean"] == pytest.approx(0.02)
    half = 4.303 * 0.03 / 3**0.5  # sd of (5, 2, -1) points is 3
    assert row["interval"] == pytest.approx([0.02 - half, 0.02 + half])
    assert row["seeds_for_effect"] == 8  # (2.8 * 0.03 / 0.03)^2 = 7.84
    assert "| gtpo_code | 3 | +2.0 |" in table


# ---------------------------------------------------------------- the demo's published figures


def published():
    with open(repro.DEMO_REFERENCE) as f:
        return json.load(f)


def here():
    return parallel.environment(parallel.World(0, 1, torch.device("cpu")))


def test_the_results_row_has_the_seconds_groups_drawn_and_masked_share_of_a_step():
    """repro_row: a step's seconds are its four timed phases summed; they, the groups drawn per
    step and the share of masked trajectories are means over steps, then (with their standard
    error) over seeds; where a run did not log the controls' counts, the table shows a dash."""

    def run(seconds, drawn, masked, controls=True):
        steps = [
            {
                "accuracy": 0.5,
                "zero_adv_groups": 0.25,
                "turns": 2.0,
                "step": k + 1,
                "t_rollout": t - 0.5,
                "t_reward": 0.25,
                "t_old_logp": 0.0,
                "t_update": 0.25,
                **({"groups_drawn": d, "masked": m} if controls else {}),
            }
            for k, (t, d, m) in enumerate(zip(seconds, drawn, masked))
        ]
        return {
            "after_rl_sampled": 0.5,
            "before_rl_sampled": 0.25,
            "after_rl_greedy": 0.5,
            "before_rl_greedy": 0.5,
        }, steps

    row = repro.repro_row("v", [run([2.0, 4.0], [16, 32], [0.0, 0.5]), run([5.0, 5.0], [16, 16], [0.25, 0.25])], 0.5)
    assert row["seconds_per_step"] == pytest.approx((4.0, 1.0))
    assert row["groups_drawn"] == pytest.approx((20.0, 4.0)) and row["masked"] == pytest.approx((0.25, 0.0))
    row = repro.repro_row("old", [run([2.0], [16], [0.0], controls=False)], 0.5)
    assert row["groups_drawn"] == (None, None)
    assert repro.repro_table([row], 0.5).splitlines()[-1].endswith("| 2.0 ± 0.0 | — | — |")


def test_the_credit_summary_weights_each_step_by_its_turns():
    """A variant's credit view over seeds and steps: each cell's mean advantage is the mean over
    all its turns (a step weighs by its turns; an empty cell stays empty), the two shares are
    (mean, SE) over seeds of each run's mean over steps, and the table has a row per turn index
    and a column per (tool call, end)."""
    step = lambda a, n, b, m, neg, pos: {
        "credit": {"1/ok/correct": [a, n], "1/ok/wrong": [None, 0], "2/ok/correct": [b, m], "2/ok/wrong": [None, 0]},
        "credit_neg_correct": neg,
        "credit_pos_error": pos,
    }
    runs = [
        ({}, [step(1.0, 1, -0.5, 2, 0.5, 0.0), step(0.0, 3, None, 0, 0.25, 0.5)]),
        ({}, [step(0.5, 2, 0.5, 2, 0.0, 1.0)]),
    ]
    credit = repro.repro_credit(runs)
    assert credit["cells"] == {
        "1/ok/correct": [(1.0 + 0.0 * 3 + 0.5 * 2) / 6, 6],
        "1/ok/wrong": [None, 0],
        "2/ok/correct": [(-0.5 * 2 + 0.5 * 2) / 4, 4],
        "2/ok/wrong": [None, 0],
    }
    assert credit["credit_neg_correct"] == repro.mean_se([0.375, 0.0]) and credit["credit_pos_error"] == repro.mean_se(
        [0.25, 1.0]
    )
    table = repro.repro_credit_table("gtpo_code", credit)
    assert "| turn | ok, correct | ok, wrong |" in table
    assert "| 1 | +0.33 (6) | — |" in table and "| 2 | +0.00 (4) | — |" in table
    assert "A < 0: 18.8 ± 18.7%" in table and "A > 0: 62.5 ± 37.5%" in table
    assert repro.repro_credit([({}, [{"step": 1}])]) is None  # runs from before the credit view


def test_environment_records_the_versions_the_modules_report():
    """parallel.environment's versions are the installed distributions' (torch's with its build,
    +cpu or +cuXYZ), the thread count torch uses, and torch's CPU kernel dispatch."""
    import importlib.metadata

    env = here()
    assert env["torch"] == torch.__version__
    for name in parallel.VERSIONED:  # the installed distribution's version, its build label aside
        assert env[name].split("+")[0] == importlib.metadata.version(name).split("+")[0], name
    assert env["threads"] == torch.get_num_threads() and env["ranks"] == 1
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def summary_file(path, seed=0, environment=None, **changes):
    reference = published()
    summary = {**reference["summaries"][str(seed)], "seed": seed, **changes}
    summary["environment"] = environment if environment is not None else reference["environment"]
    path.write_text(json.dumps(summary))
    return str(path)


def test_check_demo_accepts_exactly_the_published_figures(tmp_path, capsys):
    """--check_demo passes a summary with the published figures and environment, and fails one
    whose figure moved by a hundredth, saying whether the environment explains it: the same
    environment means the code changed; a different one names the fields that differ and how to
    rerun in the published one."""
    reference = published()
    threads = reference["environment"]["threads"]
    assert repro.check_demo([summary_file(tmp_path / "same.json")], reference)
    assert "the published figures, exactly" in capsys.readouterr().out
    moved = reference["summaries"]["0"]["after_rl_sampled"] + 0.01
    assert not repro.check_demo([summary_file(tmp_path / "moved.json", after_rl_sampled=moved)], reference)
    out = capsys.readouterr().out
    assert "after_rl_sampled" in out and "differs" in out and "in the published environment" in out
    other = {**reference["environment"], "torch": "9.9.9", "threads": threads + 5}
    path = summary_file(tmp_path / "other.json", environment=other, after_rl_sampled=moved)
    assert not repro.check_demo([summary_file(tmp_path / "same.json"), path], reference)
    out = capsys.readouterr().out
    assert "another environment" in out and "-> 9.9.9" in out and f"threads: {threads} -> {threads + 5}" in out
    assert f"set OMP_NUM_THREADS={threads}" in out and "install with -c constraints.txt" in out


def test_another_runs_settings_are_refused_not_blamed_on_the_code(tmp_path):
    """A summary.json of other settings than the demo's (here 4 evaluation samples) is not
    compared: exit code 2, one line naming the setting."""
    path = summary_file(tmp_path / "four.json", eval_samples=4)
    done = run_script([sys.executable, "-m", "tools.repro", "--check_demo", path])
    assert done.returncode == 2 and "not the demo's settings: eval_samples 4 (the demo's: 1)" in done.stderr


def test_publish_then_check_round_trips(tmp_path, monkeypatch, capsys):
    """--publish writes the reference from runs given in any order (sorted by seed) and the check
    then passes them; runs from two environments are not published."""
    env = {**published()["environment"], "threads": 3}
    paths = [summary_file(tmp_path / f"s{seed}.json", seed=seed, environment=env) for seed in (1, 0)]
    mixed = [paths[0], summary_file(tmp_path / "s2.json", seed=0)]
    monkeypatch.setattr(repro, "DEMO_REFERENCE", str(tmp_path / "reference.json"))
    table = repro.publish_demo(paths)
    with open(repro.DEMO_REFERENCE) as f:
        reference = json.load(f)
    assert list(reference["summaries"]) == ["0", "1"] and reference["environment"] == env
    assert table.splitlines()[2].startswith("| 0 |") and repro.check_demo(paths, reference)
    with pytest.raises(SystemExit) as stop:
        repro.publish_demo(mixed)
    assert stop.value.code == 2 and "different environments" in capsys.readouterr().err


def test_the_published_figures_are_the_ones_docs_show():
    """docs/results.md holds repro.demo_table of docs/demo_reference.json verbatim, and the
    published environment's versions are constraints.txt's pins."""
    reference = published()
    with open(os.path.join(ROOT, "docs", "results.md"), encoding="utf-8") as f:
        assert repro.demo_table(reference) in f.read()
    pins = constraint_pins()
    for name in parallel.VERSIONED:
        assert reference["environment"][name].split("+")[0] == pins[name], name


def test_check_demo_command_reads_a_finished_run(tmp_path):
    """`python -m tools.repro --check_demo SUMMARY` exits 0 for the published figures, 1 for moved ones, and 2
    with one line naming the file for one that is missing or not a summary."""
    ok = run_script([sys.executable, "-m", "tools.repro", "--check_demo", summary_file(tmp_path / "a.json")])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    moved = summary_file(tmp_path / "b.json", sft_steps_done=published()["summaries"]["0"]["sft_steps_done"] + 250)
    bad = run_script([sys.executable, "-m", "tools.repro", "--check_demo", moved])
    assert bad.returncode == 1 and "sft_steps_done" in bad.stdout
    (tmp_path / "list.json").write_text("[1]")
    for path in (tmp_path / "missing.json", tmp_path / "list.json"):
        refused = run_script([sys.executable, "-m", "tools.repro", "--check_demo", str(path)])
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1, refused.stderr
        assert lines[0].startswith(f"tools.repro: {path}: not a train.py summary.json"), lines


def test_check_demo_refuses_before_any_run_what_it_cannot_check(tmp_path):
    """Without training anything, exit code 2: a seed with no published figures; a run directory
    that already exists (it may hold older code's figures); train.py flags or a stray file (which
    argparse would take for train.py flags), leaving the published file as it was."""
    before = open(repro.DEMO_REFERENCE).read()
    (tmp_path / "demo" / "seed0").mkdir(parents=True)
    for args, said in (
        (["--seeds", "7"], "no published figures for seed 7"),
        (["--out", str(tmp_path)], "exists: compare it with --check_demo"),
        (["--publish", "a.json"], "no train.py flags"),
        (["--", "--max_steps", "3"], "no train.py flags"),
    ):
        done = run_script([sys.executable, "-m", "tools.repro", "--check_demo", *args], timeout=60)
        assert done.returncode == 2 and said in done.stderr, (args, done.stderr)
    assert open(repro.DEMO_REFERENCE).read() == before


@pytest.mark.slow  # the demo itself: about 8 minutes alone on two cores
def test_demo_seed0_reproduces_its_published_summary(tmp_path):
    """`python train.py` (seed 0) at the published thread count gives exactly the published
    summary figures, where the versions and CPU kernels are the published ones (constraints.txt)."""
    reference = published()["environment"]
    differ = [k for k in ("python", *parallel.VERSIONED, "cpu_capability") if here()[k] != reference[k]]
    if differ:
        pytest.skip(f"not the published environment ({', '.join(differ)}): the figures are promised for it only")
    done = run_script([sys.executable, "-m", "tools.repro", "--check_demo", "--out", str(tmp_path)], timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
