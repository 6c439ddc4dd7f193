"""One RL update on fixed trajectories, for tests/test_train.py: run under `python` (one process)
or `torchrun --nproc_per_node 2` (each rank takes its contiguous share of the groups), it scores
and updates the tiny policy and saves the resulting parameters, so the test can compare world
sizes. Usage: python tests/dist_update.py OUT.pt [ddp|fsdp]
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data
import model
import rewards
import rollout
import sandbox
import train

PROBLEMS, GROUP = 4, 3


def trajectories(tokenizer):
    """GROUP trajectories per problem: the teacher's, the teacher's with a wrong final answer, and
    a turn without a tool call (a format penalty): advantages of every sign."""
    trajs, golds = [], []
    with sandbox.Session() as session:
        for p in data.toy_problems(PROBLEMS, seed=5, mistake_rate=0.5):
            prompt = model.chat_prompt_ids(tokenizer, p["problem"], system=None)
            for turns in (p["teacher"], p["teacher"][:-1] + ["\\boxed{0}"], ["\\boxed{1}"]):
                session.reset()
                trajs.append(rollout.teacher_trajectory(tokenizer, prompt, turns, session))
                golds.append(p["answer"])
    return trajs, golds


def main(out, parallel):
    cfg = train.Config(prompts_per_step=PROBLEMS, group_size=GROUP, micro_batch_size=2, ppo_epochs=2,
                       parallel=parallel, lr=0.5, adv_norm="batch")  # fmt: skip
    world = train.setup_distributed("cpu")
    derived = train.check_config(cfg, world)
    tokenizer = model.tiny_tokenizer()
    policy = model.tiny_model(tokenizer, seed=0)
    trajs, golds = trajectories(tokenizer)
    n = derived["local_trajectories"]
    mine = slice(world.rank * n, (world.rank + 1) * n)
    group_index = torch.arange(PROBLEMS).repeat_interleave(GROUP)[mine]
    wrapped = train.wrap(policy, cfg, world)
    # SGD: the update is the gradient itself. (Adam divides by sqrt(v), which turns float noise
    # in a near-zero gradient element into a full-size step, whatever the world size.)
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=cfg.lr)
    embedder = rewards.make_embedder(cfg.embedder, tokenizer)
    grader = rewards.Grader()
    scored = train.score(trajs[mine], golds[mine], group_index, cfg, derived, grader, embedder, world)
    grader.close()
    policy.train()
    train.update(wrapped, optimizer, trajs[mine], scored["turn_advantages"], scored["trained"], cfg, world,
                 tokenizer.pad_token_id)  # fmt: skip
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    in_sync = train.check_in_sync(wrapped, world)
    if world.main:
        torch.save({"weights": weights, "in_sync": in_sync, "world_size": world.size}, out)
    train.barrier(world)
    if world.size > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ddp")
