"""metrics.open_tracker: optional experiment tracking (none, tensorboard, wandb) of the metrics
records train.py writes to metrics.jsonl."""

import glob
import json
import math
import os
import sys

import pytest

from config import ConfigError
from metrics import TRACKERS, numeric_fields, open_tracker

# Two records shaped like metrics.jsonl's, plus fields a tracker must leave out (not numbers).
RECORDS = [
    {
        "step": 1,
        "reward": 0.25,
        "accuracy": 0.5,
        "loss": -0.0123,
        "infra_errors": 0,
        "lr": 3e-4,
        "note": "warm-up",
        "ranks_in_sync": True,
        "stop": {"answer": 3},
    },
    {
        "step": 2,
        "reward": 0.75,
        "accuracy": 1.0,
        "loss": 0.0456,
        "infra_errors": 2,
        "lr": 2.5e-4,
        "note": "",
        "ranks_in_sync": False,
        "stop": {"answer": 4},
    },
]
LOGGED = {"reward", "accuracy", "loss", "infra_errors", "lr"}
CONFIG = {"lr": 3e-4, "algo": "gtpo", "data": ["toy"], "seed": 0}


def test_numeric_fields_are_the_numbers_but_step():
    """A tracker logs the record's ints and floats under their metrics.jsonl names, as floats;
    not step (the x-axis), bools, strings or containers."""
    assert numeric_fields(RECORDS[0]) == {
        "reward": 0.25,
        "accuracy": 0.5,
        "loss": -0.0123,
        "infra_errors": 0.0,
        "lr": 3e-4,
    }
    assert set(numeric_fields(RECORDS[1])) == LOGGED


def test_none_is_a_no_op(tmp_path):
    """Kind "none" accepts log and close (and works as a context manager) and writes nothing."""
    with open_tracker("none", str(tmp_path), CONFIG) as tracker:
        for r in RECORDS:
            tracker.log(r, r["step"])
    tracker.close()
    assert os.listdir(tmp_path) == []


def test_unknown_kind_is_refused_with_the_choices(tmp_path):
    """An unknown kind is a ConfigError naming it and listing every choice; nothing is written."""
    with pytest.raises(ConfigError, match="'mlflow'") as e:
        open_tracker("mlflow", str(tmp_path), CONFIG)
    assert all(kind in str(e.value) for kind in TRACKERS)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind,package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_missing_package_is_a_config_error_with_the_pip_command(kind, package, tmp_path, monkeypatch):
    """Without the package (import blocked), asking for its tracker is a ConfigError that gives
    the pip command."""
    monkeypatch.setitem(sys.modules, package, None)  # `import package` raises ImportError
    with pytest.raises(ConfigError, match=f"pip install {package}"):
        open_tracker(kind, str(tmp_path), CONFIG)


def test_packages_are_imported_only_when_asked(tmp_path):
    """Opening "none" imports neither tensorboard nor wandb (a fresh interpreter checks)."""
    import subprocess

    code = (
        "import sys, metrics; metrics.open_tracker('none', '.', {}).close(); "
        "print([m for m in ('tensorboard', 'wandb') if m in sys.modules])"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=root),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ---------------------------------------------------------------- tensorboard


def read_scalars(log_dir):
    """{tag: [(step, value)]} of the scalars in a tensorboard log directory, as tensorboard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_logs_the_numeric_fields(tmp_path):
    """Two records logged to "tensorboard" read back from OUT/tensorboard's event file with
    tensorboard's own reader: one series per numeric field, named as in metrics.jsonl, holding
    each record's value (to float32) at its step."""
    pytest.importorskip("tensorboard")
    tracker = open_tracker("tensorboard", str(tmp_path), CONFIG, run_name="seed0")
    for r in RECORDS:
        tracker.log(r, r["step"])
    tracker.close()
    scalars = read_scalars(str(tmp_path / "tensorboard"))
    assert set(scalars) == LOGGED
    for name in LOGGED:
        assert [s for s, _ in scalars[name]] == [1, 2]
        for (_, got), r in zip(scalars[name], RECORDS):
            assert math.isclose(got, r[name], rel_tol=1e-6, abs_tol=1e-12), (name, got, r[name])


def test_tensorboard_resume_hides_the_redone_steps(tmp_path):
    """A run resumed from step 1 (start_step=1) redoes step 2: tensorboard shows the new step 2
    and not the steps an earlier attempt wrote after step 1."""
    pytest.importorskip("tensorboard")
    first = open_tracker("tensorboard", str(tmp_path), CONFIG)
    for step in (1, 2, 3):
        first.log({"reward": float(step)}, step)
    first.close()
    resumed = open_tracker("tensorboard", str(tmp_path), CONFIG, start_step=1)
    resumed.log({"reward": 20.0}, 2)
    resumed.close()
    assert read_scalars(str(tmp_path / "tensorboard"))["reward"] == [(1, 1.0), (2, 20.0)]


# ---------------------------------------------------------------- wandb


def wandb_records(path):
    """The protobuf Records of a wandb run file (run-ID.wandb): a 7-byte header (':W&B', magic,
    version), then LevelDB log records in 32 KiB blocks (crc32, length, type; types 1 full,
    2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:7]
    pos, chunk, records = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def test_wandb_offline_logs_the_numeric_fields(tmp_path, monkeypatch):
    """Under WANDB_MODE=offline, "wandb" writes a run under OUT/wandb whose history holds each
    record's numeric fields (named as in metrics.jsonl) at its step, in project WANDB_PROJECT,
    named run_name, with the config."""
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "gtpo-test")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "home" / name.lower()))  # nothing under ~
    out = tmp_path / "run"
    tracker = open_tracker("wandb", str(out), CONFIG, run_name="seed0")
    for r in RECORDS:
        tracker.log(r, r["step"])
    tracker.close()
    runs = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, os.listdir(out)
    history, run = [], None
    for record in wandb_records(runs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            history.append({k: v for k, v in items.items() if not k.startswith("_")} | {"_step": items["_step"]})
        elif kind == "run":
            run = record.run
    assert [h.pop("_step") for h in history] == [1, 2]
    assert history == [numeric_fields(r) for r in RECORDS]
    assert (run.project, run.display_name) == ("gtpo-test", "seed0")
    config = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in run.config.update}
    assert {k: config[k] for k in CONFIG} == CONFIG
