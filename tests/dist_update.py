"""RL updates on fixed trajectories, for tests/test_train.py: run under `python` (one process)
or `torchrun --nproc_per_node 2` (each rank takes its contiguous share of the groups), it scores
and updates the tiny policy once per setting, from the same start, and saves the resulting
parameters, so the test can compare world sizes. Several settings share one launch (a process
start costs more than an update of the tiny model).

Usage: python tests/dist_update.py OUT.pt SETTING [SETTING ...], each SETTING
PARALLEL:ADV_NORM:MINI_BATCH_SIZE:SIGNAL:DTYPE:EMBEDDER, e.g. fsdp:group:4:signal:bf16:policy
(parallel ddp|fsdp; adv_norm group|turn|batch; signal|none: none makes every group's
trajectories alike, so that no rank has a token to train; dtype fp32|bf16, the compute dtype;
embedder tokens|policy: policy embeds code with the policy itself). OUT.pt holds one result per
setting, in order.
"""

import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import config
import grading
import model
import parallel
import rewards
import rollout
import sandbox
import tasks
import train

PROBLEMS, GROUP = 4, 3


def trajectories(tokenizer, signal=True):
    """GROUP trajectories per problem: the teacher's, the teacher's with a wrong final answer, and
    a turn without a tool call (a format penalty): advantages of every sign. The last problem's
    are all alike, so under group normalisation the second rank trains fewer rows, in fewer
    micro-batches, than the first."""
    trajs, golds = [], []
    with sandbox.Session() as session:
        for k, p in enumerate(tasks.toy_problems(PROBLEMS, seed=5, mistake_rate=0.5)):
            prompt = model.chat_prompt_ids(tokenizer, p["problem"], system=None)
            variants = (p["teacher"], p["teacher"][:-1] + ["\\boxed{0}"], ["\\boxed{1}"])
            for turns in variants if signal and k < PROBLEMS - 1 else [variants[1]] * GROUP:
                session.reset()
                trajs.append(rollout.teacher_trajectory(tokenizer, prompt, turns, session))
                golds.append(p["answer"])
    return trajs, golds


def gradient_record(wrapped, records):
    """Before every forward with gradients, whether each parameter's gradient is missing, or its
    local size (a shard's under FSDP2), beside the parameter's local size."""
    local = lambda t: tuple(t.to_local().shape if hasattr(t, "to_local") else t.shape)

    def record(*_):
        if torch.is_grad_enabled():
            records.append([(None if p.grad is None else local(p.grad), local(p)) for p in wrapped.parameters()])

    wrapped.register_forward_pre_hook(record, prepend=True)  # before FSDP2 gathers the parameters


def update_once(world, trajs, golds, wrapping, adv_norm, mini_batch_size, compute_dtype, embedder):
    """One setting's score and update from the tiny policy's seed-0 weights: its result record."""
    # With mini-batches, one row per micro-batch: ranks then run different numbers of micro-batches,
    # and with mini-batches of 2 the second rank's last mini-batches hold only stand-in rows.
    cfg = config.TrainConfig(
        prompts_per_step=PROBLEMS,
        group_size=GROUP,
        micro_batch_size=1 if mini_batch_size else 2,
        ppo_epochs=2,
        parallel=wrapping,
        lr=0.5,
        adv_norm=adv_norm,
        mini_batch_size=mini_batch_size,
        compute_dtype=compute_dtype,
        embedder=embedder,
    )
    world = dataclasses.replace(world, dtype=parallel.resolve_dtype(compute_dtype, world.device))
    derived = config.check_config(cfg, world)
    tokenizer = model.tiny_tokenizer()
    policy = model.tiny_model(tokenizer, seed=0 if world.main else 1)  # wrap gives every rank rank 0's weights
    n = derived.local_trajectories
    mine = slice(world.rank * n, (world.rank + 1) * n)
    group_index = torch.arange(PROBLEMS).repeat_interleave(GROUP)[mine]
    wrapped = parallel.wrap(policy, world, cfg.parallel)
    gradients = []
    gradient_record(wrapped, gradients)
    # SGD: the update is the gradient itself. (Adam divides by sqrt(v), which turns float noise
    # in a near-zero gradient element into a full-size step, whatever the world size.)
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=cfg.lr)
    embedder = rewards.make_embedder(
        cfg.embedder, tokenizer, policy, gathered=lambda: parallel.full_parameters(wrapped)
    )
    grader = grading.Grader()
    scored = rewards.score(
        trajs[mine],
        [{"answer": g} for g in golds[mine]],
        group_index,
        cfg=cfg,
        derived=derived,
        world=world,
        grader=grader,
        embedder=embedder,
    )
    grader.close()
    policy.train()
    sums, _ = train.update(
        wrapped,
        optimizer,
        trajs[mine],
        turn_advantages=scored.turn_advantages,
        trained=scored.trained,
        counted=scored.counted,
        cfg=cfg,
        world=world,
        pad=tokenizer.pad_token_id,
    )
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    in_sync = parallel.check_in_sync(wrapped, world)
    return {
        "weights": weights,
        "in_sync": in_sync,
        "world_size": world.size,
        "gradients": gradients,
        "optimizer_steps": sums["optimizer_steps"],
        "no_signal": sums["no_signal"],
        "shaped": int(((~scored.correct) & (scored.outcomes > scored.scores)).sum()),
    }


def main(out, settings):
    world = parallel.setup_distributed("cpu")
    tokenizer = model.tiny_tokenizer()
    trajs = {signal: trajectories(tokenizer, signal == "signal") for signal in {s.split(":")[3] for s in settings}}
    results = []
    for setting in settings:
        wrapping, adv_norm, mini_batch_size, signal, compute_dtype, embedder = setting.split(":")
        results.append(
            update_once(
                world,
                *trajs[signal],
                wrapping=wrapping,
                adv_norm=adv_norm,
                mini_batch_size=int(mini_batch_size),
                compute_dtype=compute_dtype,
                embedder=embedder,
            )
        )
    if world.main:
        torch.save(results, out)
    parallel.finish(world)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    parallel.exit_now()
