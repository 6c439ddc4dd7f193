"""train.py's command under torchrun with an error injected on rank 1 at RL step 2, for
tests/test_train.py: the run must end at once with a non-zero status instead of leaving rank 0
waiting in a collective. Usage: torchrun --nproc_per_node 2 tests/dist_fail.py MODEL OUT_DIR
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import config
import parallel
import train

from conftest import SMALL

real_rl_step = train.rl_step


def failing_rl_step(step, run):
    if run.world.rank == 1 and step == 2:
        raise RuntimeError("injected failure on rank 1 at RL step 2")
    return real_rl_step(step, run)


if __name__ == "__main__":
    train.rl_step = failing_rl_step
    model, out_dir = sys.argv[1:3]
    cfg = config.TrainConfig(model=model, sft_steps=0, max_steps=4, out_dir=out_dir, **SMALL)
    parallel.run_command(train.main, cfg, prog="train.py", input_errors=train.INPUT_ERRORS)
