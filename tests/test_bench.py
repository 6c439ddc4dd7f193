"""Properties of bench.py's commands that are checks rather than measurements."""

import importlib.util
import sys

import pytest
import torch

from conftest import run_script


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the command runs for real")
def test_the_gpu_check_without_a_gpu_is_a_passing_cpu_dry_run_of_every_stage():
    """`bench.py gpu demo` on a machine without CUDA says so, runs each of its four stages on the
    CPU (gpu tests, two RL steps, rollout vs generate, an FSDP2 step under torchrun), prints the
    table with every stage ok, and exits 0."""
    done = run_script([sys.executable, "bench.py", "gpu", "demo"], timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "no CUDA device: a CPU dry run" in out and "Nothing above ran on a GPU" in out
    table = out[out.index("stage  ") :].splitlines()[1:5]
    assert [line.split("  ")[0].strip() for line in table] == [
        "gpu-marked tests", "two RL steps, bf16 autocast", "rollout vs plain generate", "FSDP2 step, torchrun 1 process"
    ]  # fmt: skip
    assert all(line[34:42].strip() == "ok" for line in table), table
    assert "skipped" in table[0] and "README arithmetic" in table[1] and "gloo" in table[3]


def test_the_gpu_check_exits_1_when_a_stage_fails():
    """A model directory that does not exist fails the stages that load it: they are FAILED rows
    of the table, and the command exits 1."""
    done = run_script([sys.executable, "bench.py", "gpu", "/nonexistent-model"], timeout=400)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("FAILED") >= 3 * 2  # three stages, each in the progress lines and the table


@pytest.mark.skipif(importlib.util.find_spec("trl") is not None, reason="TRL is installed here")
def test_the_peer_comparison_without_trl_says_how_to_install_it_and_exits_0():
    """`bench.py peer` where TRL is not installed measures nothing, prints the install command,
    and exits 0: TRL is never a requirement."""
    done = run_script([sys.executable, "bench.py", "peer"], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pip install trl" in done.stdout and "nothing measured" in done.stdout
