"""Every flag of train.py and eval.py is checked before any work: each field of their config
dataclasses declares its valid values beside its meaning (config.arg), a value outside them is one
error line naming the flag, the value and the range, with exit code 2, and a value inside them is
accepted. The tests read the dataclasses, so a flag added later is covered without a new test."""

import contextlib
import dataclasses
import io
import json
import math
import os
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import config
import eval as evaluation
import parallel
import train

from conftest import ROOT, SMALL, run_script

WORLD = parallel.World(0, 1, torch.device("cpu"))
SCRIPTS = {
    "train.py": (config.TrainConfig, train.parse_args),
    "eval.py": (
        config.EvalConfig,
        lambda argv: config.parse_config(config.EvalConfig, prog="eval.py", description="", argv=argv),
    ),
}


def checked_fields(config_cls):
    return [f for f in dataclasses.fields(config_cls) if f.metadata.get("valid") is not None]


def number_type(f):
    return int if f.type is int else float


def outside(f):
    """Values of field f's type outside its valid values."""
    valid = f.metadata["valid"]
    if isinstance(valid, tuple):
        return st.text(min_size=1, max_size=12).filter(lambda t: t not in valid)
    low, low_in, high, high_in = config.range_bounds(valid)
    below = low - 1 if low_in else low  # the highest value that is out below
    above = high + 1 if high_in else high
    if number_type(f) is int:
        parts = [st.integers(max_value=int(below))] if low > -math.inf else []
        parts += [st.integers(min_value=int(above))] if high < math.inf else []
        return st.one_of(parts)
    parts = [st.just(math.nan), st.just(math.inf), st.just(-math.inf)]
    if low > -math.inf:
        parts.append(st.floats(max_value=low, exclude_max=low_in, allow_nan=False, allow_infinity=False))
    if high < math.inf:
        parts.append(st.floats(min_value=high, exclude_min=high_in, allow_nan=False, allow_infinity=False))
    return st.one_of(parts)


def inside(f):
    """Values of field f's type within its valid values."""
    valid = f.metadata["valid"]
    if isinstance(valid, tuple):
        return st.sampled_from(valid)
    low, low_in, high, high_in = config.range_bounds(valid)
    if number_type(f) is int:
        first = int(low) if low_in else int(low) + 1
        return st.integers(min_value=first, max_value=None if high == math.inf else int(high))
    return st.floats(
        min_value=None if low == -math.inf else low,
        max_value=None if high == math.inf else high,
        exclude_min=not low_in and low > -math.inf,
        exclude_max=not high_in and high < math.inf,
        allow_nan=False,
        allow_infinity=False,
    )


def flag_text(value):
    return repr(value) if isinstance(value, float) else str(value)


FIELDS = [(script, f) for script, (config_cls, _) in SCRIPTS.items() for f in checked_fields(config_cls)]


def test_every_numeric_and_choice_field_declares_its_valid_values():
    """Every int and float field of both configs, and every str field with a fixed set of values,
    declares them, and --help shows them."""
    fixed_sets = {"algo", "shaping", "adv_norm", "loss_denominator", "loss_agg", "device", "parallel", "report_to"}
    for script, (config_cls, _) in SCRIPTS.items():
        for f in dataclasses.fields(config_cls):
            if f.type in (int, float) or f.name in fixed_sets:
                assert f.metadata.get("valid") is not None, (script, f.name)
            valid = f.metadata.get("valid")
            if valid is not None:
                shown = config.default_text(config_cls, f, f.default)
                assert (", ".join(valid) if isinstance(valid, tuple) else valid) in shown, (script, f.name, shown)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_usage_guides_flag_tables_are_the_configs(script):
    """docs/usage.md holds each script's flag table exactly as config.flag_table makes it from the
    config dataclass: every flag with its default, valid values and meaning, never stale."""
    with open(os.path.join(ROOT, "docs", "usage.md"), encoding="utf-8") as f:
        assert config.flag_table(SCRIPTS[script][0]) in f.read()


@given(data=st.data())
def test_a_value_outside_a_flags_range_is_one_line_with_exit_code_2(data):
    """For any field and any value outside its valid values (NaN and infinities included for
    floats), parsing the command line ends with exit code 2 and exactly one line on stderr that
    names the flag, the value and what it must be; no traceback."""
    script, f = data.draw(st.sampled_from(FIELDS))
    value = data.draw(outside(f))
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(stderr):
        SCRIPTS[script][1]([f"--{f.name}={flag_text(value)}"])  # "=": argparse takes "-inf" for a flag
    err = stderr.getvalue()
    assert e.value.code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"{script}: error: --{f.name} "), err
    valid = f.metadata["valid"]
    assert (", ".join(valid) if isinstance(valid, tuple) else valid) in err, err


@given(data=st.data())
def test_a_value_inside_a_flags_range_is_accepted(data):
    """For any field and any value inside its valid values, the command line parses to a config
    holding that value, which train.py's check_config accepts, or refuses only by a rule that
    joins the flag with the defaults of others (e.g. --mini_batch_size must divide the batch,
    --sft_check_every 0 cannot stop SFT at the demo's --sft_stop_at): one ConfigError naming the
    flag. eval.py's resolve accepts it (or names the flag)."""
    script, f = data.draw(st.sampled_from(FIELDS))
    value = data.draw(inside(f))
    cfg = SCRIPTS[script][1]([f"--{f.name}={flag_text(value)}"])
    assert getattr(cfg, f.name) == value or math.isclose(getattr(cfg, f.name), value)
    try:
        if script == "train.py":
            config.check_config(cfg, WORLD)
        else:
            evaluation.resolve(dataclasses.replace(cfg, data=["toy"], model="demo"))
    except config.ConfigError as e:
        assert f"--{f.name}" in str(e), e


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bad_flag_stops_the_command_before_any_work(script, tmp_path):
    """The real command with an out-of-range value exits 2 with one line and no traceback, and
    has written nothing (no run directory, no report): it stopped before any work."""
    out = tmp_path / "out"
    extra = ["--out_dir", str(out)] if script == "train.py" else ["--data", "toy", "--model", "demo", "--out", str(out)]
    done = run_script([sys.executable, script, *extra, "--sandbox_timeout", "nan"], timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "--sandbox_timeout nan: must be > 0, a finite number" in done.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"mini_batch_size": 6}, r"--mini_batch_size 6: must be 0 \(the whole batch\) or divide the batch of 16"),
        ({"sft_steps": 5, "sft_data": "none"}, r"--sft_steps 5: SFT needs --sft_data"),
        ({"sft_stop_at": 0.5, "sft_check_every": 0}, r"--sft_stop_at 0.5: needs --sft_check_every"),
        ({"demo_size": "0x3"}, r"--demo_size '0x3': expected HIDDENxLAYERS"),
    ],
)
def test_combinations_that_cannot_work_are_refused_with_the_reason(flags, message):
    """Values that are each valid but cannot work together are one ConfigError with the reason."""
    cfg = config.TrainConfig(**{**SMALL, **flags})
    with pytest.raises(config.ConfigError, match=message):
        config.check_config(cfg, WORLD)


def test_more_ranks_than_problems_per_step_is_refused():
    """Under torchrun every rank owns whole problem groups: fewer problems per step than ranks is
    refused, naming the number of ranks."""
    cfg = config.TrainConfig(**{**SMALL, "prompts_per_step": 2})
    with pytest.raises(config.ConfigError, match="--prompts_per_step 2: must be a multiple of the 4 ranks"):
        config.check_config(cfg, parallel.World(0, 4, torch.device("cpu")))


def test_a_prompt_longer_than_the_token_budget_is_refused_before_any_work(sft_model, tmp_path):
    """A --max_total_tokens that the chat prompt of a problem already fills is refused with the
    problem named, before the model is loaded or anything is written."""
    cfg = config.TrainConfig(
        model=sft_model,
        out_dir=str(tmp_path),
        sft_steps=0,
        max_steps=1,
        **{**SMALL, "max_total_tokens": 8, "max_turn_tokens": 4},
    )
    with pytest.raises(
        config.ConfigError, match=r"--max_total_tokens 8: the prompt of --data problem .* has \d+ tokens"
    ):
        train.main(cfg)
    assert not list(tmp_path.iterdir())


EDGES = [
    {"warmup_steps": 0},
    {"gamma": 0.0},
    {"alpha": 0.0},
    {"kl_coef": 0.0},
    {"max_grad_norm": 0.0},
    {"seed": 0},
    {"gamma": 1.0},
    {"alpha": 1.0},
    {"top_p": 1.0},
    {"format_penalty": 0.0},
    {"clip_low": 0.0, "clip_high": 0.0},
    {"seed": 2147483647},
    {"group_size": 1},
]


TOGETHER = [
    {k: v for e in EDGES[:6] + EDGES[9:11] for k, v in e.items()},  # every lower edge at once
    {k: v for e in EDGES[6:9] + EDGES[11:] for k, v in e.items()},
]  # every upper one


@pytest.mark.parametrize(
    "edge",
    [pytest.param(e, marks=pytest.mark.slow) for e in EDGES] + TOGETHER,
    ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()),
)
def test_a_legitimate_edge_value_trains_one_step(edge, sft_model, tmp_path):
    """Each edge value at the end of a range runs one tiny RL step to its checkpoint with finite
    metrics (one run per value is slow-marked; the default suite runs the lower edges together
    and the upper edges together)."""
    cfg = config.TrainConfig(model=sft_model, out_dir=str(tmp_path), sft_steps=0, max_steps=1, **{**SMALL, **edge})
    train.main(cfg)
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["step"] == 1 and all(math.isfinite(v) for v in record.values() if isinstance(v, float)), record
    assert (tmp_path / "checkpoints" / "step_1").is_dir()


SURVEY_BASE = [
    "--sft_steps",
    "0",
    "--max_steps",
    "1",
    "--eval_size",
    "0",
    "--demo_size",
    "64x2",
    "--toy_size",
    "200",
    "--prompts_per_step",
    "2",
    "--group_size",
    "2",
    "--max_turn_tokens",
    "32",
    "--sandbox_workers",
    "2",
]
SURVEY = [
    (f.name, value)
    for f in dataclasses.fields(config.TrainConfig)
    if f.type in (int, float)
    for value in ((0, -1) if f.type is int else (0.0, -1.0, math.nan))
]


@pytest.mark.slow
@pytest.mark.parametrize("name, value", SURVEY, ids=[f"{n}={v}" for n, v in SURVEY])
def test_the_survey_every_numeric_flag_at_0_minus_1_and_nan(name, value, tmp_path):
    """The survey of the issue that introduced ranges, as a new user would try it: train.py's
    one-step run with one numeric flag at 0, -1 or (floats) NaN never ends in a traceback; a
    value outside the flag's range is one line naming it (exit 2), and a value inside it runs
    (exit 0), unless it cannot work with the other flags, which is one line too (exit 2)."""
    args = [sys.executable, "train.py", "--out_dir", str(tmp_path / "run"), *SURVEY_BASE, f"--{name}={value}"]
    done = run_script(args, timeout=600)
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    valid = config.TrainConfig.__dataclass_fields__[name].metadata["valid"]
    if not config.in_range(value, valid):
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert f"--{name} {value!r}: must be {config.range_text(valid)}" in done.stderr, done.stderr
    elif done.returncode != 0:
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and f"--{name} " in done.stderr, done.stderr
