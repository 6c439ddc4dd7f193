"""Train a tool-using policy with GTPO (or GRPO): the RL loop, read top to bottom.

    python train.py                                        # the demo: tiny Qwen2 on the toy task
    python train.py --model Qwen/Qwen2.5-7B-Instruct --data dapo17k.jsonl --sft_data sft.jsonl
    torchrun --nproc_per_node 8 train.py --model ... --data ... --parallel fsdp

main: flags, data (data.load_run), the policy (launch.wrap), cold-start SFT (sft.run) and the
held-out evaluation before RL, checkpoints/step_0, then the loop: one rl_step per step, a log
line, samples and checkpoints (checkpoint.save), and the held-out evaluation after RL. One
rl_step: the next problems -> rollout (rollout.py: G multi-turn trajectories per problem, the
sandbox between turns) -> score (rewards and advantages: the method's steps 1-3, see gtpo.py)
-> update (the objective, step 4: PPO-clip over mini-batches, an AdamW step each).

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
import gtpo
import metrics
import model as policies
import rewards
import rollout
import sandbox
import sft
from launch import (
    COMPUTE_DTYPES, TIMEOUT_MINUTES, ConfigError, LogProbs, all_gather_rows, all_reduce, arg, barrier, check_fields,
    check_in_sync, environment, finish, full_parameters, gather_objects, gradient_sync, micro_batches, mixed_precision,
    parse_config, parse_demo_size, peak_memory_gb, plan_minibatches, replicate, run_command, setup_distributed,
    trainable_parameters, wrap,
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
    seed: int = arg(0, "seed of the model init (demo), data order and sampling", valid="[0, 2147483647]")
    # --- the demo model and the toy task
    demo_size: str = arg("128x3", "hidden size x layers of the demo model")
    toy_size: int = arg(3000, "toy training problems (SFT and RL draw from them)", valid=">= 1")
    toy_mistake_rate: float = arg(0.25, "share of toy teacher trajectories with a mistake fixed next turn",
                                  valid="[0, 1]")
    eval_size: int = arg(100, "held-out problems evaluated before and after RL (0: no evaluation)", valid=">= 0")
    eval_samples: int = arg(1, "sampled trajectories per held-out problem (greedy takes one)", valid=">= 1")
    system_prompt: str = arg("auto", "'auto' (none for toy, model.SYSTEM_PROMPT otherwise), 'none', or text")
    # --- cold-start SFT
    sft_steps: int = arg(None, "SFT optimizer steps before RL (0 skips SFT; always 0 with --sft_data none)", demo=5000,
                         model="one pass over --sft_data, 0 without it", valid=">= 0")
    sft_batch_size: int = arg(16, "trajectories per SFT step, over all ranks", valid=">= 1")
    sft_lr: float = arg(None, "SFT peak learning rate (AdamW: 5% warmup, flat, then a cosine tail to 0)",
                        demo=3e-3, model=1e-5, valid="> 0")
    sft_decay_start: float = arg(0.7, "fraction of the SFT steps after which the cosine tail starts", valid="[0, 1]")
    sft_check_every: int = arg(None, "SFT steps between greedy checks on the validation problems (0: none)",
                               demo=250, model=0, valid=">= 0")
    sft_stop_at: float = arg(None, "end SFT at the first check whose greedy validation accuracy reaches this "
                             "(0: never)", demo=0.5, model=0.0, valid="[0, 1]")
    val_size: int = arg(50, "validation problems of the SFT checks (toy: a third draw; files: the first RL problems)",
                        valid=">= 0")
    # --- RL: sampling
    max_steps: int = arg(40, "RL steps (0: SFT and evaluation only)", valid=">= 0")
    prompts_per_step: int = arg(16, "problems per RL step, over all ranks", valid=">= 1")
    group_size: int = arg(8, "trajectories per problem (G)", valid=">= 1")
    max_turns: int = arg(4, "model turns per trajectory (K)", valid=">= 1")
    max_turn_tokens: int = arg(None, "tokens sampled per turn at most", demo=64, model=1024, valid=">= 1")
    max_total_tokens: int = arg(None, "prompt + turns + tool outputs, per trajectory", demo=320, model=4096,
                                valid=">= 2")
    filter_groups: bool = arg(False, "dynamic sampling (DAPO): draw further problems, prompts_per_step at a time, "
                              "until prompts_per_step groups have outcome scores that differ (a group whose scores "
                              "are all alike compares nothing)")
    max_filter_rounds: int = arg(4, "with --filter_groups: rounds drawn per step at most; then the batch is filled "
                                 "with the first groups whose scores are alike", valid=">= 1")
    temperature: float = arg(1.0, "sampling temperature of RL rollouts (and of every log-prob of the loss)",
                             valid="> 0")
    top_p: float = arg(1.0, "nucleus sampling of RL rollouts", valid="(0, 1]")
    rollout_batch_size: int = arg(0, "trajectories generated at once per rank, in RL and in held-out "
                                  "evaluation (0: all); bounds the KV cache, not the result (each trajectory "
                                  "has its own seeded stream; up to float rounding, which differs with the "
                                  "batch's padding)", valid=">= 0")
    # --- RL: rewards and advantages
    algo: str = arg("gtpo", "gtpo (turn rewards, returns, shaping) or grpo (the baseline)", valid=("gtpo", "grpo"))
    gamma: float = arg(0.9, "discount of turn rewards in the returns", valid="[0, 1]")
    alpha: float = arg(0.5, "scale of the similarity credit of failed trajectories", valid="[0, 1]")
    shaping: str = arg("code", "what shaping compares (code: the paper's; text: whole turns)",
                       valid=("code", "text", "none"))
    embedder: str = arg("tokens", "shaping embedder: tokens, policy, or hf:<dir>")
    adv_norm: str = arg("group", "normalisation set of advantages (gtpo.py: MODES)", valid=gtpo.MODES)
    format_penalty: float = arg(rewards.FORMAT_PENALTY, "reward of a turn with a bad tool call", valid="<= 0")
    first_turn_tool_call: bool = arg(True, "the paper's rule: a first turn without a tool call is a format "
                                     "error (GTPO: the penalty; GRPO: reward 0); false where the tool is "
                                     "optional or with --max_turns 1")
    reward_fn: str = arg("none", "your reward instead of the built-in grader: 'file.py:function' or "
                         "'package.module:function', called as fn(trajectory record, problem row) -> bool "
                         "or a score in [0, 1]; format penalties, shaping and normalisation apply around it")
    # --- RL: the update
    lr: float = arg(None, "RL peak learning rate (AdamW, linear warmup then constant)", demo=3e-4, model=1e-6,
                    valid="> 0")
    warmup_steps: int = arg(3, "RL steps of linear learning-rate warmup (0: none)", valid=">= 0")
    weight_decay: float = arg(0.0, "AdamW weight decay", valid=">= 0")
    max_grad_norm: float = arg(1.0, "gradient clipping norm (0: no clipping; the norm is logged either way)",
                               valid=">= 0")
    mini_batch_size: int = arg(0, "trajectories per optimizer step, over all ranks (0: the whole batch); "
                               "divides prompts_per_step x group_size, a multiple of the ranks", valid=">= 0")
    ppo_epochs: int = arg(1, "passes over the mini-batches per RL batch (an optimizer step each)", valid=">= 1")
    micro_batch_size: int = arg(None, "trajectories per forward/backward on a rank (gradient accumulation)",
                                demo=16, model=4, valid=">= 1")
    loss_denominator: str = arg("sampled", "what token-mean divides by: 'sampled', every sampled token of the "
                                "mini-batch (as TRL and verl); 'signal', only tokens of groups with a "
                                "non-zero advantage", valid=("sampled", "signal"))
    mask_truncated: bool = arg(False, "no loss on trajectories cut off by a token limit (--max_turn_tokens, "
                               "--max_total_tokens; TRL's mask_truncated_completions): no gradient, out of the "
                               "denominator, still failures in their group's statistics")
    mask_void_turns: bool = arg(False, "no loss on trajectories with a void turn, one that neither calls the tool "
                                "nor answers (SimpleTIR's filter): no gradient, out of the denominator, still in "
                                "their group's statistics")
    clip_low: float = arg(0.2, "PPO clip below 1", valid="[0, 1)")
    clip_high: float = arg(0.2, "PPO clip above 1", valid=">= 0")
    loss_agg: str = arg("token-mean", "how token losses are averaged (gtpo.policy_loss)", valid=gtpo.AGGREGATIONS)
    kl_coef: float = arg(0.0, "k3 KL to the frozen policy RL started from (0: no reference model)", valid=">= 0")
    # --- machine
    device: str = arg("auto", "where to run (auto: cuda if available)", valid=("auto", "cuda", "cpu"))
    compute_dtype: str = arg("auto", "dtype of forward passes (rollouts, log-probs, SFT, FSDP2's gathered "
                             "weights) over fp32 weights; auto: bf16 on GPUs that compute it natively (A100, "
                             "H100, RTX 30xx on), fp32 on older GPUs and the CPU",
                             valid=COMPUTE_DTYPES)
    dist_timeout: float = arg(TIMEOUT_MINUTES, "minutes a rank waits in a collective (rank 0 writing a "
                              "checkpoint keeps the others waiting)", valid="> 0")
    parallel: str = arg("ddp", "ddp (a copy per GPU) or fsdp (FSDP2 fully_shard)", valid=("ddp", "fsdp"))
    activation_checkpointing: bool = arg(False, "recompute decoder layers in backward to save memory")
    sandbox_workers: int = arg(8, "sandbox calls run at once per rank", valid=">= 1")
    sandbox_timeout: float = arg(10.0, "seconds per tool call", valid="> 0")
    # --- output
    save_every: int = arg(10, "checkpoint every N RL steps (and at the end)", valid=">= 1")
    keep_checkpoints: int = arg(2, "RL checkpoints kept besides step_0 (the RL start)", valid=">= 1")
    sample_every: int = arg(10, "write sample trajectories every N RL steps", valid=">= 1")
    report_to: str = arg("none", "also log each step's metrics to a tracker (optional packages)",
                         valid=metrics.TRACKERS)

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
    return parse_config(Config, prog="train.py", description=__doc__, argv=argv)


@dataclass(frozen=True)
class Derived:
    """What follows from the flags and the number of ranks; config.json records it."""

    world_size: int
    local_prompts: int  # problems (groups) per rank per step
    local_trajectories: int  # N
    shaped: bool  # step 3 runs: gtpo with shaping and alpha > 0
    system_prompt: str | None  # resolved; eval.py reads it from config.json
    ignored_by_grpo: str | None = None  # the flags the grpo preset does not use


def check_config(cfg, world):
    """Every flag checked, and the Derived values, in one place: a bad value is a ConfigError.
    Each flag's own range is declared beside its meaning (launch.arg); here are the rules that
    join flags, or the flags and the number of ranks."""
    check_fields(cfg)
    if cfg.sft_steps and cfg.sft_data in ("", "none"):
        raise ConfigError(f"--sft_steps {cfg.sft_steps}: SFT needs --sft_data (trajectories {{problem, answer, turns}})")
    for name in ("prompts_per_step", "sft_batch_size"):
        if getattr(cfg, name) % world.size:
            raise ConfigError(f"--{name} {getattr(cfg, name)}: must be a multiple of the {world.size} ranks")
    parse_demo_size(cfg.demo_size)
    if cfg.sft_steps != 0 and cfg.sft_stop_at and not (cfg.sft_check_every and cfg.val_size):
        raise ConfigError(f"--sft_stop_at {cfg.sft_stop_at}: needs --sft_check_every and --val_size above 0")
    batch = cfg.prompts_per_step * cfg.group_size
    if cfg.mini_batch_size and (batch % cfg.mini_batch_size or cfg.mini_batch_size % world.size):
        raise ConfigError(f"--mini_batch_size {cfg.mini_batch_size}: must be 0 (the whole batch) or divide the batch "
                          f"of {batch} trajectories (prompts_per_step x group_size) and be a multiple of the "
                          f"{world.size} ranks")  # fmt: skip
    system = None if cfg.system_prompt == "none" else cfg.system_prompt
    if cfg.system_prompt == "auto":
        system = None if cfg.data == "toy" else policies.SYSTEM_PROMPT
    local = cfg.prompts_per_step // world.size
    return Derived(world_size=world.size, local_prompts=local, local_trajectories=local * cfg.group_size,
                   shaped=cfg.algo == "gtpo" and cfg.shaping != "none" and cfg.alpha > 0, system_prompt=system,
                   ignored_by_grpo="gamma, alpha, shaping, embedder, adv_norm, format_penalty"
                   if cfg.algo == "grpo" else None)  # fmt: skip


@dataclass
class RunState:
    """What the loop carries from step to step. A checkpoint holds the weights, the optimizer,
    the scheduler, data_position and evaluation (checkpoint.py)."""

    policy: torch.nn.Module  # the Hugging Face model: generation, and the weights wrapped trains
    tokenizer: object
    wrapped: torch.nn.Module  # launch.LogProbs(policy), under DDP or FSDP2 with torchrun
    pool: sandbox.Pool
    grader: rewards.Grader
    problems: list  # the RL problems, visited in a seeded order per epoch (data.problems_at)
    tracker: object = field(default_factory=metrics.NoTracker)
    reward_fn: object = None  # --reward_fn, or None: the grader
    optimizer: torch.optim.Optimizer = None
    scheduler: object = None
    embedder: object = None  # step 3's code embedder (None without shaping)
    ref: torch.nn.Module = None  # the frozen RL start, for kl_coef > 0
    data_position: int = 0  # problems drawn so far, over all ranks
    evaluation: dict = field(default_factory=dict)  # held-out accuracies and SFT steps done
    warned_truncated: bool = False


# ---------------------------------------------------------------- one RL step


@dataclass
class Scored:
    """Rewards and advantages of this rank's N trajectories."""

    scores: torch.Tensor  # (N,) in [0, 1]: the grader's 0/1, or --reward_fn's score
    correct: torch.Tensor  # (N,) bool: score 1
    outcomes: torch.Tensor  # (N,) r_acc of the last turn: the score, or step 3's credit if higher
    infra: torch.Tensor  # (N,) bool: a sandbox failure, left out of statistics and loss
    format_errors: torch.Tensor  # (N,) bool
    turn_rewards: torch.Tensor  # (N, K) r_ij, step 1
    returns: torch.Tensor  # (N, K) R_ij, step 2 (GRPO: its one reward on every turn)
    turn_advantages: torch.Tensor  # (N, K) A_ij, step 2
    total_reward: torch.Tensor  # (N,)
    truncated: torch.Tensor  # (N,) bool: stopped at a token limit
    void: torch.Tensor  # (N,) bool: has a turn that neither calls the tool nor answers (rewards.void_turn)
    masked: torch.Tensor  # (N,) bool: left out of the loss by --mask_truncated or --mask_void_turns
    trained: torch.Tensor  # (N,) bool: in a group with a non-zero advantage, not masked, no sandbox failure
    counted: torch.Tensor  # (N,) bool: rows whose sampled tokens the loss divides by


def score(trajs, rows, group_index, *, cfg, derived, world, grader, embedder=None, reward_fn=None, scores=None):
    """Steps 1-3 on this rank's trajectories (rows: each one's problem row, graded by the grader
    or by reward_fn unless their scores are given; embedder: step 3's). Normalisation sees every
    rank's rows, so adv_norm "batch" is exact. counted is every row but sandbox failures and
    masked rows, or the trained rows with --loss_denominator signal."""
    N, K = len(trajs), cfg.max_turns
    if scores is None:
        scores = rewards.outcome_scores(trajs, rows, grader=grader, reward_fn=reward_fn)  # (N,) in [0, 1]
    correct = scores >= 1  # (N,)
    infra = torch.tensor([any(t.result is not None and t.result.infra_error for t in tr.turns) for tr in trajs])
    outcomes = scores  # (N,)
    if derived.shaped:  # step 3
        texts = [rewards.trajectory_code(t) if cfg.shaping == "code" else "".join(u.text for u in t.turns) for t in trajs]
        shaped = rewards.shape_outcomes(correct, embedder(texts), group_index, alpha=cfg.alpha)
        outcomes = torch.maximum(scores, shaped)  # a partial score from reward_fn is kept if higher
    turn_rewards, turn_mask = rewards.turn_reward_matrix(trajs, outcomes, K, penalty=cfg.format_penalty,
                                                         first_call=cfg.first_turn_tool_call)  # (N, K), step 1
    mine = slice(world.rank * N, (world.rank + 1) * N)
    if cfg.algo == "gtpo":  # step 2
        returns = gtpo.discounted_returns(turn_rewards, turn_mask, cfg.gamma)  # (N, K)
        take_part = turn_mask & ~infra[:, None]  # sandbox failures stay out of the statistics
        everyone = [all_gather_rows(t, world) for t in (returns, take_part, group_index)]
        turn_advantages = gtpo.normalize(*everyone, mode=cfg.adv_norm)[mine]  # (N, K)
        total_reward = turn_rewards.sum(dim=1)  # (N,)
    else:
        total_reward = rewards.grpo_rewards(trajs, scores, first_call=cfg.first_turn_tool_call)  # (N,)
        returns = total_reward[:, None] * turn_mask  # (N, K) one reward, on every turn (for display)
        everyone = [all_gather_rows(t, world) for t in (total_reward, ~infra, group_index)]
        turn_advantages = gtpo.grpo_advantages(everyone[0], everyone[2], mask=everyone[1])[mine][:, None] * turn_mask
    format_errors = torch.tensor([any(rewards.turn_format_penalties(t.turns, first_call=cfg.first_turn_tool_call))
                                  for t in trajs])  # fmt: skip
    signal = (turn_advantages != 0).any(dim=1)  # (N,)
    live_group = torch.zeros(int(group_index.max()) + 1, dtype=torch.bool).index_put_((group_index,), signal,
                                                                                      accumulate=True)  # fmt: skip
    truncated = torch.tensor([t.stop_reason == "max_length" for t in trajs])  # (N,)
    void = torch.tensor([any(map(rewards.void_turn, t.turns)) for t in trajs])  # (N,)
    masked = (truncated & cfg.mask_truncated) | (void & cfg.mask_void_turns)  # (N,) in the statistics, not the loss
    trained = live_group[group_index] & ~infra & ~masked  # (N,)
    counted = trained if cfg.loss_denominator == "signal" else ~infra & ~masked  # (N,)
    return Scored(scores=scores, correct=correct, outcomes=outcomes, infra=infra, format_errors=format_errors,
                  turn_rewards=turn_rewards, returns=returns, turn_advantages=turn_advantages,
                  total_reward=total_reward, truncated=truncated, void=void, masked=masked, trained=trained,
                  counted=counted)  # fmt: skip


def old_logprobs(wrapped, batch, *, size, trim, count, temperature):
    """log-probs of the sampled tokens under the current policy at the sampling temperature, no
    gradient: (n, L), 0 beyond each micro-batch's width."""
    out = torch.zeros(batch["input_ids"].shape, device=batch["input_ids"].device)
    with torch.no_grad():
        for s, micro in micro_batches(batch, size=size, trim=trim, count=count):
            logp = wrapped(micro["input_ids"], micro["attention_mask"], temperature=temperature,
                           needed=micro["loss_mask"])  # fmt: skip
            if s is not None:
                out[s : s + size, : logp.shape[1]] = logp
    return out


def needs_old_logprobs(cfg, num_minibatches):
    """Whether a separate no-gradient pass must score the sampled tokens. With exactly one
    optimizer step per batch the policy trained is the one that sampled: the ratio is 1 by
    construction and the trained pass's own log-probs, detached, are the old ones."""
    return num_minibatches * cfg.ppo_epochs > 1


def update(wrapped, optimizer, trajs, *, turn_advantages, trained, counted, cfg, world, pad, ref=None,
           always_old_logprobs=False):  # fmt: skip
    """Step 4: ppo_epochs passes over the mini-batches of this rank's trajectories, one optimizer
    step per mini-batch (with every rank's gradients). Rows of groups whose advantages are all
    zero get no forward pass (their surrogate is exactly 0), unless kl_coef > 0; counted rows
    make up each mini-batch's denominator. Old log-probs are computed once, before the first
    optimizer step (skipped when there is only one, see needs_old_logprobs); a mini-batch with no
    forwarded token on any rank takes no step, and a batch without any does no work at all.
    Returns (stat sums: means over the optimizer steps taken, seconds spent on old and reference
    log-probs); a non-finite gradient norm skips the optimizer step with a warning, on every rank
    alike. Log-probs are projected at loss-masked positions only (model.token_logprobs)."""
    forwarded = counted if cfg.kl_coef > 0 else trained
    plan = plan_minibatches(trajs, forwarded=forwarded, counted=counted, mini_batch_size=cfg.mini_batch_size,
                            micro_batch_size=cfg.micro_batch_size, world=world, pad=pad)  # fmt: skip
    plan = [mb for mb in plan if mb.forwarded_tokens > 0]
    # Cutting padding changes nothing but "seq-mean-token-sum-norm", which divides by the width.
    size, trim = cfg.micro_batch_size, cfg.loss_agg != "seq-mean-token-sum-norm"
    t0 = time.perf_counter()
    for mb in plan:
        advantages = turn_advantages[mb.rows] if mb.rows else torch.zeros_like(turn_advantages[:1])  # (n, K)
        mb.batch["advantages"] = gtpo.token_advantages(advantages.to(world.device), mb.batch["token_turn"])  # (n, L)
        if always_old_logprobs or needs_old_logprobs(cfg, len(plan)):
            mb.batch["old_logp"] = old_logprobs(wrapped, mb.batch, size=size, trim=trim, count=mb.micro_batches,
                                                temperature=cfg.temperature)  # (n, L) fmt: skip
        if ref is not None:
            mb.batch["ref_logp"] = old_logprobs(ref, mb.batch, size=size, trim=trim, count=mb.micro_batches,
                                                temperature=cfg.temperature)  # (n, L) fmt: skip
    t_old = time.perf_counter() - t0
    steps = cfg.ppo_epochs * len(plan)
    sums = dict.fromkeys(("loss", "clip_frac", "approx_kl", "ratio", "kl_ref", "grad_norm", "skipped"), 0.0)
    # No mini-batch left means no forwarded token on any rank (forwarded_tokens is a global count):
    # every rank alike skips the forward, backward and optimizer step, and the step is logged so.
    sums["optimizer_steps"], sums["no_signal"] = steps, float(not plan)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # see trainable_parameters
    for _ in range(cfg.ppo_epochs):
        for mb in plan:
            for k, (_, micro) in enumerate(micro_batches(mb.batch, size=size, trim=trim, count=mb.micro_batches)):
                with gradient_sync(wrapped, enabled=k == mb.micro_batches - 1):
                    logp = wrapped(micro["input_ids"], micro["attention_mask"], temperature=cfg.temperature,
                                   needed=micro["loss_mask"])  # (m, L) fmt: skip
                    loss, stats = gtpo.policy_loss(
                        logp=logp, old_logp=micro.get("old_logp", logp.detach()), advantages=micro["advantages"],
                        loss_mask=micro["loss_mask"],
                        clip_low=cfg.clip_low, clip_high=cfg.clip_high, agg=cfg.loss_agg, num_tokens=mb.num_tokens,
                        num_seqs=mb.num_seqs, ref_logp=micro.get("ref_logp"), kl_coef=cfg.kl_coef,
                    )  # fmt: skip
                    (loss * world.size).backward()  # DDP/FSDP average over ranks; this makes it a sum
                weight = float(micro["loss_mask"].sum()) / mb.forwarded_tokens / steps  # token share, per step
                sums["loss"] += float(loss.detach()) * world.size / steps
                for key, stat in (("clip_frac", "clip_frac"), ("approx_kl", "approx_kl"), ("ratio", "ratio_mean"),
                                  ("kl_ref", "kl_ref")):  # fmt: skip
                    sums[key] += float(stats.get(stat, 0.0)) * weight
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf))
            if math.isfinite(grad_norm):  # identical on every rank: the gradients are synced
                optimizer.step()
            else:
                sums["skipped"] += 1
                if world.main:
                    tqdm.write(f"warning: non-finite gradient norm ({grad_norm}); optimizer step skipped")
            optimizer.zero_grad(set_to_none=True)
            sums["grad_norm"] += grad_norm / steps
    return sums, t_old


@dataclass
class Drawn:
    """This rank's share of a step's problem groups (draw_groups)."""

    problems: list  # this rank's problem rows, one per group
    trajs: list  # (N,) G trajectories per problem, in problem order
    scores: torch.Tensor  # (N,) their outcome scores (rewards.outcome_scores)
    counts: dict  # over all ranks: groups_drawn, groups_varied (in the batch), filter_rounds


def sample_groups(step, position, run, *, cfg, derived, world):
    """G trajectories for each of this rank's problems of the prompts_per_step at global stream
    position `position`, and their scores: (problems, trajs, scores (N,)). Each trajectory's
    random stream is seeded by its position, whichever rank generates it."""
    n_local, G = derived.local_prompts, cfg.group_size
    first = position + world.rank * n_local
    problems = data.problems_at(run.problems, first, n_local, seed=cfg.seed)
    prompts = [policies.chat_prompt_ids(run.tokenizer, p["problem"], derived.system_prompt) for p in problems]
    seeds = rollout.rollout_seeds(cfg.seed, step, first=first * G, count=n_local * G)
    with torch.no_grad(), full_parameters(run.wrapped), mixed_precision(run.policy, world.dtype):
        run.policy.eval()
        trajs = rollout.rollout(run.policy, run.tokenizer, [p for p in prompts for _ in range(G)], pool=run.pool,
                                cfg=rollout_config(cfg, cfg.temperature), seeds=seeds)  # fmt: skip
    rows = [p for p in problems for _ in range(G)]
    return problems, trajs, rewards.outcome_scores(trajs, rows, grader=run.grader, reward_fn=run.reward_fn)


def draw_groups(step, run, *, cfg, derived, world):
    """The step's groups (Drawn): the next prompts_per_step problems; with --filter_groups
    (DAPO's dynamic sampling), rounds of prompts_per_step more until that many groups have
    outcome scores that differ, at most max_filter_rounds. The batch is then the first
    prompts_per_step such groups in stream order, filled with the first alike ones if the rounds
    ran out, and rank r takes its r-th share of it: the same batch on any number of ranks. The
    data position moves past every round drawn."""
    n_local, G, P = derived.local_prompts, cfg.group_size, cfg.prompts_per_step
    mine, varied, alike = {}, [], []  # mine: (round, global group) -> (problem, trajs, scores)
    for r in range(cfg.max_filter_rounds if cfg.filter_groups else 1):
        problems, trajs, scores = sample_groups(step, run.data_position, run, cfg=cfg, derived=derived, world=world)
        run.data_position += P
        for k, problem in enumerate(problems):
            mine[r, world.rank * n_local + k] = (problem, trajs[k * G : (k + 1) * G], scores[k * G : (k + 1) * G])
        groups = scores.view(n_local, G)  # (n_local, G)
        same = all_gather_rows((groups == groups[:, :1]).all(dim=1), world).tolist()  # (P,) every rank's
        varied += [(r, g) for g in range(P) if not same[g]]
        alike += [(r, g) for g in range(P) if same[g]]
        if len(varied) >= P:
            break
    batch = sorted(varied[:P] + alike[: max(P - len(varied), 0)]) if cfg.filter_groups else [(0, g) for g in range(P)]
    if any(g // n_local != k // n_local for k, (_, g) in enumerate(batch)):  # a group changes ranks
        for theirs in gather_objects({key: mine[key] for key in batch if key in mine}, world):
            mine.update(theirs)
    share = [mine[key] for key in batch[world.rank * n_local : (world.rank + 1) * n_local]]
    counts = {"groups_drawn": P * (r + 1), "groups_varied": min(len(varied), P), "filter_rounds": r + 1}
    return Drawn(problems=[p for p, _, _ in share], trajs=[t for _, trajs, _ in share for t in trajs],
                 scores=torch.cat([scores for _, _, scores in share]), counts=counts)  # fmt: skip


def rl_step(step, run, *, cfg, derived, world):
    """One RL step on this rank's share of the problems; returns (metric sums, (problems, trajs, scored))."""
    n_local, G = derived.local_prompts, cfg.group_size
    group_index = torch.arange(n_local).repeat_interleave(G) + world.rank * n_local  # (N,) global ids
    t0 = time.perf_counter()
    drawn = draw_groups(step, run, cfg=cfg, derived=derived, world=world)
    problems, trajs = drawn.problems, drawn.trajs
    used = sum(any(turn.result is not None for turn in t.turns) for t in trajs)
    run.pool.prewarm(used)  # as many sandboxes as this step used start for the next while this one trains
    t1 = time.perf_counter()
    if hasattr(run.embedder, "new_step"):
        run.embedder.new_step()
    scored = score(trajs, [p for p in problems for _ in range(G)], group_index, cfg=cfg, derived=derived, world=world,
                   grader=run.grader, embedder=run.embedder, scores=drawn.scores)  # fmt: skip
    t2 = time.perf_counter()
    run.policy.train()
    sums, t_old = update(run.wrapped, run.optimizer, trajs, turn_advantages=scored.turn_advantages,
                         trained=scored.trained, counted=scored.counted, cfg=cfg, world=world,
                         pad=run.tokenizer.pad_token_id, ref=run.ref)  # fmt: skip
    with warnings.catch_warnings():  # the schedule counts RL steps, also those without an optimizer step
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        run.scheduler.step()
    t3 = time.perf_counter()
    times = {"t_rollout": t1 - t0, "t_reward": t2 - t1, "t_old_logp": t_old, "t_update": t3 - t2 - t_old}
    metric_sums = metrics.step_sums(trajs, scored, groups=n_local, drawn=drawn.counts, update_sums=sums, times=times)
    return metric_sums, (problems, trajs, scored)


def rollout_config(cfg, temperature):
    return rollout.RolloutConfig(max_turns=cfg.max_turns, max_turn_tokens=cfg.max_turn_tokens,
                                 max_total_tokens=cfg.max_total_tokens, temperature=temperature, top_p=cfg.top_p,
                                 batch_size=cfg.rollout_batch_size)  # fmt: skip


# ---------------------------------------------------------------- evaluation


def evaluate(run, problems, *, cfg, derived, world, temperature):
    """Held-out accuracy: the mean over eval_samples trajectories per problem (one when greedy,
    temperature 0), problems sharded over ranks; None without problems. The sampling RNG is
    saved and restored, so evaluating does not change training."""
    if not problems:
        return None
    samples = cfg.eval_samples if temperature > 0 else 1
    mine = [p for p in problems[world.rank :: world.size] for _ in range(samples)]
    rng = torch.get_rng_state()
    torch.manual_seed(cfg.seed + 7919 * (world.rank + 1))
    with torch.no_grad(), full_parameters(run.wrapped), mixed_precision(run.policy, world.dtype):
        run.policy.eval()
        prompts = [policies.chat_prompt_ids(run.tokenizer, p["problem"], derived.system_prompt) for p in mine]
        trajs = rollout.rollout(run.policy, run.tokenizer, prompts, pool=run.pool,
                                cfg=rollout_config(cfg, temperature))  # --rollout_batch_size at a time
    scores = rewards.outcome_scores(trajs, mine, grader=run.grader, reward_fn=run.reward_fn)  # (n,)
    correct = float((scores >= 1).sum())
    torch.set_rng_state(rng)
    total, n = all_reduce([correct, float(len(mine))], world)
    return total / n


# ---------------------------------------------------------------- main: the run, top to bottom


def main(cfg):
    world = setup_distributed(cfg.device, cfg.compute_dtype, cfg.dist_timeout)
    check_config(cfg, world)  # bad flags fail before any data is read; again below once sft_steps is known
    reward_fn = rewards.load_reward_fn(cfg.reward_fn)
    started = time.time()
    sets = data.load_run(cfg, log=print if world.main else None)
    if cfg.sft_steps is None:  # a real model's default: one pass over the SFT rows
        cfg = dataclasses.replace(cfg, sft_steps=math.ceil(len(sets.sft_rows) / cfg.sft_batch_size))
    derived = check_config(cfg, world)
    checkpoint.check_resume(cfg, world)
    tokenizer = policies.load_tokenizer(cfg.model)
    check_prompts(sets, tokenizer, cfg=cfg, derived=derived)  # before the model: a refusal costs nothing
    barrier(world)  # every rank has read the old config.json before rank 0 replaces it
    torch.manual_seed(cfg.seed + world.rank)  # distinct sampling per rank
    random.seed(cfg.seed + world.rank)
    np.random.seed(cfg.seed + world.rank)
    tracker = metrics.NoTracker()
    if world.main:
        os.makedirs(os.path.join(cfg.out_dir, "samples"), exist_ok=True)
        print(checkpoint.write_config(cfg, derived))
        resumes_at = (checkpoint.steps(cfg.out_dir) or [0])[-1]  # a missing package fails here, before any work
        tracker = metrics.open_tracker(cfg.report_to, cfg.out_dir, dataclasses.asdict(cfg), start_step=resumes_at)
    torch.manual_seed(cfg.seed)
    policy, tokenizer = policies.load_policy(cfg.model, world.device if world.main else "meta",  # read once
                                             dtype=torch.float32,  # fp32 master weights
                                             activation_checkpointing=cfg.activation_checkpointing,
                                             demo_size=parse_demo_size(cfg.demo_size), seed=cfg.seed,
                                             tokenizer=tokenizer)  # fmt: skip
    wrapped = wrap(policy, world, cfg.parallel, vocab_size=len(tokenizer))  # rank 0's weights on every rank
    torch.manual_seed(cfg.seed + world.rank)
    run = RunState(policy=policy, tokenizer=tokenizer, wrapped=wrapped, problems=sets.train,
                   pool=sandbox.Pool(cfg.sandbox_workers, timeout=cfg.sandbox_timeout), grader=rewards.Grader(),
                   tracker=tracker, reward_fn=reward_fn)  # fmt: skip
    try:
        train(run, sets, cfg=cfg, derived=derived, world=world, started=started)
    finally:
        run.pool.close()
        run.grader.close()
        tracker.close()
    finish(world)  # not on an error: the other ranks may be waiting in a collective (see run_command)


def shaping_embedder(cfg, tokenizer, policy, wrapped):
    """Step 3's embedder; the policy's own runs with its parameters gathered (FSDP2 shards them)."""
    return rewards.make_embedder(cfg.embedder, tokenizer, policy, gathered=lambda: full_parameters(wrapped))


def check_prompts(sets, tokenizer, *, cfg, derived):
    """Refuse, before any work, a problem whose chat prompt leaves no room to answer."""
    for flag, rows in (("--data", sets.train), ("--eval_data", sets.held_out), ("--data", sets.validation)):
        for k, row in enumerate(rows):
            n = len(policies.chat_prompt_ids(tokenizer, row["problem"], derived.system_prompt))
            if n >= cfg.max_total_tokens:
                raise ConfigError(f"--max_total_tokens {cfg.max_total_tokens}: the prompt of {flag} problem "
                                  f"{row.get('id', k)!r} has {n} tokens; raise the limit or leave the problem out")


def train(run, sets, *, cfg, derived, world, started):
    """SFT and the evaluation before RL (once per out_dir: step_0 records them), then RL."""
    held_out = lambda temperature: evaluate(run, sets.held_out, cfg=cfg, derived=derived, world=world,
                                            temperature=temperature)  # fmt: skip
    done = checkpoint.steps(cfg.out_dir)
    if not done:
        if cfg.sft_steps:
            validate = lambda: evaluate(run, sets.validation, cfg=cfg, derived=derived, world=world, temperature=0.0)
            run.evaluation["sft_steps_done"] = sft.run(run.wrapped, run.tokenizer, sets.sft_rows, cfg=cfg, world=world,
                                                       system_prompt=derived.system_prompt,
                                                       validate=validate if sets.validation else None)  # fmt: skip
        run.evaluation |= {"before_rl_sampled": held_out(cfg.temperature), "before_rl_greedy": held_out(0.0)}
        if world.main:
            print(f"held-out accuracy before RL: {run.evaluation}")
    run.optimizer = torch.optim.AdamW(trainable_parameters(run.wrapped), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1))  # linear, then constant
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, warmup)
    if not done:
        checkpoint.save(0, run, cfg=cfg, world=world)  # the RL start: never pruned, the KL reference
        done = [0]
    start = done[-1]
    checkpoint.load(start, run, cfg=cfg, world=world)
    if cfg.kl_coef > 0:  # in the compute dtype: it is never updated
        step_0 = os.path.join(cfg.out_dir, "checkpoints", "step_0")
        reference = policies.load_policy(step_0, world.device if world.main else "meta", dtype=world.dtype)[0]
        run.ref = replicate(LogProbs(reference.eval().requires_grad_(False), world.dtype, len(run.tokenizer)), world)
    if world.main:
        checkpoint.trim_metrics(cfg.out_dir, start)
        if start:
            print(f"resumed from {cfg.out_dir}/checkpoints/step_{start}")
    run.pool.prewarm(derived.local_trajectories)
    run.embedder = shaping_embedder(cfg, run.tokenizer, run.policy, run.wrapped) if derived.shaped else None
    bar = tqdm(range(start + 1, cfg.max_steps + 1), desc="rl", disable=not world.main, dynamic_ncols=True,
               initial=start, total=cfg.max_steps)  # fmt: skip
    for step in bar:
        lr = run.scheduler.get_last_lr()[0]
        metric_sums, (problems, trajs, scored) = rl_step(step, run, cfg=cfg, derived=derived, world=world)
        record = metrics.reduce(step, metric_sums, lr=lr, world=world)
        if world.main:
            metrics.log_step(record, run, cfg)
            if step % cfg.sample_every == 0 or step == 1:
                metrics.write_samples(os.path.join(cfg.out_dir, "samples", f"step_{step}.json"), trajs=trajs,
                                      problems=problems, scored=scored, group_size=cfg.group_size)  # fmt: skip
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            checkpoint.save(step, run, cfg=cfg, world=world)
    bar.close()
    in_sync = check_in_sync(run.wrapped, world)
    run.evaluation |= {"after_rl_sampled": held_out(cfg.temperature), "after_rl_greedy": held_out(0.0)}
    peaks = gather_objects(peak_memory_gb(world), world)  # GB per rank
    if world.main:
        metrics.write_summary(run.evaluation, cfg=cfg, held_out=len(sets.held_out), in_sync=in_sync, started=started,
                              environment=environment(world), peak_memory_gb=peaks)  # fmt: skip
    if in_sync is False:
        raise RuntimeError("parameters differ between ranks after training")


INPUT_ERRORS = (ConfigError, data.DataError, rewards.RewardFnError, FileNotFoundError, OSError)  # one error line, no traceback

if __name__ == "__main__":
    run_command(main, parse_args(), prog="train.py", input_errors=INPUT_ERRORS)
