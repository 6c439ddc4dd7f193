"""Properties of bench.py's commands that are checks rather than measurements."""

import argparse
import importlib.util
import re
import sys

import pytest
import torch

from conftest import run_script

GPU_STAGES = [
    "gpu-marked tests",
    "two RL steps, compute dtype auto",
    "rollout vs plain generate",
    "FSDP2 step, torchrun 1 process",
    "DDP step, torchrun 2 processes",
    "FSDP2 step, torchrun 2 processes",
]


def gpu_table(out):
    """The rows of `bench.py gpu`'s table: [(stage, result, figure)]."""
    rows = out[out.index("stage  ") :].splitlines()[1 : 1 + len(GPU_STAGES)]
    return [(line[:36].strip(), line[36:44].strip(), line[54:]) for line in rows]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the command runs for real")
def test_the_gpu_check_without_a_gpu_is_a_passing_cpu_dry_run_of_every_stage():
    """`python bench.py gpu demo` on a machine without CUDA says so, runs each of its six stages on the
    CPU (gpu tests, two RL steps, rollout vs generate, an FSDP2 step under torchrun, a DDP and an
    FSDP2 step over two processes with each rank's peak memory), prints the table with every
    stage ok, and exits 0."""
    done = run_script([sys.executable, "bench.py", "gpu", "demo"], timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no CUDA device: a CPU dry run" in done.stdout and "Nothing above ran on a GPU" in done.stdout
    table = gpu_table(done.stdout)
    assert [name for name, _, _ in table] == GPU_STAGES and all(ok == "ok" for _, ok, _ in table), table
    assert "skipped" in table[0][2] and "arithmetic" in table[1][2] and "gloo" in table[3][2]
    assert all(re.search(r"per rank \d+\.\d\d, \d+\.\d\d GB", figure) for _, _, figure in table[4:]), table


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the command runs for real")
def test_the_gpu_check_passes_its_own_stages_on_the_cpu(capsys):
    """`python bench.py gpu demo` run here in this process, the stages that only relaunch what other
    tests run left out (pytest on tests/test_gpu.py; torchrun over 1 rank; DDP over 2), passes
    the others on the CPU: two RL steps and the rollout with their figures, and the FSDP2 step
    over two processes with both ranks' peak memory beside the arithmetic; it exits 0. (The slow
    test above runs the command whole.)"""
    from tools import gpu

    left_out = lambda *_, **__: (True, "left out")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpu, "_gpu_tests", left_out)
        patch.setattr(gpu, "_gpu_fsdp_step", left_out)
        real = gpu._gpu_two_processes
        patch.setattr(
            gpu,
            "_gpu_two_processes",
            lambda parallel, *a, **k: left_out() if parallel == "ddp" else real(parallel, *a, **k),
        )
        with pytest.raises(SystemExit) as done:
            gpu.bench_gpu(argparse.Namespace(model_dir="demo"))
    table = gpu_table(capsys.readouterr().out)
    assert done.value.code == 0, table
    assert [name for name, _, _ in table] == GPU_STAGES and all(ok == "ok" for _, ok, _ in table), table
    assert "arithmetic: training state 16 B x" in table[1][2] and "plain generate" in table[2][2]
    assert re.search(r"per rank \d+\.\d\d, \d+\.\d\d GB; arithmetic: training state", table[5][2]), table


def test_the_gpu_check_exits_1_when_a_stage_fails(capsys):
    """A model directory that does not exist fails the stages that load it (run here in this
    process, the slowest stages, torchrun's and pytest's, left out): they are FAILED rows of the
    table, and the command exits 1."""
    from tools import gpu

    passed = lambda *_, **__: (True, "not run here")
    with pytest.MonkeyPatch.context() as patch:
        for stage in ("_gpu_tests", "_gpu_fsdp_step", "_gpu_two_processes"):
            patch.setattr(gpu, stage, passed)
        with pytest.raises(SystemExit) as done:
            gpu.bench_gpu(argparse.Namespace(model_dir="/nonexistent-model"))
    out = capsys.readouterr().out
    assert done.value.code == 1, out
    assert out.count("FAILED") == 2 * 2  # two stages load the model, each in the progress lines and the table


@pytest.mark.skipif(importlib.util.find_spec("trl") is not None, reason="TRL is installed here")
def test_the_peer_comparison_without_trl_says_how_to_install_it_and_exits_0(capsys):
    """`python bench.py peer` where TRL is not installed measures nothing, prints the install command,
    and exits 0 (run in this process): TRL is never a requirement."""
    import bench

    bench.main(["peer"])  # returns, where a failure would raise or exit non-zero
    out = capsys.readouterr().out
    assert "pip install trl" in out and "nothing measured" in out


def test_the_multi_turn_peers_tool_has_the_schema_trl_derives_and_runs_code_in_our_sandbox():
    """tools.peer.python, the tool TRL's side of `python bench.py peer --turns K` calls: transformers derives
    from its signature and docstring the JSON schema TRL hands the model (one required string
    `code`), and it returns what the code printed, a traceback included, from our sandbox."""
    from transformers.utils import get_json_schema

    from tools import peer

    schema = get_json_schema(peer.python)
    assert schema["function"]["name"] == "python"
    assert schema["function"]["parameters"]["required"] == ["code"]
    assert schema["function"]["parameters"]["properties"]["code"]["type"] == "string"
    assert peer.python("print(6 * 7)") == "42\n"
    assert "ZeroDivisionError" in peer.python("print(1 / 0)")


@pytest.mark.parametrize("turns", [0, 5])
def test_peer_turns_outside_the_taught_turns_are_a_usage_error(turns, capsys):
    """`python bench.py peer --turns K` accepts 1 (single-turn) to len(PEER_TURNS) (the turns the demo
    model is taught); anything else exits 2 naming the value, before any model is built."""
    import bench
    from tools import peer

    with pytest.raises(SystemExit) as exit_:
        bench.main(["peer", "--turns", str(turns)])
    assert exit_.value.code == 2
    assert f"--turns {turns}: must be 1 to {len(peer.PEER_TURNS)}" in capsys.readouterr().err
