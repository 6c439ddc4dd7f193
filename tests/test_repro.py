"""repro.py: every variant and seed trains from the seed's SFT start, and a rerun reads the
finished runs back to the same table."""

import json
import os
import sys

import pytest

import repro
from conftest import SMALL, run_script


@pytest.mark.slow  # about a minute: four train.py and eval.py runs, twice; the README test parses its command
def test_repro_trains_each_variant_and_a_rerun_gives_the_same_table(sft_model, tmp_path):
    """`repro.py --jobs 2` runs train.py once per variant and seed from the seed's SFT start
    (the variant's flags applied, two at a time), writes a table row per variant, a by-kind table from eval.py on each
    final checkpoint and the start, and results.json; run again, it trains and evaluates nothing
    and writes the same tables."""
    start = os.path.dirname(os.path.dirname(sft_model))
    small = [f"--{k}={v}" for k, v in SMALL.items()]
    args = [sys.executable, "repro.py", "--seeds", "0", "--starts", start, "--variants", "grpo",
            "gtpo_code", "--max_steps", "2", "--eval_samples", "1", "--jobs", "2", "--out", str(tmp_path), "--", *small,
            "--eval_size=8"]  # fmt: skip
    first = run_script(args, timeout=400)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("seed 0:") == 2
    table = (tmp_path / "results.md").read_text()
    main, by_kind = table.split("\n\n")
    assert [line.split(" | ")[0] for line in main.splitlines()[2:]] == ["| grpo", "| gtpo_code"]
    assert [line.split(" | ")[0] for line in by_kind.splitlines()[2:]] == [
        "| SFT start",
        "| grpo",
        "| gtpo_code",
    ]
    with open(tmp_path / "grpo" / "seed0" / "eval_final.json") as f:  # the final checkpoint, evaluated
        assert json.load(f)["settings"]["model"].endswith("step_2")
    for variant, algo in (("grpo", "grpo"), ("gtpo_code", "gtpo")):
        with open(tmp_path / variant / "seed0" / "config.json") as f:
            config = json.load(f)["config"]
        assert config["algo"] == algo and config["model"].startswith(start) and config["max_steps"] == 2
        with open(tmp_path / variant / "seed0" / "summary.json") as f:
            assert json.load(f)["held_out_problems"] == 8
    again = run_script(args, timeout=200)
    assert again.returncode == 0 and "seed 0:" not in again.stdout
    assert (tmp_path / "results.md").read_text() == table


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
