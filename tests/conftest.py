"""Shared test set-up: hypothesis profiles, and a tiny SFT-trained checkpoint for the loop tests."""

import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, settings

# No deadlines: the machine is shared and timing is noisy. CI derandomises so a red run can be
# reproduced exactly; locally every run explores new examples.
settings.register_profile("dev", deadline=None, max_examples=100)
settings.register_profile(
    "ci", deadline=None, max_examples=200, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def requirement_lines(name):
    """A requirements or constraints file's entries, comments and blank lines left out."""
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def constraint_pins():
    """constraints.txt as {package: exact version}."""
    return dict(line.split("==") for line in requirement_lines("constraints.txt"))


def run_script(args, timeout=300, **kwargs):
    """Run a command in the repository root, one thread per process (as torchrun's ranks)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


def torchrun(*args, ranks=2):
    """The command line of a torchrun of `ranks` processes (gloo on the CPU)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *args]


# train.py flags of a small, fast run of the tiny model. Its checkpoints are directories, which
# would get a real model's defaults: the demo's learning rate and micro-batch are given explicitly.
SMALL = dict(
    demo_size="64x2",
    toy_size=200,
    eval_size=0,
    prompts_per_step=4,
    group_size=4,
    max_turn_tokens=48,
    max_total_tokens=256,
    sandbox_workers=4,
    lr=3e-4,
    micro_batch_size=16,
)


@pytest.fixture(scope="session")
def sft_model(tmp_path_factory):
    """A tiny policy after a short SFT on the toy teacher (a checkpoint directory inside a run
    directory): it makes tool calls often enough that RL groups have reward variance (a random
    model's groups are all alike and train nothing)."""
    import config
    import train

    out = str(tmp_path_factory.mktemp("sft"))
    train.main(config.TrainConfig(out_dir=out, sft_steps=80, max_steps=0, **SMALL))
    return os.path.join(out, "checkpoints", "step_0")
