"""Properties of bench.py's commands that are checks rather than measurements."""

import argparse
import importlib.util
import re
import sys

import pytest
import torch

from conftest import run_script


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the command runs for real")
def test_the_gpu_check_without_a_gpu_is_a_passing_cpu_dry_run_of_every_stage():
    """`bench.py gpu demo` on a machine without CUDA says so, runs each of its six stages on the
    CPU (gpu tests, two RL steps, rollout vs generate, an FSDP2 step under torchrun, a DDP and an
    FSDP2 step over two processes with each rank's peak memory), prints the table with every
    stage ok, and exits 0."""
    done = run_script([sys.executable, "bench.py", "gpu", "demo"], timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "no CUDA device: a CPU dry run" in out and "Nothing above ran on a GPU" in out
    table = out[out.index("stage  ") :].splitlines()[1:7]
    assert [line.split("  ")[0].strip() for line in table] == [
        "gpu-marked tests", "two RL steps, compute dtype auto", "rollout vs plain generate",
        "FSDP2 step, torchrun 1 process", "DDP step, torchrun 2 processes", "FSDP2 step, torchrun 2 processes",
    ]  # fmt: skip
    assert all(line[36:44].strip() == "ok" for line in table), table
    assert "skipped" in table[0] and "arithmetic" in table[1] and "gloo" in table[3]
    assert all(re.search(r"per rank \d+\.\d\d, \d+\.\d\d GB", line) for line in table[4:]), table


def test_the_gpu_check_exits_1_when_a_stage_fails(capsys):
    """A model directory that does not exist fails the stages that load it (run here in this
    process, the slowest stages, torchrun's and pytest's, left out): they are FAILED rows of the
    table, and the command exits 1."""
    import bench

    passed = lambda *_, **__: (True, "not run here")
    with pytest.MonkeyPatch.context() as patch:
        for stage in ("_gpu_tests", "_gpu_fsdp_step", "_gpu_two_processes"):
            patch.setattr(bench, stage, passed)
        with pytest.raises(SystemExit) as done:
            bench.bench_gpu(argparse.Namespace(model_dir="/nonexistent-model"))
    out = capsys.readouterr().out
    assert done.value.code == 1, out
    assert out.count("FAILED") == 2 * 2  # two stages load the model, each in the progress lines and the table


@pytest.mark.skipif(importlib.util.find_spec("trl") is not None, reason="TRL is installed here")
def test_the_peer_comparison_without_trl_says_how_to_install_it_and_exits_0():
    """`bench.py peer` where TRL is not installed measures nothing, prints the install command,
    and exits 0: TRL is never a requirement."""
    done = run_script([sys.executable, "bench.py", "peer"], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pip install trl" in done.stdout and "nothing measured" in done.stdout
