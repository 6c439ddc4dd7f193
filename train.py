"""Train a tool-using policy: cold-start SFT, then GTPO (or GRPO), in one loop read top to bottom.

    python train.py                                        # the demo: tiny Qwen2 on the toy task
    python train.py --model Qwen/Qwen2.5-7B-Instruct --data dapo17k.jsonl --sft_data sft.jsonl
    torchrun --nproc_per_node 8 train.py --model ... --data ... --parallel fsdp

main(): load data and policy -> SFT (sft_steps, skipped when 0) -> held-out evaluation -> RL
steps -> held-out evaluation -> summary.json. One RL step (rl_step):

    1. problems      the next prompts_per_step problems; this rank takes a contiguous slice
    2. rollout       group_size multi-turn trajectories per problem (rollout.py, sandbox.py)
    3. rewards       grading, shaping, the turn reward matrix (rewards.py)
    4. advantages    returns and normalisation over every rank's batch (gtpo.py)
    5. old log-probs under the policy that sampled, at the sampling temperature, no gradient
                     (skipped when the batch gets a single optimizer step: the ratio is then 1)
    6. update        ppo_epochs passes over the mini-batches, an AdamW step each: policy_loss
                     over micro-batches with the mini-batch's global token count, gradients
                     summed over micro-batches and ranks, clipped

Under torchrun each rank owns whole problem groups; the model is wrapped in DDP (or FSDP2's
fully_shard), gradient sync is exact (every loss is divided by the global count of trained
tokens and multiplied by the world size, undoing DDP's mean), metrics are summed over ranks
before rank 0 prints them, and rank 0 writes files. Checkpoints are written to a temporary
directory and renamed; re-running with the same --out_dir resumes from the newest one.

Shapes: N trajectories on this rank, G group size, K max turns, L tokens.
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import data
import gtpo
import model as policies
import rewards
import rollout
import sandbox
from launch import (
    TRACKERS, ConfigError, NoTracker, all_gather_rows, all_reduce, arg, barrier, finish, open_tracker,
    parse_config, run_command, setup_distributed,
)  # fmt: skip


@dataclass
class Config:
    # --- what to train, on what, where
    model: str = arg("demo", "hub id, local Hugging Face directory, or 'demo' (tiny Qwen2 built in code); "
                     "defaults marked 'demo: ...; other models: ...' follow it")
    data: str = arg("toy", "RL problems: .jsonl, .json, .parquet, 'hf:NAME[:CONFIG][:SPLIT]', or 'toy' (built-in task)")
    eval_data: str = arg("auto", "held-out problems, same formats; 'auto': toy's held-out set, none otherwise")
    sft_data: str = arg(None, "SFT trajectories {problem, answer, turns}, same formats, 'toy' (teacher), or 'none'",
                        demo="toy", model="none")
    problem_key: str = arg("auto", "column of the problem text (dotted path into nested rows; a chat message "
                           "list uses its last user message); auto: problem, question, prompt, ...")
    answer_key: str = arg("auto", "column of the gold answer (dotted path, e.g. reward_model.ground_truth); "
                          "'#### N' and \\boxed{} solutions give their final answer; auto: answer, ...")
    out_dir: str = arg(None, "run directory: config, metrics, samples, checkpoints, summary; an existing run "
                       "resumes only with the same settings", demo="runs/demo", model="runs/<model>-<data>")
    seed: int = arg(0, "seed of the model init (demo), data order and sampling")
    # --- the demo model and the toy task
    demo_size: str = arg("128x3", "hidden size x layers of the demo model")
    toy_size: int = arg(3000, "toy training problems (SFT and RL draw from them)")
    toy_mistake_rate: float = arg(0.25, "share of toy teacher trajectories with a mistake fixed next turn")
    eval_size: int = arg(100, "held-out problems evaluated before and after RL (0: no evaluation)")
    eval_samples: int = arg(1, "sampled trajectories per held-out problem (greedy takes one)")
    system_prompt: str = arg("auto", "'auto' (none for toy, model.SYSTEM_PROMPT otherwise), 'none', or text")
    # --- cold-start SFT
    sft_steps: int = arg(None, "SFT optimizer steps before RL (0 skips SFT; always 0 with --sft_data none)", demo=5000,
                         model="one pass over --sft_data, 0 without it")
    sft_batch_size: int = arg(16, "trajectories per SFT step, over all ranks")
    sft_lr: float = arg(None, "SFT peak learning rate (AdamW: 5% warmup, flat, then a cosine tail to 0)",
                        demo=3e-3, model=1e-5)
    sft_decay_start: float = arg(0.7, "fraction of the SFT steps after which the cosine tail starts")
    sft_check_every: int = arg(None, "SFT steps between greedy checks on the validation problems (0: none)",
                               demo=250, model=0)
    sft_stop_at: float = arg(None, "end SFT at the first check whose greedy validation accuracy reaches this "
                             "(0: never)", demo=0.5, model=0.0)
    val_size: int = arg(50, "validation problems of the SFT checks (toy: a third draw; files: the first RL problems)")
    # --- RL: sampling
    max_steps: int = arg(40, "RL steps (0: SFT and evaluation only)")
    prompts_per_step: int = arg(16, "problems per RL step, over all ranks")
    group_size: int = arg(8, "trajectories per problem (G)")
    max_turns: int = arg(4, "model turns per trajectory (K)")
    max_turn_tokens: int = arg(None, "tokens sampled per turn at most", demo=64, model=1024)
    max_total_tokens: int = arg(None, "prompt + turns + tool outputs, per trajectory", demo=320, model=4096)
    temperature: float = arg(1.0, "sampling temperature of RL rollouts (every log-prob of the loss uses it too)")
    top_p: float = arg(1.0, "nucleus sampling of RL rollouts")
    rollout_batch_size: int = arg(0, "trajectories generated at once per rank (0: all); bounds the KV cache, "
                                  "not the result (each trajectory samples from its own seeded stream; up to "
                                  "float rounding, which differs with the batch's padding, notably in bf16)")
    # --- RL: rewards and advantages
    algo: str = arg("gtpo", "gtpo (turn rewards, returns, shaping) or grpo (the preset baseline)")
    gamma: float = arg(0.9, "discount of turn rewards in the returns")
    alpha: float = arg(0.5, "scale of the similarity credit of failed trajectories")
    shaping: str = arg("code", "what shaping compares: code (the paper), text (whole turns), none")
    embedder: str = arg("tokens", "shaping embedder: tokens, policy, or hf:<dir>")
    adv_norm: str = arg("group", "normalisation set of advantages: group, turn, or batch")
    format_penalty: float = arg(rewards.FORMAT_PENALTY, "reward of a turn with a bad tool call")
    first_turn_tool_call: bool = arg(True, "the paper's rule: a first turn without a tool call is a format "
                                     "error (GTPO: the penalty; GRPO: reward 0); false where the tool is "
                                     "optional or with --max_turns 1")
    reward_fn: str = arg("none", "your reward instead of the built-in grader: 'file.py:function' or "
                         "'package.module:function', called as fn(trajectory record, problem row) -> bool "
                         "or a score in [0, 1]; format penalties, shaping and normalisation apply around it")
    # --- RL: the update
    lr: float = arg(None, "RL peak learning rate (AdamW, linear warmup then constant)", demo=3e-4, model=1e-6)
    warmup_steps: int = arg(3, "RL steps of linear learning-rate warmup")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping norm")
    mini_batch_size: int = arg(0, "trajectories per optimizer step, over all ranks (0: the whole batch); "
                               "divides prompts_per_step x group_size, a multiple of the ranks")
    ppo_epochs: int = arg(1, "passes over the mini-batches per RL batch (an optimizer step per mini-batch)")
    micro_batch_size: int = arg(None, "trajectories per forward/backward on a rank (gradient accumulation)",
                                demo=16, model=4)
    loss_denominator: str = arg("sampled", "what token-mean divides by: 'sampled', every sampled token of the "
                                "mini-batch (as TRL and verl); 'signal', only tokens of groups with a "
                                "non-zero advantage (a larger step when many groups have none)")
    clip_low: float = arg(0.2, "PPO clip below 1")
    clip_high: float = arg(0.2, "PPO clip above 1")
    loss_agg: str = arg("token-mean", "token-mean, seq-mean-token-mean, or seq-mean-token-sum-norm")
    kl_coef: float = arg(0.0, "k3 KL to the frozen policy RL started from (0: no reference model)")
    # --- machine
    device: str = arg("auto", "auto (cuda if available), cuda, or cpu")
    parallel: str = arg("ddp", "ddp (a copy per GPU) or fsdp (FSDP2 fully_shard)")
    activation_checkpointing: bool = arg(False, "recompute decoder layers in backward to save memory")
    sandbox_workers: int = arg(8, "sandbox calls run at once per rank")
    sandbox_timeout: float = arg(10.0, "seconds per tool call")
    # --- output
    save_every: int = arg(10, "checkpoint every N RL steps (and at the end)")
    keep_checkpoints: int = arg(2, "RL checkpoints kept besides step_0 (the RL start)")
    sample_every: int = arg(10, "write sample trajectories every N RL steps")
    report_to: str = arg("none", "also log each step's metrics to: none, tensorboard, or wandb (optional packages)")

    def __post_init__(self):
        """Fill the defaults that depend on --model: the demo's tuning (a 0.5M-parameter model
        learning a toy task in minutes: lr 3e-4, 5,000 SFT steps at 3e-3, 64-token turns) would
        damage a real checkpoint and cut real reasoning off. Fields in order, so sft_data is
        known when sft_steps is filled."""
        for f in dataclasses.fields(self):
            if "demo" in f.metadata and getattr(self, f.name) is None:
                setattr(self, f.name, self.default_of(f))

    def default_of(self, f):
        """A field's default for this --model."""
        if f.name == "sft_steps" and self.sft_data in ("", "none"):
            return 0  # no SFT data, no SFT, for the demo too
        if self.model == "demo":
            return f.metadata["demo"]
        if f.name == "out_dir":
            name = lambda spec: re.sub(r"\.(jsonl|json|parquet)$", "", os.path.basename(spec.rstrip("/")))
            return os.path.join("runs", f"{name(self.model)}-{name(self.data.replace(':', '-'))}")
        if f.name == "sft_steps":
            return None  # one pass over the SFT rows: main sets it once they are loaded
        return f.metadata["model"]


def parse_args(argv=None):
    """Config from the command line; a bad flag is one error line and exit code 2."""
    return parse_config(Config, "train.py", __doc__, argv)


def check_config(cfg, world):
    """Derived values, computed and checked in one place."""
    choices = {"algo": ("gtpo", "grpo"), "shaping": ("code", "text", "none"), "adv_norm": gtpo.MODES,
               "loss_agg": gtpo.AGGREGATIONS, "loss_denominator": ("sampled", "signal"), "parallel": ("ddp", "fsdp"), "device": ("auto", "cuda", "cpu")}  # fmt: skip
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"--{name} {getattr(cfg, name)!r}: must be one of {', '.join(allowed)}")
    if cfg.sft_steps and cfg.sft_data in ("", "none"):
        raise ConfigError(f"--sft_steps {cfg.sft_steps}: SFT needs --sft_data (trajectories {{problem, answer, turns}})")
    if cfg.report_to not in TRACKERS:
        raise ConfigError(f"--report_to {cfg.report_to!r}: must be one of {', '.join(TRACKERS)}")
    for name in ("group_size", "max_turns", "max_turn_tokens", "micro_batch_size", "ppo_epochs",
                 "sft_batch_size", "eval_samples", "save_every", "sample_every", "keep_checkpoints"):  # fmt: skip
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} {getattr(cfg, name)}: must be at least 1")
    if cfg.prompts_per_step < 1 or cfg.prompts_per_step % world.size:
        raise ConfigError(
            f"--prompts_per_step {cfg.prompts_per_step}: must be a positive multiple of the {world.size} ranks"
        )
    if cfg.sft_batch_size % world.size:
        raise ConfigError(
            f"--sft_batch_size {cfg.sft_batch_size}: must be a multiple of the {world.size} ranks"
        )
    if not re.fullmatch(r"\d+x\d+", cfg.demo_size):
        raise ConfigError(f"--demo_size {cfg.demo_size!r}: expected HIDDENxLAYERS, e.g. 128x3")
    if not 0 <= cfg.sft_decay_start <= 1:
        raise ConfigError(f"--sft_decay_start {cfg.sft_decay_start}: must be a fraction in [0, 1]")
    if not 0 <= cfg.sft_stop_at <= 1:
        raise ConfigError(f"--sft_stop_at {cfg.sft_stop_at}: must be an accuracy in [0, 1]")
    if cfg.sft_check_every < 0 or cfg.val_size < 0:
        raise ConfigError(f"--sft_check_every {cfg.sft_check_every}, --val_size {cfg.val_size}: must be >= 0")
    if cfg.sft_stop_at and not (cfg.sft_check_every and cfg.val_size):
        raise ConfigError(f"--sft_stop_at {cfg.sft_stop_at}: needs --sft_check_every and --val_size above 0")
    if cfg.temperature <= 0:
        raise ConfigError(f"--temperature {cfg.temperature}: RL samples, so it must be > 0")
    if cfg.rollout_batch_size < 0:
        raise ConfigError(f"--rollout_batch_size {cfg.rollout_batch_size}: must be >= 0 (0: all at once)")
    batch = cfg.prompts_per_step * cfg.group_size
    if cfg.mini_batch_size < 0 or cfg.mini_batch_size and (batch % cfg.mini_batch_size or cfg.mini_batch_size % world.size):
        raise ConfigError(
            f"--mini_batch_size {cfg.mini_batch_size}: must be 0 (the whole batch) or divide the batch of {batch} "
            f"trajectories (prompts_per_step x group_size) and be a multiple of the {world.size} ranks"
        )
    derived = {
        "world_size": world.size,
        "local_prompts": cfg.prompts_per_step // world.size,  # problems (groups) per rank per step
        "local_trajectories": cfg.prompts_per_step // world.size * cfg.group_size,  # N
        "local_sft_batch": cfg.sft_batch_size // world.size,
        "shaped": cfg.algo == "gtpo" and cfg.shaping != "none" and cfg.alpha > 0,
        "system_prompt": system_prompt(cfg),  # resolved; eval.py reads it from config.json
    }
    if cfg.algo == "grpo":  # the preset: one reward per trajectory, group-normalised
        derived["ignored_by_grpo"] = "gamma, alpha, shaping, embedder, adv_norm, format_penalty"
    return derived


# ---------------------------------------------------------------- torch.distributed


class LogProbs(nn.Module):
    """The policy as a module whose forward is model.token_logprobs, so that DDP and FSDP2 wrap
    exactly the pass that is trained (and its gradient sync hooks see it)."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, input_ids, attention_mask, temperature=1.0):
        with compute_dtype(input_ids.device):
            return policies.token_logprobs(self.policy, input_ids, attention_mask, temperature=temperature)  # (B, L)


def compute_dtype(device):
    """bf16 compute on CUDA over fp32 master weights: pure-bf16 weights would round updates of
    lr 1e-6 away (bf16 keeps 8 bits of mantissa). The CPU computes in fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")


def wrap(policy, cfg, world):
    """LogProbs(policy), data parallel under torchrun: DDP, or FSDP2 with each decoder layer
    and the rest (embeddings, final norm, head) as shards."""
    module = LogProbs(policy)
    if world.size == 1:
        return module
    if cfg.parallel == "ddp":
        ids = [world.device.index] if world.device.type == "cuda" else None
        # No buffer sync in forward: the buffers (rotary frequencies) are constants, and a sync in
        # every forward would tie ranks to the same number of forwards.
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    compute = (
        torch.bfloat16 if world.device.type == "cuda" else torch.float32
    )  # gathered params; shards stay fp32
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    for layer in policy.model.layers:
        fully_shard(layer, mp_policy=mp)
    module = fully_shard(module, mp_policy=mp)
    with torch.no_grad():  # FSDP2 initialises at its first root forward; generation needs that done
        ids = torch.zeros(1, 2, dtype=torch.long, device=world.device)
        module(ids, torch.ones_like(ids))
    module.reshard()  # the root stays gathered after a forward: shard it again before AdamW sees it
    return module


def fsdp_modules(wrapped):
    from torch.distributed.fsdp import FSDPModule

    return [m for m in wrapped.modules() if isinstance(m, FSDPModule)]


def trainable_parameters(wrapped):
    """What the optimizer updates: under FSDP2 the shards. (After a forward FSDP2 leaves the root
    gathered, and parameters() would hand out the gathered copies, which get no gradient.)"""
    for m in fsdp_modules(wrapped):
        m.reshard()
    return [p for p in wrapped.parameters() if p.requires_grad]


@contextlib.contextmanager
def full_parameters(wrapped):
    """For generation: FSDP2 gathers every shard once for the whole phase (not once per decode
    step) and frees them after; DDP and single-process models already hold full parameters."""
    sharded = fsdp_modules(wrapped)
    for m in sharded:
        m.unshard()
        m.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()
            m.set_reshard_after_forward(True)


@contextlib.contextmanager
def gradient_sync(wrapped, enabled):
    """Accumulate without communicating on all but the last micro-batch."""
    if enabled or not hasattr(wrapped, "no_sync") and not hasattr(wrapped, "set_requires_gradient_sync"):
        yield
    elif hasattr(wrapped, "no_sync"):  # DDP
        with wrapped.no_sync():
            yield
    else:  # FSDP2
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)


# ---------------------------------------------------------------- data


def load_data(cfg, world):
    """(RL problems, held-out problems, validation problems, SFT rows). The toy task is the same
    for every seed; its validation problems are a third draw, disjoint from the other two. Files
    and hf: sets go through data.load, whose one-line summary rank 0 prints."""
    def load(spec, trajectories=False):
        rows, summary = data.load(spec, problem_key=cfg.problem_key, answer_key=cfg.answer_key,
                                  trajectories=trajectories)  # fmt: skip
        if world.main:
            print(f"data: {summary}")
        return rows

    train = data.toy_problems(cfg.toy_size, seed=0, mistake_rate=cfg.toy_mistake_rate) if cfg.data == "toy" else load(cfg.data)
    held_out = []
    if (cfg.eval_data == "toy" or cfg.eval_data == "auto" and cfg.data == "toy") and cfg.eval_size:
        held_out = data.toy_held_out(cfg.eval_size, cfg.toy_size, cfg.toy_mistake_rate)
    elif cfg.eval_data not in ("auto", "", "none") and cfg.eval_size:
        held_out = load(cfg.eval_data)[: cfg.eval_size]
    sft_rows = []
    if cfg.sft_steps != 0 and cfg.sft_data == "toy":
        toy = train if cfg.data == "toy" else data.toy_problems(cfg.toy_size, seed=0)
        sft_rows = [dict(p, turns=p["teacher"]) for p in toy]
    elif cfg.sft_steps != 0:
        sft_rows = load(cfg.sft_data, trajectories=True)
    validation = []
    if cfg.sft_steps != 0 and cfg.sft_check_every and cfg.val_size:
        if cfg.data == "toy":
            validation = data.toy_held_out(cfg.val_size, cfg.toy_size, cfg.toy_mistake_rate, seed=2, exclude=held_out)
        else:
            validation = train[: cfg.val_size]
    return train, held_out, validation, sft_rows


def system_prompt(cfg):
    if cfg.system_prompt == "auto":
        return None if cfg.data == "toy" else policies.SYSTEM_PROMPT
    return None if cfg.system_prompt == "none" else cfg.system_prompt


def problems_at(problems, position, count, seed):
    """The problems at global positions [position, position + count) of an endless stream that
    visits the set in a fresh seeded order each epoch (so resuming needs only the position)."""
    out, orders = [], {}
    for p in range(position, position + count):
        epoch, k = divmod(p, len(problems))
        if epoch not in orders:
            orders[epoch] = torch.randperm(
                len(problems), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)
            )
        out.append(problems[int(orders[epoch][k])])
    return out


# ---------------------------------------------------------------- SFT


def teacher_trajectories(rows, tokenizer, cfg):
    """The SFT rows as trajectories: the turns' code run in a sandbox (reset between rows), so the
    tool outputs are real and masked exactly as in RL rollouts."""
    trajs = []
    with sandbox.Session(timeout=cfg.sandbox_timeout) as session:
        for row in rows:
            session.reset()
            prompt = policies.chat_prompt_ids(tokenizer, row["problem"], system_prompt(cfg))
            trajs.append(rollout.teacher_trajectory(tokenizer, prompt, row["turns"], session))
    return trajs


def sft_batches(lengths, batch_size, steps, seed, pool=8):
    """`steps` batches of indices drawn at random, grouped by length: each run of `pool` batches
    is drawn together, sorted by length and cut, then shuffled, so batches carry little padding."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    while len(batches) < steps:
        picks = torch.randint(len(lengths), (batch_size * pool,), generator=g).tolist()
        picks.sort(key=lambda k: lengths[k])
        group = [picks[s : s + batch_size] for s in range(0, len(picks), batch_size)]
        batches += [group[k] for k in torch.randperm(pool, generator=g).tolist()]
    return batches[:steps]


def run_sft(wrapped, tokenizer, trajs, cfg, derived, world, check=None):
    """Cold-start SFT: mean NLL of the assistant's tokens (loss_mask), tool outputs masked. Every
    sft_check_every steps, check(step) (the same on every rank) may end it early: the steps done."""
    params = trainable_parameters(wrapped)
    optimizer = torch.optim.AdamW(params, lr=cfg.sft_lr, weight_decay=cfg.weight_decay)
    # Warmup, a long plateau, then a cosine tail: a tiny model learns to copy digits (from the
    # problem into code, from tool output into the answer) in a sudden transition that needs
    # many steps at a high learning rate.
    warmup, plateau = max(1, cfg.sft_steps // 20), int(cfg.sft_decay_start * cfg.sft_steps)
    tail = max(1, cfg.sft_steps - plateau)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * (1.0 if s < plateau else 0.5 * (1 + math.cos(math.pi * (s - plateau) / tail)))
        ),
    )
    batches = sft_batches([len(t.input_ids) for t in trajs], cfg.sft_batch_size, cfg.sft_steps, cfg.seed)
    bar = tqdm(batches, desc="sft", disable=not world.main, dynamic_ncols=True)
    for step, picks in enumerate(bar, start=1):
        local = [
            trajs[k] for k in picks[world.rank * derived["local_sft_batch"] :][: derived["local_sft_batch"]]
        ]
        batch = {k: v.to(world.device) for k, v in rollout.collate(local, tokenizer.pad_token_id).items()}
        global_tokens = all_reduce([float(batch["loss_mask"].sum())], world)[0]
        logp = wrapped(batch["input_ids"], batch["attention_mask"])  # (N, L)
        loss = -(logp * batch["loss_mask"]).sum() / global_tokens
        (loss * world.size).backward()  # DDP averages gradients over ranks; this makes it a sum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        nll = all_reduce([float(loss.detach())], world)[0]
        bar.set_postfix(nll=f"{nll:.3f}", gnorm=f"{float(grad_norm):.2f}")
        if check and step % cfg.sft_check_every == 0 and check(step):  # check exists only when sft_check_every > 0
            break
    bar.close()
    return step


def sft_check(step, accuracy, cfg, world):
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


# ---------------------------------------------------------------- one RL step


def score(trajs, rows, group_index, cfg, derived, grader, embedder, world, reward_fn=None):
    """Rewards and advantages of this rank's trajectories (rows: each one's problem row, graded by
    the built-in grader against its answer or by reward_fn): a dict of (N,) correct, outcomes,
    infra, format_errors, trained, counted and (N, K) turn_rewards, returns, turn_advantages.
    Normalisation sees every rank's rows (so adv_norm="batch" is exact too). trained is False
    for rows of groups whose advantages are all zero and rows with a sandbox failure; counted
    (the rows whose tokens the loss divides by) is every row but sandbox failures, or the
    trained rows with --loss_denominator signal."""
    N, K = len(trajs), cfg.max_turns
    scores = rewards.outcome_scores(trajs, rows, grader, reward_fn)  # (N,) in [0, 1]
    correct = scores >= 1  # (N,)
    infra = torch.tensor(
        [any(t.result is not None and t.result.infra_error for t in tr.turns) for tr in trajs]
    )
    outcomes = scores  # (N,)
    if derived["shaped"]:
        texts = [
            rewards.trajectory_code(t) if cfg.shaping == "code" else "".join(u.text for u in t.turns)
            for t in trajs
        ]
        shaped = rewards.shape_outcomes(correct, embedder(texts), group_index, cfg.alpha)
        outcomes = torch.maximum(scores, shaped)  # a partial score from reward_fn is kept if higher
    turn_rewards, turn_mask = rewards.turn_reward_matrix(
        trajs, outcomes, K, cfg.format_penalty, first_call=cfg.first_turn_tool_call
    )  # (N, K)
    if cfg.algo == "gtpo":
        returns = gtpo.discounted_returns(turn_rewards, turn_mask, cfg.gamma)  # (N, K)
        take_part = turn_mask & ~infra[:, None]  # sandbox failures stay out of the statistics
        everyone = [all_gather_rows(t, world) for t in (returns, take_part, group_index)]
        turn_advantages = gtpo.normalize(*everyone, mode=cfg.adv_norm)[world.rank * N : (world.rank + 1) * N]
    else:
        trajectory_reward = rewards.grpo_rewards(trajs, scores, first_call=cfg.first_turn_tool_call)  # (N,)
        returns = trajectory_reward[:, None] * turn_mask  # (N, K) one reward, on every turn (for display)
        everyone = [all_gather_rows(t, world) for t in (trajectory_reward, ~infra, group_index)]
        advantage = gtpo.grpo_advantages(everyone[0], everyone[2], mask=everyone[1])[
            world.rank * N : (world.rank + 1) * N
        ]
        turn_advantages = advantage[:, None] * turn_mask  # (N, K)
    format_errors = torch.tensor(
        [any(rewards.turn_format_penalties(t.turns, first_call=cfg.first_turn_tool_call)) for t in trajs]
    )
    signal = (turn_advantages != 0).any(dim=1)  # (N,)
    live_group = torch.zeros(int(group_index.max()) + 1, dtype=torch.bool).index_put_(
        (group_index,), signal, accumulate=True
    )
    trained = live_group[group_index] & ~infra  # (N,) rows with a policy-gradient signal
    counted = trained if cfg.loss_denominator == "signal" else ~infra  # (N,) rows in the denominator
    total_reward = turn_rewards.sum(dim=1) if cfg.algo == "gtpo" else trajectory_reward  # (N,)
    return {
        "trained": trained, "counted": counted, "total_reward": total_reward, "scores": scores,
        "correct": correct, "outcomes": outcomes, "infra": infra, "format_errors": format_errors,
        "turn_rewards": turn_rewards, "returns": returns, "turn_advantages": turn_advantages,
    }  # fmt: skip


def micro_batches(batch, *, size, trim, count):
    """`count` row slices of a right-padded batch, each cut to its own longest row when trim (rows
    are sorted by length, so little padding is computed). Every rank runs the same count (FSDP2
    gathers parameters in each forward): past the last row come copies of the shortest row that
    train nothing."""
    for k in range(count):
        s = k * size
        if s < len(batch["input_ids"]):
            width = int(batch["attention_mask"][s : s + size].sum(1).max()) if trim else None
            yield s, {key: v[s : s + size, :width] for key, v in batch.items()}
        else:
            width = int(batch["attention_mask"][-1].sum()) if trim else None
            micro = {key: v[-1:, :width].clone() for key, v in batch.items()}
            micro["loss_mask"][:] = False
            yield None, micro


def old_logprobs(wrapped, batch, *, size, trim, count, temperature):
    """log-probs of the sampled tokens under the current policy at the sampling temperature, no
    gradient: (n, L), 0 beyond each micro-batch's width."""
    out = torch.zeros(batch["input_ids"].shape, device=batch["input_ids"].device)
    with torch.no_grad():
        for s, micro in micro_batches(batch, size=size, trim=trim, count=count):
            logp = wrapped(micro["input_ids"], micro["attention_mask"], temperature=temperature)
            if s is not None:
                out[s : s + size, : logp.shape[1]] = logp
    return out


@dataclass
class MiniBatch:
    """The rows of one optimizer step on this rank, and the global counts its loss divides by."""

    batch: dict  # collated forwarded rows, longest first, with their (n, L) token advantages
    num_tokens: float  # the denominator: sampled tokens of its counted rows, over all ranks
    num_seqs: float  # counted rows with a sampled token, over all ranks
    forwarded_tokens: float  # sampled tokens of its forwarded rows, over all ranks (0: nothing to do)
    micro_batches: int  # the same on every rank


def plan_minibatches(trajs, *, turn_advantages, forwarded, counted, cfg, world, pad):
    """This rank's rows in the step's mini-batches: row i goes to mini-batch i mod M (M = the global
    batch / mini_batch_size). A rank holds a multiple of M rows, so global row r * N + i lands in
    the same mini-batch as local row i: the mini-batches are the same sets of trajectories
    whatever the number of ranks, and a group's G rows spread over min(G, M) of them. Forwarded
    rows get forward passes; counted rows (forwarded or not) make up the denominator."""
    N = len(trajs)
    M = N * world.size // cfg.mini_batch_size if cfg.mini_batch_size else 1
    assert N % M == 0, f"{N} rows per rank do not split into {M} mini-batches"
    sampled = [sum(t.loss_mask) for t in trajs]
    members = [range(k, N, M) for k in range(M)]
    rows = [sorted((i for i in m if forwarded[i]), key=lambda i: -len(trajs[i].input_ids)) for m in members]
    local_counts = []  # per mini-batch: denominator tokens, denominator rows, forwarded tokens
    for m, r in zip(members, rows):
        local_counts += [sum(sampled[i] for i in m if counted[i]), sum(1 for i in m if counted[i] and sampled[i]),
                         sum(sampled[i] for i in r)]  # fmt: skip
    counts = all_reduce(local_counts, world)
    micro_counts = all_reduce([math.ceil(len(r) / cfg.micro_batch_size) for r in rows], world, dist.ReduceOp.MAX)
    shortest = min(range(N), key=lambda i: len(trajs[i].input_ids))
    plan = []
    for k, r in enumerate(rows):
        batch = {key: v.to(world.device) for key, v in rollout.collate([trajs[i] for i in r or [shortest]], pad).items()}
        advantages = turn_advantages[r] if r else torch.zeros_like(turn_advantages[:1])  # (n, K)
        batch["advantages"] = gtpo.token_advantages(advantages.to(world.device), batch["token_turn"])  # (n, L)
        if not r:  # a stand-in row that keeps this rank in the collectives and trains nothing
            batch["loss_mask"][:] = False
        num_tokens, num_seqs, forwarded_tokens = counts[3 * k : 3 * k + 3]
        plan.append(MiniBatch(batch=batch, num_tokens=num_tokens, num_seqs=num_seqs,
                              forwarded_tokens=forwarded_tokens, micro_batches=int(micro_counts[k])))  # fmt: skip
    return plan


def needs_old_logprobs(cfg, num_minibatches):
    """Whether a separate no-gradient pass must score the sampled tokens. With exactly one
    optimizer step per batch the policy trained is the one that sampled: the ratio is 1 by
    construction and the trained pass's own log-probs, detached, are the old ones."""
    return num_minibatches * cfg.ppo_epochs > 1


def update(wrapped, optimizer, trajs, *, turn_advantages, trained, counted, cfg, world, pad, ref=None,
           always_old_logprobs=False):  # fmt: skip
    """ppo_epochs passes over the mini-batches of this rank's trajectories, one optimizer step per
    mini-batch (with every rank's gradients).

    trained (N,): rows with a policy-gradient signal (groups whose advantages are all zero have a
    surrogate of exactly 0 and get no forward pass, unless kl_coef > 0, whose KL term every
    counted row has); counted (N,): rows whose sampled tokens make up each mini-batch's
    denominator (by default every row but sandbox failures, as TRL and verl count).
    Old log-probs are computed once, before the first optimizer step (skipped when there is only
    one, see needs_old_logprobs). A mini-batch with no forwarded token on any rank takes no step.
    Returns (stat sums: means over the optimizer steps taken, seconds spent on old and reference
    log-probs); a non-finite gradient norm skips the optimizer step with a warning, on every
    rank alike.
    """
    forwarded = counted if cfg.kl_coef > 0 else trained
    plan = plan_minibatches(trajs, turn_advantages=turn_advantages, forwarded=forwarded, counted=counted, cfg=cfg,
                            world=world, pad=pad)  # fmt: skip
    plan = [mb for mb in plan if mb.forwarded_tokens > 0]
    # Cutting padding changes nothing but "seq-mean-token-sum-norm", which divides by the width.
    size, trim = cfg.micro_batch_size, cfg.loss_agg != "seq-mean-token-sum-norm"
    t0 = time.perf_counter()
    for mb in plan:
        if always_old_logprobs or needs_old_logprobs(cfg, len(plan)):
            mb.batch["old_logp"] = old_logprobs(wrapped, mb.batch, size=size, trim=trim, count=mb.micro_batches,
                                                temperature=cfg.temperature)  # (n, L) fmt: skip
        if ref is not None:
            mb.batch["ref_logp"] = old_logprobs(ref, mb.batch, size=size, trim=trim, count=mb.micro_batches,
                                                temperature=cfg.temperature)  # fmt: skip
    t_old = time.perf_counter() - t0
    steps = cfg.ppo_epochs * len(plan)
    sums = {"loss": 0.0, "clip_frac": 0.0, "approx_kl": 0.0, "ratio": 0.0, "kl_ref": 0.0, "grad_norm": 0.0,
            "skipped": 0.0, "optimizer_steps": steps}  # fmt: skip
    params = [p for group in optimizer.param_groups for p in group["params"]]  # see trainable_parameters
    for _ in range(cfg.ppo_epochs):
        for mb in plan:
            for k, (_, micro) in enumerate(micro_batches(mb.batch, size=size, trim=trim, count=mb.micro_batches)):
                with gradient_sync(wrapped, enabled=k == mb.micro_batches - 1):
                    logp = wrapped(micro["input_ids"], micro["attention_mask"], temperature=cfg.temperature)  # (m, L)
                    loss, stats = gtpo.policy_loss(
                        logp, micro.get("old_logp", logp.detach()), micro["advantages"], micro["loss_mask"],
                        clip_low=cfg.clip_low, clip_high=cfg.clip_high, agg=cfg.loss_agg,
                        num_tokens=mb.num_tokens, num_seqs=mb.num_seqs,
                        ref_logp=micro.get("ref_logp"), kl_coef=cfg.kl_coef,
                    )  # fmt: skip
                    (loss * world.size).backward()  # DDP/FSDP average over ranks; this makes it a sum
                weight = float(micro["loss_mask"].sum()) / mb.forwarded_tokens / steps  # token share, per step
                sums["loss"] += float(loss.detach()) * world.size / steps
                for key, stat in (("clip_frac", "clip_frac"), ("approx_kl", "approx_kl"), ("ratio", "ratio_mean"),
                                  ("kl_ref", "kl_ref")):  # fmt: skip
                    sums[key] += float(stats.get(stat, 0.0)) * weight
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            if math.isfinite(grad_norm):  # identical on every rank: the gradients are synced
                optimizer.step()
            else:
                sums["skipped"] += 1
                if world.main:
                    tqdm.write(f"warning: non-finite gradient norm ({grad_norm}); optimizer step skipped")
            optimizer.zero_grad(set_to_none=True)
            sums["grad_norm"] += grad_norm / steps
    return sums, t_old


def rollout_seeds(seed, step, first, count):
    """The sampling seeds of the trajectories at global positions [first, first + count) of the
    data stream in RL step `step`: a trajectory's tokens depend on (seed, step, position), not on
    the rank or the generation batch it lands in."""
    def digest(i):
        return hashlib.blake2b(f"{seed}/{step}/{i}".encode(), digest_size=8).digest()

    return [int.from_bytes(digest(i), "little") >> 1 for i in range(first, first + count)]


def rl_step(step, state, cfg, derived, world):
    """One RL step on this rank's share of the problems; returns (metric sums, the step's record)."""
    policy, tokenizer, wrapped = state["policy"], state["tokenizer"], state["wrapped"]
    n_local, G = derived["local_prompts"], cfg.group_size
    position = state["data_position"] + world.rank * n_local
    problems = problems_at(state["problems"], position, n_local, cfg.seed)
    state["data_position"] += cfg.prompts_per_step
    prompts = [policies.chat_prompt_ids(tokenizer, p["problem"], system_prompt(cfg)) for p in problems]
    group_index = torch.arange(n_local).repeat_interleave(G) + world.rank * n_local  # (N,) global ids

    t0 = time.perf_counter()
    rollout_cfg = rollout.RolloutConfig(
        max_turns=cfg.max_turns, max_turn_tokens=cfg.max_turn_tokens, max_total_tokens=cfg.max_total_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.rollout_batch_size,
    )  # fmt: skip
    seeds = rollout_seeds(cfg.seed, step, first=position * G, count=n_local * G)
    with torch.no_grad(), full_parameters(wrapped), compute_dtype(world.device):
        policy.eval()
        trajs = rollout.rollout(
            policy, tokenizer, [p for p in prompts for _ in range(G)], state["pool"], rollout_cfg, seeds=seeds
        )
    state["pool"].prewarm(len(trajs))  # the next step's sandboxes start while this one trains
    t1 = time.perf_counter()
    if hasattr(state["embedder"], "new_step"):
        state["embedder"].new_step()
    rows = [p for p in problems for _ in range(G)]
    scored = score(trajs, rows, group_index, cfg, derived, state["grader"], state["embedder"], world,
                   reward_fn=state["reward_fn"])  # fmt: skip
    t2 = time.perf_counter()
    policy.train()
    sums, t_old = update(wrapped, state["optimizer"], trajs, turn_advantages=scored["turn_advantages"],
                         trained=scored["trained"], counted=scored["counted"], cfg=cfg, world=world,
                         pad=tokenizer.pad_token_id, ref=state.get("ref"))  # fmt: skip
    with warnings.catch_warnings():  # the schedule counts RL steps, also those without an optimizer step
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        state["scheduler"].step()
    t3 = time.perf_counter()
    adv_zero = (scored["turn_advantages"] == 0).all(dim=1).view(n_local, G).all(dim=1)  # (groups,)
    calls = [t for tr in trajs for t in tr.turns if t.result is not None]  # tool calls that ran
    metric_sums = {
        "trajectories": len(trajs), "groups": n_local,
        "reward": float(scored["total_reward"].sum()), "correct": float(scored["correct"].sum()),
        "turns": sum(len(t.turns) for t in trajs), "tool_calls": len(calls),
        "tool_errors": sum(1 for t in calls if not t.result.ok),
        "format_errors": float(scored["format_errors"].sum()), "infra_errors": float(scored["infra"].sum()),
        "failed": float((~scored["correct"]).sum()),
        "shaped": float(((~scored["correct"]) & (scored["outcomes"] > scored["scores"])).sum()),
        "length": sum(sum(t.loss_mask) for t in trajs), "zero_adv_groups": float(adv_zero.sum()),
        "truncated": sum(t.stop_reason == "max_length" for t in trajs),
        **sums, "t_rollout": t1 - t0, "t_reward": t2 - t1, "t_old_logp": t_old, "t_update": t3 - t2 - t_old,
    }  # fmt: skip
    return metric_sums, (problems, trajs, scored)


METRIC_FIELDS = ("reward", "accuracy", "turns", "tool_errors", "format_errors", "shaped", "length",
                 "loss", "clip_frac", "kl", "grad_norm", "lr")  # fmt: skip


def reduce_metrics(step, metric_sums, lr, world):
    """Sums over ranks -> the step's record (means over trajectories, calls, failures)."""
    keys = sorted(metric_sums)
    total = dict(zip(keys, all_reduce([float(metric_sums[k]) for k in keys], world)))
    n, ranks = total["trajectories"], world.size
    return {
        "step": step,
        "reward": total["reward"] / n, "accuracy": total["correct"] / n, "turns": total["turns"] / n,
        "tool_calls": total["tool_calls"] / n, "tool_errors": total["tool_errors"] / max(total["tool_calls"], 1),
        "format_errors": total["format_errors"] / n, "infra_errors": total["infra_errors"],
        "shaped": total["shaped"] / max(total["failed"], 1), "length": total["length"] / n,
        "zero_adv_groups": total["zero_adv_groups"] / total["groups"], "truncated": total["truncated"] / n,
        "loss": total["loss"] / ranks, "clip_frac": total["clip_frac"], "approx_kl": total["approx_kl"],
        "ratio": total["ratio"], "optimizer_steps": total["optimizer_steps"] / ranks,
        "kl": total["kl_ref"], "grad_norm": total["grad_norm"] / ranks, "skipped": total["skipped"] / ranks, "lr": lr,
        **{k: total[k] / ranks for k in ("t_rollout", "t_reward", "t_old_logp", "t_update")},
    }  # fmt: skip


def log_line(record):
    """One line per step, fixed fields."""
    return (
        f"step {record['step']:4d} | reward {record['reward']:+.3f} | acc {record['accuracy']:.3f} | "
        f"turns {record['turns']:.2f} | trunc {record['truncated']:.2f} | tool_err {record['tool_errors']:.3f} | fmt_err {record['format_errors']:.3f} | "
        f"shaped {record['shaped']:.2f} | len {record['length']:.0f} | loss {record['loss']:+.4f} | "
        f"clip {record['clip_frac']:.3f} | kl {record['kl']:.4f} | gnorm {record['grad_norm']:.3f} | "
        f"lr {record['lr']:.2e} | time roll {record['t_rollout']:.1f}s rew {record['t_reward']:.1f}s "
        f"upd {record['t_old_logp'] + record['t_update']:.1f}s"
    )


def log_step(record, state, cfg):
    """The step's log line, its metrics.jsonl record and tracker log; once per run, a warning
    when more than half of the step's trajectories stopped at a token limit."""
    tqdm.write(log_line(record))
    with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    state["tracker"].log(record, record["step"])
    if record["truncated"] > 0.5 and not state.get("warned_truncated"):
        state["warned_truncated"] = True
        tqdm.write(f"warning: {record['truncated']:.0%} of step {record['step']}'s trajectories stopped at a token "
                   f"limit (--max_turn_tokens {cfg.max_turn_tokens}, --max_total_tokens {cfg.max_total_tokens}) "
                   "before they could answer; consider raising the limits")  # fmt: skip


def write_samples(path, trajs, problems, scored, group_size, count=2):
    """The first `count` problems' groups as JSON (view with `python eval.py --show PATH`): every
    turn's text, code and tool output, its trained and masked token counts, r, R and A. A
    record's key is the problem's id, its index its position in the file."""
    records = []
    for k, p in enumerate(problems[:count]):
        samples = []
        for i in range(k * group_size, (k + 1) * group_size):
            values = (scored[name][i] for name in ("turn_rewards", "returns", "turn_advantages"))
            record = rollout.trajectory_record(trajs[i], *values)
            answer = rewards.extract_answer(trajs[i].final_text)
            samples.append({**record, "answer": answer, "correct": bool(scored["correct"][i])})
        key = str(p["id"]) if p.get("id") is not None else str(k)
        records.append({"key": key, "index": k, "problem": p["problem"], "answer": p["answer"],
                        "num_correct": sum(s["correct"] for s in samples), "samples": samples})  # fmt: skip
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"kind": "samples", "problems": records}, f, indent=1)


# ---------------------------------------------------------------- evaluation


def evaluate(policy, wrapped, tokenizer, problems, cfg, pool, grader, world, temperature, reward_fn=None):
    """Held-out accuracy: the mean over eval_samples trajectories per problem (one when greedy,
    temperature 0), problems sharded over ranks. The sampling RNG is saved and restored, so
    evaluating does not change training."""
    if not problems:
        return None
    samples = cfg.eval_samples if temperature > 0 else 1
    mine = [p for p in problems[world.rank :: world.size] for _ in range(samples)]
    rng = torch.get_rng_state()
    torch.manual_seed(cfg.seed + 7919 * (world.rank + 1))
    run_cfg = rollout.RolloutConfig(
        max_turns=cfg.max_turns, max_turn_tokens=cfg.max_turn_tokens, max_total_tokens=cfg.max_total_tokens,
        temperature=temperature, top_p=cfg.top_p,
    )  # fmt: skip
    correct = 0.0
    with torch.no_grad(), full_parameters(wrapped), compute_dtype(world.device):
        policy.eval()
        for s in range(0, len(mine), 64):
            chunk = mine[s : s + 64]
            prompts = [policies.chat_prompt_ids(tokenizer, p["problem"], system_prompt(cfg)) for p in chunk]
            trajs = rollout.rollout(policy, tokenizer, prompts, pool, run_cfg)
            correct += float((rewards.outcome_scores(trajs, chunk, grader, reward_fn) >= 1).sum())
    torch.set_rng_state(rng)
    total, n = all_reduce([correct, float(len(mine))], world)
    return total / n


# ---------------------------------------------------------------- checkpoints


def checkpoint_steps(out_dir):
    """RL steps that have a complete checkpoint (a directory is complete once renamed)."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for d in os.listdir(root) if (m := re.fullmatch(r"step_(\d+)", d)))


def rng_states():
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(step, state, cfg, world):
    """checkpoints/step_N: the policy in Hugging Face format, trainer.pt (optimizer, scheduler,
    step, data position, evaluation so far) and rng_rank{r}.pt per rank. Written to step_N.tmp,
    then renamed, so a crash mid-save leaves the previous checkpoints intact."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    root = os.path.join(cfg.out_dir, "checkpoints")
    final, tmp = os.path.join(root, f"step_{step}"), os.path.join(root, f"step_{step}.tmp")
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(state["wrapped"], options=full)  # every rank takes part (FSDP2)
    optim = None  # a fresh optimizer has nothing to save (and torch's fake step for it crashes on
    if state["optimizer"].state:  # FSDP2's CPU DTensors)
        optim = get_optimizer_state_dict(state["wrapped"], state["optimizer"], options=full)
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        weights = {k.removeprefix("policy."): v for k, v in weights.items()}
        state["policy"].save_pretrained(tmp, state_dict=weights)
        state["tokenizer"].save_pretrained(tmp)
        trainer = {"step": step, "data_position": state["data_position"], "optimizer": optim,
                   "scheduler": state["scheduler"].state_dict(),
                   "evaluation": state["evaluation"]}  # fmt: skip
        torch.save(trainer, os.path.join(tmp, "trainer.pt"))
    barrier(world)
    torch.save(rng_states(), os.path.join(tmp, f"rng_rank{world.rank}.pt"))
    barrier(world)
    if world.main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_steps(cfg.out_dir)[1 : -cfg.keep_checkpoints]:  # step_0 is kept: the RL start
            shutil.rmtree(os.path.join(root, f"step_{old}"), ignore_errors=True)
    barrier(world)


def load_checkpoint(step, state, cfg, world):
    """Restore what save_checkpoint wrote, including this rank's RNG states."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = os.path.join(cfg.out_dir, "checkpoints", f"step_{step}")
    weights = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(path, name)))
    if getattr(state["policy"].config, "tie_word_embeddings", False):
        weights.setdefault("lm_head.weight", weights.get("model.embed_tokens.weight"))
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(state["wrapped"], {f"policy.{k}": v for k, v in weights.items()}, options=full)
    trainer = torch.load(os.path.join(path, "trainer.pt"), weights_only=False)
    if trainer["optimizer"] is not None:
        set_optimizer_state_dict(state["wrapped"], state["optimizer"], trainer["optimizer"], options=full)
    state["scheduler"].load_state_dict(trainer["scheduler"])
    state["data_position"], state["evaluation"] = trainer["data_position"], trainer["evaluation"]
    rng_file = os.path.join(path, f"rng_rank{world.rank}.pt")
    if os.path.exists(rng_file):  # absent when resuming on more ranks than saved
        set_rng_states(torch.load(rng_file, weights_only=False))


def check_in_sync(wrapped, world):
    """Whether every rank holds the same parameters (compared by per-tensor sums and sums of
    squares in float64); None under FSDP2, where each rank holds its own shard by design."""
    if fsdp_modules(wrapped):
        return None
    if world.size == 1:
        return True
    sums = torch.stack(
        [torch.stack([p.double().sum(), p.double().square().sum()]) for p in wrapped.parameters()]
    )
    everyone = all_gather_rows(sums[None].to(world.device), world)  # (ranks, P, 2)
    return bool((everyone == everyone[0]).all())


# ---------------------------------------------------------------- main


# Settings that may change when a run resumes: they change neither its samples nor its updates
# (micro- and rollout batch sizes only up to float rounding). Any other difference is refused.
RESUMABLE = ("out_dir", "max_steps", "save_every", "keep_checkpoints", "sample_every", "sandbox_workers",
             "micro_batch_size", "rollout_batch_size", "activation_checkpointing", "device", "report_to")  # fmt: skip


def check_resume(cfg):
    """Refuse to resume a run made with other settings: one error listing every difference."""
    path = os.path.join(cfg.out_dir, "config.json")
    if not checkpoint_steps(cfg.out_dir) or not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            saved = json.load(f)["config"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ConfigError(f"{path}: not a train.py config.json ({e}); give another --out_dir or delete it") from None
    now = dataclasses.asdict(cfg)
    # A key an older train.py did not write is taken to match: its run had that flag's default.
    differ = [f"--{k} {saved.get(k)!r} there, {now[k]!r} here" for k in now
              if k not in RESUMABLE and saved.get(k, now[k]) != now[k]]  # fmt: skip
    if differ:
        raise ConfigError(f"{cfg.out_dir} holds a run with other settings ({'; '.join(differ)}): "
                          "give another --out_dir, the same flags, or delete it")  # fmt: skip


def main(cfg):
    world = setup_distributed(cfg.device)
    check_config(cfg, world)  # bad flags fail before any data is read; again below once sft_steps is known
    reward_fn = rewards.load_reward_fn(cfg.reward_fn)
    started = time.time()
    problems, held_out, validation, sft_rows = load_data(cfg, world)
    if cfg.sft_steps is None:  # a real model's default: one pass over the SFT rows
        cfg = dataclasses.replace(cfg, sft_steps=math.ceil(len(sft_rows) / cfg.sft_batch_size))
    derived = check_config(cfg, world)
    check_resume(cfg)
    barrier(world)  # every rank has read the old config.json before rank 0 replaces it
    torch.manual_seed(cfg.seed + world.rank)  # distinct sampling per rank
    random.seed(cfg.seed + world.rank)
    np.random.seed(cfg.seed + world.rank)
    tracker = NoTracker()
    if world.main:
        os.makedirs(os.path.join(cfg.out_dir, "samples"), exist_ok=True)
        saved = json.dumps({"config": dataclasses.asdict(cfg), "derived": derived}, indent=1)
        print(saved)
        with open(os.path.join(cfg.out_dir, "config.json.tmp"), "w") as f:
            f.write(saved)
        os.replace(os.path.join(cfg.out_dir, "config.json.tmp"), os.path.join(cfg.out_dir, "config.json"))
        resumes_at = (checkpoint_steps(cfg.out_dir) or [0])[-1]  # a missing package fails here, before any work
        tracker = open_tracker(cfg.report_to, cfg.out_dir, dataclasses.asdict(cfg), start_step=resumes_at)

    hidden, layers = map(int, cfg.demo_size.split("x"))
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    policy, tokenizer = policies.load_policy(
        cfg.model,
        world.device,
        torch.float32,
        cfg.activation_checkpointing,
        demo_size=(hidden, layers),
        seed=cfg.seed,
    )  # fp32 master weights
    torch.manual_seed(cfg.seed + world.rank)
    wrapped = wrap(policy, cfg, world)
    pool = sandbox.Pool(cfg.sandbox_workers, timeout=cfg.sandbox_timeout)
    grader = rewards.Grader()
    state = {"policy": policy, "tokenizer": tokenizer, "wrapped": wrapped, "problems": problems, "pool": pool,
             "grader": grader, "reward_fn": reward_fn, "tracker": tracker, "data_position": 0, "evaluation": {},
             "optimizer": None, "scheduler": None}  # fmt: skip
    try:
        run(state, cfg, derived, world, held_out, validation, sft_rows, started)
    finally:
        pool.close()
        grader.close()
        tracker.close()
    finish(world)  # not on an error: the other ranks may be waiting in a collective (see run_command)


def run(state, cfg, derived, world, held_out, validation, sft_rows, started):
    """SFT and the evaluation before RL (once per out_dir: step_0 records them), then RL."""
    policy, tokenizer, wrapped = state["policy"], state["tokenizer"], state["wrapped"]
    done = checkpoint_steps(cfg.out_dir)
    evaluate_now = lambda temperature: evaluate(policy, wrapped, tokenizer, held_out, cfg, state["pool"],
                                                state["grader"], world, temperature, state["reward_fn"])  # fmt: skip
    if not done:
        if cfg.sft_steps:
            trajs = teacher_trajectories(sft_rows, tokenizer, cfg)

            def check(step):
                accuracy = evaluate(policy, wrapped, tokenizer, validation, cfg, state["pool"], state["grader"],
                                    world, 0.0, state["reward_fn"])  # fmt: skip
                policy.train()
                return sft_check(step, accuracy, cfg, world)

            policy.train()
            state["evaluation"]["sft_steps_done"] = run_sft(
                wrapped, tokenizer, trajs, cfg, derived, world, check if validation else None
            )
        state["evaluation"] |= {
            "before_rl_sampled": evaluate_now(cfg.temperature),
            "before_rl_greedy": evaluate_now(0.0),
        }
        if world.main:
            print(f"held-out accuracy before RL: {state['evaluation']}")
    state["optimizer"] = torch.optim.AdamW(
        trainable_parameters(wrapped), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    state["scheduler"] = torch.optim.lr_scheduler.LambdaLR(
        state["optimizer"], lambda s: min(1.0, (s + 1) / cfg.warmup_steps)
    )
    if not done:
        save_checkpoint(0, state, cfg, world)  # the RL start: never pruned, the KL reference
        done = [0]
    start = done[-1]
    load_checkpoint(start, state, cfg, world)
    if cfg.kl_coef > 0:
        reference = policies.load_policy(os.path.join(cfg.out_dir, "checkpoints", "step_0"), world.device)[0]
        state["ref"] = LogProbs(reference.eval().requires_grad_(False))  # bf16 on CUDA: it is never updated
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if world.main:  # steps after the checkpoint are redone: drop their records
        records = []
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                records = [json.loads(line) for line in f]
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records if r["step"] <= start)
        if start:
            print(f"resumed from {cfg.out_dir}/checkpoints/step_{start}")
    state["pool"].prewarm(derived["local_trajectories"])
    state["embedder"] = rewards.make_embedder(cfg.embedder, tokenizer, policy) if derived["shaped"] else None
    bar = tqdm(range(start + 1, cfg.max_steps + 1), desc="rl", disable=not world.main, dynamic_ncols=True,
               initial=start, total=cfg.max_steps)  # fmt: skip
    for step in bar:
        lr = state["scheduler"].get_last_lr()[0]
        metric_sums, (problems, trajs, scored) = rl_step(step, state, cfg, derived, world)
        record = reduce_metrics(step, metric_sums, lr, world)
        if world.main:
            log_step(record, state, cfg)
            if step % cfg.sample_every == 0 or step == 1:
                path = os.path.join(cfg.out_dir, "samples", f"step_{step}.json")
                write_samples(path, trajs, problems, scored, cfg.group_size)
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            save_checkpoint(step, state, cfg, world)
    bar.close()
    in_sync = check_in_sync(wrapped, world)
    after = {"after_rl_sampled": evaluate_now(cfg.temperature), "after_rl_greedy": evaluate_now(0.0)}
    if world.main:
        evaluation = {**state["evaluation"], **after}
        summary = {
            "accuracy_before_rl": evaluation["before_rl_sampled"], "accuracy_after_rl": evaluation["after_rl_sampled"],
            **evaluation, "temperature": cfg.temperature, "held_out_problems": len(held_out),
            "eval_samples": cfg.eval_samples, "seed": cfg.seed,
            "algo": cfg.algo, "rl_steps": cfg.max_steps, "ranks_in_sync": in_sync,
            "minutes": (time.time() - started) / 60,
        }  # fmt: skip
        with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(f"summary: {json.dumps(summary)}")
    if in_sync is False:
        raise RuntimeError("parameters differ between ranks after training")


INPUT_ERRORS = (ConfigError, data.DataError, rewards.RewardFnError, FileNotFoundError, OSError)  # one error line, no traceback

if __name__ == "__main__":
    run_command(main, parse_args(), "train.py", INPUT_ERRORS)
