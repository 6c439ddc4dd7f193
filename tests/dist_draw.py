"""Dynamic sampling across ranks, for tests/test_train.py: under `torchrun --nproc_per_node 2`,
train.draw_groups with --filter_groups on a synthetic stream (no model) whose groups with
differing scores lie so that each rank's share of the batch holds a group the other rank
generated. Each rank saves what its share holds to OUT_rank{r}.pt.

Usage: torchrun --nproc_per_node 2 tests/dist_draw.py OUT
"""

import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import config
import parallel
import rollout
import sandbox
import train

P, G = 4, 2
DIFFERS = (False, True, False, True, True, False, False, True)  # by stream position; the batch: 1, 3, 4, 7


def sample_groups(step, position, run):
    """This rank's groups of the round at `position`: one-turn trajectories that name their
    position in their tokens, text and sandbox result."""
    derived = run.derived
    first = position + run.world.rank * derived.local_prompts
    stream = range(first, first + derived.local_prompts)
    trajs = []
    for q in stream:
        for j in range(G):
            traj = rollout.Trajectory.start([q, j])
            traj.turns.append(rollout.Turn(f"turn {q}/{j}", "print(q)", True, sandbox.Result(True, f"{q}\n", "")))
            trajs.append(traj)
    scores = torch.tensor([[1.0, 0.0] if DIFFERS[q] else [1.0, 1.0] for q in stream]).flatten()  # (n_local * G,)
    return [{"position": q} for q in stream], trajs, scores


def main(out):
    world = parallel.setup_distributed("cpu")
    train.sample_groups = sample_groups
    cfg = config.TrainConfig(prompts_per_step=P, group_size=G, filter_groups=True)
    run = types.SimpleNamespace(data_position=0, cfg=cfg, derived=config.check_config(cfg, world), world=world)
    drawn = train.draw_groups(1, run)
    torch.save(
        {
            "positions": [p["position"] for p in drawn.problems],
            "tokens": [t.input_ids for t in drawn.trajs],
            "texts": [t.turns[0].text for t in drawn.trajs],
            "outputs": [t.turns[0].result.stdout for t in drawn.trajs],
            "scores": drawn.scores,
            "counts": drawn.counts,
            "data_position": run.data_position,
        },
        f"{out}_rank{world.rank}.pt",
    )
    parallel.finish(world)


if __name__ == "__main__":
    main(sys.argv[1])
    parallel.exit_now()
