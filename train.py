"""Train a tool-using policy with GTPO (or GRPO): the RL loop, read top to bottom.

    python train.py                                        # the demo: tiny Qwen2 on the toy task
    python train.py --model Qwen/Qwen2.5-7B-Instruct --data dapo17k.jsonl --sft_data sft.jsonl
    torchrun --nproc_per_node 8 train.py --model ... --data ... --parallel fsdp

One RL step (rl_step): the next problems -> rollout (rollout.py: G multi-turn trajectories per
problem, the sandbox between turns) -> rewards.score (rewards and advantages: the method's steps
1-3, see gtpo.py) -> update (the objective, step 4: PPO-clip over mini-batches, an AdamW step
each). It reads in six files: this one, rollout.py, rewards.py, gtpo.py, model.py, parallel.py.
main, at the end: flags (config.py), data (data.load_run), the policy (parallel.wrap), cold-start
SFT (sft.run) and the held-out evaluation before RL, checkpoints/step_0, then the loop: one
rl_step per step, a log line, samples and checkpoints (checkpoint.save), and the held-out
evaluation after RL.

Under torchrun each rank owns whole problem groups; normalisation sees every rank's rows; every
loss is divided by the global count of trained tokens and multiplied by the world size (undoing
DDP's mean), so gradients are exact; metrics are summed over ranks before rank 0 prints them.

Shapes: N trajectories on this rank, G group size, K max turns, L tokens.
"""

import dataclasses
import math
import os
import random
import re
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import data
import grading
import gtpo
import metrics
import model as policies
import parallel
import rewards
import rollout
import sandbox
import sft
from config import ConfigError, Derived, TrainConfig, check_config, check_prompts, parse_config, parse_demo_size


def parse_args(argv=None):
    """TrainConfig from the command line; a bad flag is one error line and exit code 2."""
    return parse_config(TrainConfig, prog="train.py", description=__doc__, argv=argv)


@dataclass
class RunState:
    """The run's settings and what the loop carries from step to step. A checkpoint holds the
    weights, the optimizer, the scheduler, data_position and evaluation (checkpoint.py)."""

    cfg: TrainConfig
    derived: Derived
    world: parallel.World
    policy: torch.nn.Module  # the Hugging Face model: generation, and the weights wrapped trains
    tokenizer: object
    wrapped: torch.nn.Module  # parallel.LogProbs(policy), under DDP or FSDP2 with torchrun
    pool: sandbox.Pool
    grader: grading.Grader
    problems: list  # the RL problems, visited in a seeded order per epoch (problems_at)
    tracker: object = field(default_factory=metrics.NoTracker)
    reward_fn: object = None  # --reward_fn, or None: the grader
    optimizer: torch.optim.Optimizer = None
    scheduler: object = None
    embedder: object = None  # step 3's code embedder (None without shaping)
    ref: torch.nn.Module = None  # the frozen RL start, for kl_coef > 0
    data_position: int = 0  # problems drawn so far, over all ranks
    evaluation: dict = field(default_factory=dict)  # held-out accuracies and SFT steps done
    warned_truncated: bool = False


# ---------------------------------------------------------------- one RL step: sample, score, update


@dataclass
class StepResult:
    """What one RL step did on this rank."""

    drawn: "Drawn"  # its problem groups: problems, trajectories, outcome scores, draw counts
    scored: rewards.Scored  # rewards and advantages
    update_sums: dict  # the update's stats, alike on every rank (update)
    times: dict  # seconds of each phase


def rl_step(step, run):
    """One RL step on this rank's share of the problems: sample, score, update."""
    cfg, world, n_local = run.cfg, run.world, run.derived.local_prompts
    group_index = torch.arange(n_local).repeat_interleave(cfg.group_size) + world.rank * n_local  # (N,) global ids
    t0 = time.perf_counter()
    drawn = draw_groups(step, run)
    t1 = time.perf_counter()
    if hasattr(run.embedder, "new_step"):
        run.embedder.new_step()
    rows = [p for p in drawn.problems for _ in range(cfg.group_size)]
    scored = rewards.score(
        drawn.trajs,
        rows,
        group_index,
        cfg=cfg,
        derived=run.derived,
        world=world,
        grader=run.grader,
        embedder=run.embedder,
        scores=drawn.scores,
    )
    t2 = time.perf_counter()
    run.policy.train()
    sums, t_old = update(
        run.wrapped,
        run.optimizer,
        drawn.trajs,
        turn_advantages=scored.turn_advantages,
        trained=scored.trained,
        counted=scored.counted,
        cfg=cfg,
        world=world,
        pad=run.tokenizer.pad_token_id,
        ref=run.ref,
    )
    with warnings.catch_warnings():  # the schedule counts RL steps, also those without an optimizer step
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        run.scheduler.step()
    t3 = time.perf_counter()
    times = {"t_rollout": t1 - t0, "t_reward": t2 - t1, "t_old_logp": t_old, "t_update": t3 - t2 - t_old}
    return StepResult(drawn=drawn, scored=scored, update_sums=sums, times=times)


@dataclass
class Drawn:
    """This rank's share of a step's problem groups (draw_groups)."""

    problems: list  # this rank's problem rows, one per group
    trajs: list  # (N,) G trajectories per problem, in problem order
    scores: torch.Tensor  # (N,) their outcome scores (rewards.outcome_scores)
    counts: dict  # over all ranks: groups_drawn, groups_varied (in the batch), filter_rounds


def draw_groups(step, run):
    """The step's groups (Drawn): the next prompts_per_step problems; with --filter_groups
    (DAPO's dynamic sampling), rounds of prompts_per_step more until that many groups have
    outcome scores that differ, at most max_filter_rounds. The batch is then the first
    prompts_per_step such groups in stream order, filled with the first alike ones if the rounds
    ran out, and rank r takes its r-th share of it: the same batch on any number of ranks. The
    data position moves past every round drawn."""
    cfg, world, n_local = run.cfg, run.world, run.derived.local_prompts
    G, P = cfg.group_size, cfg.prompts_per_step
    mine, varied, alike = {}, [], []  # mine: (round, global group) -> (problem, trajs, scores)
    for r in range(cfg.max_filter_rounds if cfg.filter_groups else 1):
        problems, trajs, scores = sample_groups(step, run.data_position, run)
        run.data_position += P
        for k, problem in enumerate(problems):
            mine[r, world.rank * n_local + k] = (problem, trajs[k * G : (k + 1) * G], scores[k * G : (k + 1) * G])
        groups = scores.view(n_local, G)  # (n_local, G)
        same = parallel.all_gather_rows((groups == groups[:, :1]).all(dim=1), world).tolist()  # (P,) every rank's
        varied += [(r, g) for g in range(P) if not same[g]]
        alike += [(r, g) for g in range(P) if same[g]]
        if len(varied) >= P:
            break
    batch = sorted(varied[:P] + alike[: max(P - len(varied), 0)]) if cfg.filter_groups else [(0, g) for g in range(P)]
    if any(g // n_local != k // n_local for k, (_, g) in enumerate(batch)):  # a group changes ranks
        for theirs in parallel.gather_objects({key: mine[key] for key in batch if key in mine}, world):
            mine.update(theirs)
    share = [mine[key] for key in batch[world.rank * n_local : (world.rank + 1) * n_local]]
    counts = {"groups_drawn": P * (r + 1), "groups_varied": min(len(varied), P), "filter_rounds": r + 1}
    trajs = [t for _, group, _ in share for t in group]
    return Drawn(
        problems=[p for p, _, _ in share], trajs=trajs, scores=torch.cat([s for *_, s in share]), counts=counts
    )


def sample_groups(step, position, run):
    """G trajectories for each of this rank's problems of the prompts_per_step at global stream
    position `position`, and their scores: (problems, trajs, scores (N,)). Each trajectory's
    random stream is seeded by its position, whichever rank generates it."""
    cfg, n_local, G = run.cfg, run.derived.local_prompts, run.cfg.group_size
    first = position + run.world.rank * n_local
    problems = problems_at(run.problems, first, n_local, seed=cfg.seed)
    rows = [p for p in problems for _ in range(G)]
    seeds = rollout.rollout_seeds(cfg.seed, step, first=first * G, count=n_local * G)
    trajs = generate(run, rows, temperature=cfg.temperature, seeds=seeds, prewarm_next=True)
    return problems, trajs, rewards.outcome_scores(trajs, rows, grader=run.grader, reward_fn=run.reward_fn)


def generate(run, rows, *, temperature, seeds=None, prewarm_next=False):
    """A trajectory per problem row, from the policy with its parameters gathered (FSDP2) and in
    the compute dtype, --rollout_batch_size at a time. prewarm_next: as many sandboxes as it used
    start for the next step while this one trains."""
    prompt_of = {}  # a problem's rows (G in a step, eval_samples in evaluation) share its prompt
    for row in rows:
        if id(row) not in prompt_of:
            prompt_of[id(row)] = policies.chat_prompt_ids(run.tokenizer, row["problem"], run.derived.system_prompt)
    prompts = [prompt_of[id(row)] for row in rows]
    settings = rollout.RolloutConfig.of(run.cfg, temperature=temperature, prewarm_next=prewarm_next)
    with torch.no_grad(), parallel.full_parameters(run.wrapped), parallel.mixed_precision(run.policy, run.world.dtype):
        run.policy.eval()
        return rollout.rollout(run.policy, run.tokenizer, prompts, pool=run.pool, cfg=settings, seeds=seeds)


def problems_at(problems, position, count, seed):
    """The problems at global positions [position, position + count) of an endless stream that
    visits the set in a fresh seeded order each epoch (so resuming needs only the position)."""
    out, orders = [], {}
    for p in range(position, position + count):
        epoch, k = divmod(p, len(problems))
        if epoch not in orders:
            order = torch.Generator().manual_seed(seed * 100_003 + epoch)
            orders[epoch] = torch.randperm(len(problems), generator=order)
        out.append(problems[int(orders[epoch][k])])
    return out


# ---------------------------------------------------------------- step 4: the update

# The loss's stats that the log line shows: logged name -> gtpo.policy_loss's
LOSS_STATS = {"clip_frac": "clip_frac", "approx_kl": "approx_kl", "ratio": "ratio_mean", "kl_ref": "kl_ref"}


def update(wrapped, optimizer, trajs, *, turn_advantages, trained, counted, cfg, world, pad, ref=None):
    """Step 4: plan the mini-batches, score the sampled tokens under the old (if needed) and the
    reference policy, then ppo_epochs passes over the mini-batches: the loss, its gradient (with
    every rank's), an optimizer step each. Rows of groups whose advantages are all zero get no
    forward pass (their surrogate is exactly 0), unless kl_coef > 0; counted rows make up each
    mini-batch's denominator. A mini-batch with no forwarded token on any rank takes no step, and
    a batch without any does no work at all (alike on every rank: the counts are global).
    Returns (stat sums: means over the optimizer steps taken, seconds spent on old and reference
    log-probs)."""
    forwarded = counted if cfg.kl_coef > 0 else trained
    plan = plan_minibatches(trajs, forwarded=forwarded, counted=counted, cfg=cfg, world=world, pad=pad)
    plan = [mb for mb in plan if mb.forwarded_tokens > 0]
    t0 = time.perf_counter()
    for mb in plan:
        advantages = turn_advantages[mb.rows] if mb.rows else torch.zeros_like(turn_advantages[:1])  # (n, K)
        mb.batch["advantages"] = gtpo.token_advantages(advantages.to(world.device), mb.batch["token_turn"])  # (n, L)
        if needs_old_logprobs(cfg, len(plan)):
            mb.batch["old_logp"] = no_grad_logprobs(wrapped, mb, cfg=cfg)  # (n, L)
        if ref is not None:
            mb.batch["ref_logp"] = no_grad_logprobs(ref, mb, cfg=cfg)  # (n, L)
    t_old = time.perf_counter() - t0
    steps = cfg.ppo_epochs * len(plan)
    sums = dict.fromkeys(("loss", *LOSS_STATS, "grad_norm", "skipped"), 0.0)
    sums["optimizer_steps"], sums["no_signal"] = steps, float(not plan)
    for _ in range(cfg.ppo_epochs):
        for mb in plan:
            backward(wrapped, mb, cfg=cfg, world=world, sums=sums, steps=steps)
            optimizer_step(optimizer, cfg=cfg, world=world, sums=sums, steps=steps)
    return sums, t_old


def needs_old_logprobs(cfg, num_minibatches):
    """Whether a separate no-gradient pass must score the sampled tokens. With exactly one
    optimizer step per batch the policy trained is the one that sampled: the ratio is 1 by
    construction and the trained pass's own log-probs, detached, are the old ones."""
    return num_minibatches * cfg.ppo_epochs > 1


@dataclass
class MiniBatch:
    """The rows of one optimizer step on this rank, and the global counts its loss divides by."""

    rows: list  # local row indices forwarded, longest first (empty: a stand-in row that trains nothing)
    batch: dict  # rollout.collate of those rows (or of the stand-in), on the device
    num_tokens: float  # the denominator: sampled tokens of its counted rows, over all ranks
    num_seqs: float  # counted rows with a sampled token, over all ranks
    forwarded_tokens: float  # sampled tokens of its forwarded rows, over all ranks (0: nothing to do)
    micro_batches: int  # the same on every rank


def plan_minibatches(trajs, *, forwarded, counted, cfg, world, pad):
    """This rank's rows in the step's mini-batches: row i goes to mini-batch i mod M (M = the global
    batch / mini_batch_size, 1 when 0). A rank holds a multiple of M rows, so global row r * N + i
    lands in the same mini-batch as local row i: the mini-batches are the same sets of
    trajectories whatever the number of ranks, and a group's G rows spread over min(G, M) of
    them. Forwarded rows get forward passes; counted rows (forwarded or not) make up the
    denominator."""
    N = len(trajs)
    M = N * world.size // cfg.mini_batch_size if cfg.mini_batch_size else 1
    assert N % M == 0, f"{N} rows per rank do not split into {M} mini-batches"
    sampled = [sum(t.loss_mask) for t in trajs]
    members = [range(k, N, M) for k in range(M)]
    rows = [sorted((i for i in m if forwarded[i]), key=lambda i: -len(trajs[i].input_ids)) for m in members]
    local_counts = []  # per mini-batch: denominator tokens, denominator rows, forwarded tokens
    for m, r in zip(members, rows):
        counted_rows = [i for i in m if counted[i]]
        local_counts += [sum(sampled[i] for i in counted_rows), sum(1 for i in counted_rows if sampled[i])]
        local_counts += [sum(sampled[i] for i in r)]
    counts = parallel.all_reduce(local_counts, world)
    micro_counts = parallel.all_reduce([math.ceil(len(r) / cfg.micro_batch_size) for r in rows], world, op="max")
    shortest = min(range(N), key=lambda i: len(trajs[i].input_ids))
    plan = []
    for k, r in enumerate(rows):
        batch = {
            key: v.to(world.device) for key, v in rollout.collate([trajs[i] for i in r or [shortest]], pad).items()
        }
        if not r:  # a stand-in row that keeps this rank in the collectives and trains nothing
            batch["loss_mask"][:] = False
        tokens, seqs, forwarded_tokens = counts[3 * k : 3 * k + 3]
        micro = int(micro_counts[k])
        plan.append(
            MiniBatch(
                rows=r,
                batch=batch,
                num_tokens=tokens,
                num_seqs=seqs,
                forwarded_tokens=forwarded_tokens,
                micro_batches=micro,
            )
        )
    return plan


def micro_slices(mb, cfg):
    """mb's micro-batches (parallel.micro_batches). Cutting each to its longest row changes
    nothing but "seq-mean-token-sum-norm", which divides by the width."""
    trim = cfg.loss_agg != "seq-mean-token-sum-norm"
    return parallel.micro_batches(mb.batch, size=cfg.micro_batch_size, trim=trim, count=mb.micro_batches)


def no_grad_logprobs(wrapped, mb, *, cfg):
    """log-probs of mb's sampled tokens under wrapped at the sampling temperature, no gradient:
    (n, L), 0 beyond each micro-batch's width. Log-probs are projected at loss-masked positions
    only (model.token_logprobs)."""
    out = torch.zeros(mb.batch["input_ids"].shape, device=mb.batch["input_ids"].device)  # (n, L)
    with torch.no_grad():
        for s, micro in micro_slices(mb, cfg):
            logp = wrapped(
                micro["input_ids"], micro["attention_mask"], temperature=cfg.temperature, needed=micro["loss_mask"]
            )
            if s is not None:
                out[s : s + cfg.micro_batch_size, : logp.shape[1]] = logp
    return out


def backward(wrapped, mb, *, cfg, world, sums, steps):
    """mb's gradient, accumulated over its micro-batches (synced on the last), and its loss and
    stats (LOSS_STATS) added to sums, each weighted by its share of the step."""
    for k, (_, micro) in enumerate(micro_slices(mb, cfg)):
        with parallel.gradient_sync(wrapped, enabled=k == mb.micro_batches - 1):
            mask = micro["loss_mask"]
            logp = wrapped(
                micro["input_ids"], micro["attention_mask"], temperature=cfg.temperature, needed=mask
            )  # (m, L)
            loss, stats = gtpo.policy_loss(
                logp=logp,
                old_logp=micro.get("old_logp", logp.detach()),
                advantages=micro["advantages"],
                loss_mask=micro["loss_mask"],
                clip_low=cfg.clip_low,
                clip_high=cfg.clip_high,
                agg=cfg.loss_agg,
                num_tokens=mb.num_tokens,
                num_seqs=mb.num_seqs,
                ref_logp=micro.get("ref_logp"),
                kl_coef=cfg.kl_coef,
            )
            (loss * world.size).backward()  # DDP/FSDP average over ranks; this makes it a sum
        weight = float(micro["loss_mask"].sum()) / mb.forwarded_tokens / steps  # token share, per step
        sums["loss"] += float(loss.detach()) * world.size / steps
        for key, stat in LOSS_STATS.items():
            sums[key] += float(stats.get(stat, 0.0)) * weight


def optimizer_step(optimizer, *, cfg, world, sums, steps):
    """Clip the gradient norm and step; a non-finite norm (identical on every rank: the gradients
    are synced) skips the step with a warning, on every rank alike."""
    params = [p for group in optimizer.param_groups for p in group["params"]]  # see trainable_parameters
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf))
    if math.isfinite(grad_norm):
        optimizer.step()
    else:
        sums["skipped"] += 1
        if world.main:
            tqdm.write(f"warning: non-finite gradient norm ({grad_norm}); optimizer step skipped")
    optimizer.zero_grad(set_to_none=True)
    sums["grad_norm"] += grad_norm / steps


# ---------------------------------------------------------------- the run, top to bottom


def main(cfg):
    world = parallel.setup_distributed(cfg.device, cfg.compute_dtype, cfg.dist_timeout)
    derived = check_config(cfg, world)  # bad flags fail before any data is read
    reward_fn = rewards.load_reward_fn(cfg.reward_fn)
    started = time.time()
    sets = data.load_run(cfg, log=print if world.main else None)
    cfg = dataclasses.replace(cfg, sft_steps=sets.sft_steps)  # one pass over --sft_data, counted
    checkpoint.check_resume(cfg, world)
    tokenizer = policies.load_tokenizer(cfg.model)
    check_prompts(sets, tokenizer, cfg=cfg, derived=derived)  # before the model: a refusal costs nothing
    parallel.barrier(world)  # every rank has read the old config.json before rank 0 replaces it
    torch.manual_seed(cfg.seed + world.rank)  # distinct sampling per rank
    random.seed(cfg.seed + world.rank)
    np.random.seed(cfg.seed + world.rank)
    tracker = metrics.NoTracker()
    if world.main:
        os.makedirs(os.path.join(cfg.out_dir, "samples"), exist_ok=True)
        print(checkpoint.write_config(cfg, derived))
        resumes_at = (checkpoint.steps(cfg.out_dir) or [0])[-1]  # a missing package fails here, before any work
        tracker = metrics.open_tracker(cfg.report_to, cfg.out_dir, dataclasses.asdict(cfg), start_step=resumes_at)
    policy, wrapped = load_policy(cfg, world, tokenizer)
    pool = sandbox.Pool(cfg.sandbox_workers, timeout=cfg.sandbox_timeout)
    run = RunState(
        cfg=cfg,
        derived=derived,
        world=world,
        policy=policy,
        tokenizer=tokenizer,
        wrapped=wrapped,
        problems=sets.train,
        pool=pool,
        grader=grading.Grader(),
        tracker=tracker,
        reward_fn=reward_fn,
    )
    try:
        train(run, sets, started=started)
    finally:
        run.pool.close()
        run.grader.close()
        tracker.close()
    parallel.finish(world)  # not on an error: the other ranks may be waiting in a collective (see run_command)


def load_policy(cfg, world, tokenizer):
    """(policy, wrapped): the policy in fp32 master weights, read from disk by rank 0 only (the
    others build it on the meta device), and wrapped for the ranks with rank 0's weights."""
    torch.manual_seed(cfg.seed)  # the demo model's initialisation
    policy, _ = policies.load_policy(
        cfg.model,
        world.device if world.main else "meta",
        dtype=torch.float32,
        tokenizer=tokenizer,
        activation_checkpointing=cfg.activation_checkpointing,
        demo_size=parse_demo_size(cfg.demo_size),
        seed=cfg.seed,
    )
    wrapped = parallel.wrap(policy, world, cfg.parallel, vocab_size=len(tokenizer))
    torch.manual_seed(cfg.seed + world.rank)  # distinct sampling per rank
    return policy, wrapped


def train(run, sets, *, started):
    """RL on from the last checkpoint (start_rl): one rl_step per step, its log line, samples
    and checkpoints; then the held-out evaluation after RL and summary.json."""
    cfg, world = run.cfg, run.world
    start = start_rl(run, sets)
    steps = range(start + 1, cfg.max_steps + 1)
    for step in tqdm(steps, desc="rl", disable=not world.main, dynamic_ncols=True, initial=start, total=cfg.max_steps):
        lr = run.scheduler.get_last_lr()[0]
        done = rl_step(step, run)
        drawn = done.drawn
        metric_sums = metrics.step_sums(
            drawn.trajs,
            done.scored,
            groups=run.derived.local_prompts,
            drawn=drawn.counts,
            update_sums=done.update_sums,
            times=done.times,
        )
        record = metrics.reduce(step, metric_sums, lr=lr, world=world)
        if world.main:
            metrics.log_step(record, run, cfg)
            if step % cfg.sample_every == 0 or step == 1:
                path = os.path.join(cfg.out_dir, "samples", f"step_{step}.json")
                metrics.write_samples(
                    path, trajs=drawn.trajs, problems=drawn.problems, scored=done.scored, group_size=cfg.group_size
                )
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            checkpoint.save(step, run, cfg=cfg, world=world)
    in_sync = parallel.check_in_sync(run.wrapped, world)
    run.evaluation |= held_out_accuracy(run, sets, "after_rl")
    peaks = parallel.gather_objects(parallel.peak_memory_gb(world), world)  # GB per rank
    if world.main:
        metrics.write_summary(
            run.evaluation,
            cfg=cfg,
            held_out=len(sets.held_out),
            in_sync=in_sync,
            started=started,
            environment=parallel.environment(world),
            peak_memory_gb=peaks,
        )
    if in_sync is False:
        raise RuntimeError("parameters differ between ranks after training")


def start_rl(run, sets):
    """SFT and the evaluation before RL (once per out_dir: step_0 records them), the optimizer
    and its schedule, the last checkpoint's state, the KL reference, warm sandboxes and step 3's
    embedder. Returns the step RL goes on from."""
    cfg, world, done = run.cfg, run.world, checkpoint.steps(run.cfg.out_dir)
    if not done:
        if cfg.sft_steps:
            validate = (lambda: evaluate(run, sets.validation, temperature=0.0)) if sets.validation else None
            run.evaluation["sft_steps_done"] = sft.run(
                run.wrapped,
                run.tokenizer,
                sets.sft_rows,
                cfg=cfg,
                world=world,
                system_prompt=run.derived.system_prompt,
                validate=validate,
            )
        run.evaluation |= held_out_accuracy(run, sets, "before_rl")
        if world.main:
            print(f"held-out accuracy before RL: {run.evaluation}")
    run.optimizer = torch.optim.AdamW(
        parallel.trainable_parameters(run.wrapped), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    warmup = lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1))  # linear, then constant
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, warmup)
    if not done:
        checkpoint.save(0, run, cfg=cfg, world=world)  # the RL start: never pruned, the KL reference
        done = [0]
    checkpoint.load(done[-1], run, cfg=cfg, world=world)
    if cfg.kl_coef > 0:  # in the compute dtype: it is never updated
        step_0 = os.path.join(cfg.out_dir, "checkpoints", "step_0")
        reference = policies.load_policy(step_0, world.device if world.main else "meta", dtype=world.dtype)[0]
        frozen = parallel.LogProbs(reference.eval().requires_grad_(False), world.dtype, len(run.tokenizer))
        run.ref = parallel.replicate(frozen, world)
    if world.main:
        checkpoint.trim_metrics(cfg.out_dir, done[-1])
        if done[-1]:
            print(f"resumed from {cfg.out_dir}/checkpoints/step_{done[-1]}")
    run.pool.prewarm(run.derived.local_trajectories)
    if run.derived.shaped:  # the policy's own embedder runs with its parameters gathered (FSDP2 shards them)
        gathered = lambda: parallel.full_parameters(run.wrapped)
        run.embedder = rewards.make_embedder(cfg.embedder, run.tokenizer, run.policy, gathered=gathered)
    return done[-1]


def held_out_accuracy(run, sets, when):
    """{when}_sampled (at the RL temperature) and {when}_greedy accuracy on the held-out set."""
    accuracy = lambda temperature: evaluate(run, sets.held_out, temperature=temperature)
    return {f"{when}_sampled": accuracy(run.cfg.temperature), f"{when}_greedy": accuracy(0.0)}


def evaluate(run, problems, *, temperature):
    """Held-out accuracy: the mean over eval_samples trajectories per problem (one when greedy,
    temperature 0), problems sharded over ranks; None without problems. The sampling RNG is
    saved and restored, so evaluating does not change training."""
    if not problems:
        return None
    cfg, world = run.cfg, run.world
    samples = cfg.eval_samples if temperature > 0 else 1
    mine = [p for p in problems[world.rank :: world.size] for _ in range(samples)]
    rng = torch.get_rng_state()
    torch.manual_seed(cfg.seed + 7919 * (world.rank + 1))
    trajs = generate(run, mine, temperature=temperature)
    scores = rewards.outcome_scores(trajs, mine, grader=run.grader, reward_fn=run.reward_fn)  # (n,)
    torch.set_rng_state(rng)
    total, n = parallel.all_reduce([float((scores >= 1).sum()), float(len(mine))], world)
    return total / n


INPUT_ERRORS = (
    ConfigError,
    data.DataError,
    rewards.RewardFnError,
    FileNotFoundError,
    OSError,
)  # one line, no traceback

if __name__ == "__main__":
    parallel.run_command(main, parse_args(), prog="train.py", input_errors=INPUT_ERRORS)
