"""Cold-start SFT: the policy learns the tool protocol from teacher trajectories before RL.

    steps_done = sft.run(wrapped, tokenizer, rows, cfg=cfg, world=world, validate=greedy_accuracy)

rows are {problem, answer, turns}; each row's turns are run in a sandbox (so tool outputs are
real) and tokenised exactly as an RL rollout would be, tool outputs masked. The loss is the mean
negative log-likelihood of the assistant's tokens over every rank's batch, accumulated over
micro-batches of --micro_batch_size as RL's. Every
cfg.sft_check_every steps validate() (greedy accuracy on held-back problems, the same on every
rank) is logged to sft_checks.jsonl and may end SFT at cfg.sft_stop_at.

Shapes: N trajectories, L tokens.
"""

import json
import math
import os

import torch
from tqdm import tqdm

import model as policies
import rollout
import sandbox
from parallel import all_reduce, gradient_sync, micro_batches, trainable_parameters


def nll(logp, loss_mask, num_tokens=None):
    """Mean negative log-likelihood of the trained tokens (loss_mask True), logp (N, L); divided
    by num_tokens when given (the global count under data parallelism), else by this batch's."""
    return -(logp * loss_mask).sum() / (num_tokens if num_tokens is not None else loss_mask.sum().clamp(min=1))


def accumulate(wrapped, trajs, *, pad, micro_batch_size, world):
    """Forward and backward of this rank's trajectories in micro-batches of micro_batch_size
    (longest first, each cut to its own width; the same count on every rank, as FSDP2 needs), the
    vocabulary projected at trained positions only, as in RL; gradients summed over every rank's
    batch. Returns this rank's share of the mean NLL over all ranks' trained tokens."""
    batch = rollout.collate(sorted(trajs, key=lambda t: -len(t.input_ids)), pad)
    batch = {k: v.to(world.device) for k, v in batch.items()}
    num_tokens = all_reduce([float(batch["loss_mask"].sum())], world)[0]
    count = math.ceil(len(trajs) / micro_batch_size)
    total = 0.0
    for k, (_, micro) in enumerate(micro_batches(batch, size=micro_batch_size, trim=True, count=count)):
        with gradient_sync(wrapped, enabled=k == count - 1):
            logp = wrapped(micro["input_ids"], micro["attention_mask"], needed=micro["loss_mask"])  # (m, L)
            loss = nll(logp, micro["loss_mask"], num_tokens)
            (loss * world.size).backward()  # DDP averages gradients over ranks; this makes it a sum
        total += float(loss.detach())
    return total


def teacher_trajectories(rows, tokenizer, *, system_prompt, timeout):
    """The rows as trajectories: the turns' code run in a sandbox (reset between rows), so the
    tool outputs are real and masked exactly as in RL rollouts."""
    trajs = []
    with sandbox.Session(timeout=timeout) as session:
        for row in rows:
            session.reset()
            prompt = policies.chat_prompt_ids(tokenizer, row["problem"], system_prompt)
            trajs.append(rollout.teacher_trajectory(tokenizer, prompt, row["turns"], session))
    return trajs


def batches(lengths, batch_size, steps, seed, pool=8):
    """`steps` batches of indices drawn at random, grouped by length: each run of `pool` batches
    is drawn together, sorted by length and cut, then shuffled, so batches carry little padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < steps:
        picks = torch.randint(len(lengths), (batch_size * pool,), generator=g).tolist()
        picks.sort(key=lambda k: lengths[k])
        group = [picks[s : s + batch_size] for s in range(0, len(picks), batch_size)]
        out += [group[k] for k in torch.randperm(pool, generator=g).tolist()]
    return out[:steps]


def schedule(optimizer, cfg):
    """Warmup, a long plateau, then a cosine tail: a tiny model learns to copy digits (from the
    problem into code, from tool output into the answer) in a sudden transition that needs many
    steps at a high learning rate."""
    warmup, plateau = max(1, cfg.sft_steps // 20), int(cfg.sft_decay_start * cfg.sft_steps)
    tail = max(1, cfg.sft_steps - plateau)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / warmup) * (1.0 if s < plateau else 0.5 * (1 + math.cos(math.pi * (s - plateau) / tail)))
        ),
    )


def run(wrapped, tokenizer, rows, *, cfg, world, system_prompt=None, validate=None):
    """cfg.sft_steps AdamW steps on the rows' trajectories (cfg.sft_batch_size over all ranks);
    validate() at every check, when given. Returns the steps done."""
    trajs = teacher_trajectories(rows, tokenizer, system_prompt=system_prompt, timeout=cfg.sandbox_timeout)
    params = trainable_parameters(wrapped)
    optimizer = torch.optim.AdamW(params, lr=cfg.sft_lr, weight_decay=cfg.weight_decay)
    lr_schedule = schedule(optimizer, cfg)
    local = cfg.sft_batch_size // world.size  # trajectories per rank per step
    picked = batches([len(t.input_ids) for t in trajs], cfg.sft_batch_size, steps=cfg.sft_steps, seed=cfg.seed)
    wrapped.train()
    bar = tqdm(picked, desc="sft", disable=not world.main, dynamic_ncols=True)
    for step, picks in enumerate(bar, start=1):
        mine = [trajs[k] for k in picks[world.rank * local :][:local]]
        loss = accumulate(wrapped, mine, pad=tokenizer.pad_token_id, micro_batch_size=cfg.micro_batch_size, world=world)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)  # 0: no clipping
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr_schedule.step()
        bar.set_postfix(nll=f"{all_reduce([loss], world)[0]:.3f}", gnorm=f"{float(grad_norm):.2f}")
        if validate and cfg.sft_check_every and step % cfg.sft_check_every == 0:
            stop = check(step, validate(), cfg=cfg, world=world)
            wrapped.train()
            if stop:
                break
    bar.close()
    return step


def check(step, accuracy, *, cfg, world):
    """Whether greedy validation accuracy `accuracy` after `step` SFT steps reaches sft_stop_at,
    which ends SFT; the check is logged and appended to sft_checks.jsonl. The tiny model learns
    to copy digits in a sudden, seed-dependent transition: stopping at a fixed competence rather
    than a fixed step count gives every seed a comparable RL start."""
    stop = cfg.sft_stop_at > 0 and accuracy >= cfg.sft_stop_at
    if world.main:
        tqdm.write(f"sft step {step}: validation greedy accuracy {accuracy:.3f}" + (", end of SFT" if stop else ""))
        mode = "w" if step == cfg.sft_check_every else "a"  # SFT restarted from scratch starts the file again
        with open(os.path.join(cfg.out_dir, "sft_checks.jsonl"), mode) as f:
            f.write(json.dumps({"step": step, "val_greedy": accuracy, "stop": stop}) + "\n")
    return stop
