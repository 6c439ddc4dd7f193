"""Flags: train.py's and eval.py's settings as dataclasses, each field with its meaning, its
valid values and its default (some following --model, in one table), read from the command line
and checked before any work.

    @dataclass
    class Config:
        lr: float = arg(3e-4, "peak learning rate", valid="> 0")
    cfg = parse_config(Config, "train.py", __doc__)   # --help lists every flag; a bad one is one line
"""

import argparse
import dataclasses
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import ClassVar

import gtpo
import model as policies

TRACKERS = ("none", "tensorboard", "wandb")  # metrics.open_tracker
DTYPES = ("bf16", "fp32")  # of forward passes over fp32 weights (parallel.resolve_dtype)
TIMEOUT_MINUTES = 60  # a collective's wait: long enough for rank 0 to write a 7B checkpoint


class ConfigError(ValueError):
    """A flag value that cannot work, named."""


def arg(default, meaning, valid=None):
    """A config field with its one-line meaning (the flag's --help text) and its valid values:
    a range (">= 1", "> 0", "<= 0", "[0, 1]", "(0, 1]", "[0, 1)"; floats must also be finite) or a
    tuple of choices. None always passes: "auto", resolved by the entry script, or a default
    that follows --model (MODEL_DEFAULTS)."""
    metadata = {"help": meaning, "valid": valid}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def default_text(config_cls, f, default):
    """How --help shows a field's default and valid values."""
    valid, shown = valid_text(f), shown_default(config_cls, f, default)
    return f"{shown}; {valid}" if valid else shown


def shown_default(config_cls, f, default, show=str):
    """A field's default as its value, its value per model, or auto."""
    if f.name in getattr(config_cls, "model_defaults", {}):
        demo, other = config_cls.model_defaults[f.name]
        return f"demo: {show(demo)}; other models: {show(other)}"
    return "auto" if default is None else show(default)


def valid_text(f):
    """A field's valid values as words ("" when any value goes)."""
    valid = f.metadata.get("valid")
    if valid is None:
        return ""
    return f"one of {', '.join(valid)}" if isinstance(valid, tuple) else range_text(valid)


def flag_table(config_cls):
    """Every flag of config_cls as a markdown table: default, valid values, meaning (docs/usage.md
    holds train.py's and eval.py's; a test keeps them in step with the code)."""
    code = lambda v: f"`{v!r}`" if v in ("", []) else f"`{v}`"
    rows = ["| flag | default | valid | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(config_cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        cells = [f"`--{f.name}`", shown_default(config_cls, f, default, code), valid_text(f), f.metadata["help"]]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def range_text(valid):
    return f"in {valid}" if valid[0] in "[(" else valid


def range_bounds(valid):
    """(low, low included, high, high included) of a range text (see arg)."""
    if m := re.fullmatch(r"(>=|>|<=|<) (\S+)", valid):
        op, bound = m.group(1), float(m.group(2))
        return (bound, op == ">=", math.inf, False) if op[0] == ">" else (-math.inf, False, bound, op == "<=")
    m = re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", valid)
    assert m, f"not a range: {valid!r}"
    return float(m.group(2)), m.group(1) == "[", float(m.group(3)), m.group(4) == "]"


def in_range(value, valid):
    """Whether a number lies in a range text (see arg); NaN and infinities never do."""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    low, low_in, high, high_in = range_bounds(valid)
    return (low <= value if low_in else low < value) and (value <= high if high_in else value < high)


def check_fields(cfg):
    """A ConfigError naming every field of cfg outside its valid values (flag, value, range), in
    one line."""
    bad = []
    for f in dataclasses.fields(cfg):
        value, valid = getattr(cfg, f.name), f.metadata.get("valid")
        if value is None or valid is None:
            continue
        if isinstance(valid, tuple) and value not in valid:
            bad.append(f"--{f.name} {value!r}: must be one of {', '.join(valid)}")
        elif isinstance(valid, str) and not in_range(value, valid):
            finite = isinstance(value, float) and not math.isfinite(value)
            bad.append(f"--{f.name} {value!r}: must be {range_text(valid)}" + (", a finite number" if finite else ""))
    if bad:
        raise ConfigError("; ".join(bad))


def parse_demo_size(text):
    """(hidden size, layers) of a --demo_size HIDDENxLAYERS, or a ConfigError naming it."""
    if not re.fullmatch(r"[1-9]\d*x[1-9]\d*", text):
        raise ConfigError(f"--demo_size {text!r}: expected HIDDENxLAYERS, e.g. 128x3")
    return tuple(map(int, text.split("x")))


def _flag_bool(text):
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def parse_config(config_cls, prog, description, argv=None):
    """config_cls from the command line: one --flag per field, with its meaning and default in
    --help; list fields take several values. A bad flag is one error line and exit code 2."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in dataclasses.fields(config_cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kind, nargs = f.type, None
        if typing.get_origin(f.type) is list:
            kind, nargs = typing.get_args(f.type)[0], "*"
        extra = {}
        if kind is bool:  # --flag alone means true; --flag false also works
            kind, nargs, extra = _flag_bool, "?", {"const": True}
        meaning = f"{f.metadata['help']} ({default_text(config_cls, f, default)})".replace("%", "%%")
        parser.add_argument(f"--{f.name}", type=kind, nargs=nargs, default=default, help=meaning, **extra)

    def one_line_error(message):
        print(f"{prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

    parser.error = one_line_error
    cfg = config_cls(**vars(parser.parse_args(argv)))
    try:
        check_fields(cfg)
    except ConfigError as e:
        one_line_error(str(e))
    return cfg


# ---------------------------------------------------------------- train.py


# The defaults that follow --model. The demo's tuning (a 0.5M-parameter model learning the toy
# task in minutes) would damage a real checkpoint and cut its reasoning off.
ONE_PASS = "one pass over --sft_data"  # SFT steps: None until data.load_run counts them
MODEL_DEFAULTS = {  # flag: (--model demo, any other model)
    "sft_data":         ("toy",       "none"),
    "out_dir":          ("runs/demo", "runs/<model>-<data>"),
    "sft_steps":        (5000,        ONE_PASS),
    "sft_lr":           (3e-3,        1e-5),
    "sft_check_every":  (250,         0),
    "sft_stop_at":      (0.5,         0.0),
    "max_turn_tokens":  (64,          1024),
    "max_total_tokens": (320,         4096),
    "lr":               (3e-4,        1e-6),
    "micro_batch_size": (16,          4),
}  # fmt: skip


@dataclass
class TrainConfig:
    # --- what to train, on what, where
    model: str = arg(
        "demo",
        "hub id, local Hugging Face directory, or 'demo' (tiny Qwen2 built in code); "
        "defaults marked 'demo: ...; other models: ...' follow it",
    )
    data: str = arg("toy", "RL problems: .jsonl, .json, .parquet, 'hf:NAME[:CONFIG][:SPLIT]', or 'toy' (built-in task)")
    eval_data: str = arg("auto", "held-out problems, same formats; 'auto': toy's held-out set, none otherwise")
    sft_data: str = arg(None, "SFT trajectories {problem, answer, turns}, same formats, 'toy' (teacher), or 'none'")
    problem_key: str = arg(
        "auto",
        "column of the problem text (dotted path into nested rows; a chat message "
        "list uses its last user message); auto: problem, question, prompt, ...",
    )
    answer_key: str = arg(
        "auto",
        "column of the gold answer (dotted path, e.g. reward_model.ground_truth); "
        "'#### N' and \\boxed{} solutions give their final answer; auto: answer, ...",
    )
    out_dir: str = arg(
        None,
        "run directory: config, metrics, samples, checkpoints, summary; an existing run "
        "resumes only with the same settings",
    )
    seed: int = arg(0, "seed of the model init (demo), data order and sampling", valid="[0, 2147483647]")
    # --- the demo model and the toy task
    demo_size: str = arg("128x3", "hidden size x layers of the demo model")
    toy_size: int = arg(3000, "toy training problems (SFT and RL draw from them)", valid=">= 1")
    toy_mistake_rate: float = arg(
        0.25, "share of toy teacher trajectories with a mistake fixed next turn", valid="[0, 1]"
    )
    eval_size: int = arg(100, "held-out problems evaluated before and after RL (0: no evaluation)", valid=">= 0")
    eval_samples: int = arg(1, "sampled trajectories per held-out problem (greedy takes one)", valid=">= 1")
    system_prompt: str = arg("auto", "'auto' (none for toy, model.SYSTEM_PROMPT otherwise), 'none', or text")
    # --- cold-start SFT
    sft_steps: int = arg(
        None, "SFT optimizer steps before RL (0 skips SFT; always 0 with --sft_data none)", valid=">= 0"
    )
    sft_batch_size: int = arg(16, "trajectories per SFT step, over all ranks", valid=">= 1")
    sft_lr: float = arg(None, "SFT peak learning rate (AdamW: 5% warmup, flat, then a cosine tail to 0)", valid="> 0")
    sft_decay_start: float = arg(0.7, "fraction of the SFT steps after which the cosine tail starts", valid="[0, 1]")
    sft_check_every: int = arg(
        None, "SFT steps between greedy checks on the validation problems (0: none)", valid=">= 0"
    )
    sft_stop_at: float = arg(
        None, "end SFT at the first check whose greedy validation accuracy reaches this (0: never)", valid="[0, 1]"
    )
    val_size: int = arg(
        50, "validation problems of the SFT checks (toy: a third draw; files: the first RL problems)", valid=">= 0"
    )
    # --- RL: sampling
    max_steps: int = arg(40, "RL steps (0: SFT and evaluation only)", valid=">= 0")
    prompts_per_step: int = arg(16, "problems per RL step, over all ranks", valid=">= 1")
    group_size: int = arg(8, "trajectories per problem (G)", valid=">= 1")
    max_turns: int = arg(4, "model turns per trajectory (K)", valid=">= 1")
    max_turn_tokens: int = arg(None, "tokens sampled per turn at most", valid=">= 1")
    max_total_tokens: int = arg(None, "prompt + turns + tool outputs, per trajectory", valid=">= 2")
    filter_groups: bool = arg(
        False,
        "dynamic sampling (DAPO): draw further problems, prompts_per_step at a time, "
        "until prompts_per_step groups have outcome scores that differ (a group whose scores "
        "are all alike compares nothing)",
    )
    max_filter_rounds: int = arg(
        4,
        "with --filter_groups: rounds drawn per step at most; then the batch is filled "
        "with the first groups whose scores are alike",
        valid=">= 1",
    )
    temperature: float = arg(
        1.0, "sampling temperature of RL rollouts (and of every log-prob of the loss)", valid="> 0"
    )
    top_p: float = arg(1.0, "nucleus sampling of RL rollouts", valid="(0, 1]")
    rollout_batch_size: int = arg(
        0,
        "trajectories generated at once per rank, in RL and in held-out "
        "evaluation (0: all); bounds the KV cache, not the result (each trajectory "
        "has its own seeded stream; up to float rounding, which differs with the "
        "batch's padding)",
        valid=">= 0",
    )
    # --- RL: rewards and advantages
    algo: str = arg("gtpo", "gtpo (turn rewards, returns, shaping) or grpo (the baseline)", valid=("gtpo", "grpo"))
    gamma: float = arg(0.9, "discount of turn rewards in the returns", valid="[0, 1]")
    alpha: float = arg(0.5, "scale of the similarity credit of failed trajectories", valid="[0, 1]")
    shaping: str = arg(
        "code", "what shaping compares (code: the paper's; text: whole turns)", valid=("code", "text", "none")
    )
    embedder: str = arg("tokens", "shaping embedder: tokens, policy, or hf:<dir>")
    adv_norm: str = arg("group", "normalisation set of advantages (gtpo.py: MODES)", valid=gtpo.MODES)
    format_penalty: float = arg(-0.1, "reward of a turn with a bad tool call (the paper's)", valid="<= 0")
    first_turn_tool_call: bool = arg(
        True,
        "the paper's rule: a first turn without a tool call is a format "
        "error (GTPO: the penalty; GRPO: reward 0); false where the tool is "
        "optional or with --max_turns 1",
    )
    reward_fn: str = arg(
        "none",
        "your reward instead of the built-in grader: 'file.py:function' or "
        "'package.module:function', called as fn(trajectory record, problem row) -> bool "
        "or a score in [0, 1]; format penalties, shaping and normalisation apply around it",
    )
    # --- RL: the update
    lr: float = arg(None, "RL peak learning rate (AdamW, linear warmup then constant)", valid="> 0")
    warmup_steps: int = arg(3, "RL steps of linear learning-rate warmup (0: none)", valid=">= 0")
    weight_decay: float = arg(0.0, "AdamW weight decay", valid=">= 0")
    max_grad_norm: float = arg(
        1.0, "gradient clipping norm (0: no clipping; the norm is logged either way)", valid=">= 0"
    )
    mini_batch_size: int = arg(
        0,
        "trajectories per optimizer step, over all ranks (0: the whole batch); "
        "divides prompts_per_step x group_size, a multiple of the ranks",
        valid=">= 0",
    )
    ppo_epochs: int = arg(1, "passes over the mini-batches per RL batch (an optimizer step each)", valid=">= 1")
    micro_batch_size: int = arg(
        None, "trajectories per forward/backward on a rank (gradient accumulation)", valid=">= 1"
    )
    loss_denominator: str = arg(
        "sampled",
        "what token-mean divides by: 'sampled', every sampled token of the "
        "mini-batch (as TRL and verl); 'signal', only tokens of groups with a "
        "non-zero advantage",
        valid=("sampled", "signal"),
    )
    mask_truncated: bool = arg(
        False,
        "no loss on trajectories cut off by a token limit (--max_turn_tokens, "
        "--max_total_tokens; TRL's mask_truncated_completions): no gradient, out of the "
        "denominator, still failures in their group's statistics",
    )
    mask_void_turns: bool = arg(
        False,
        "no loss on trajectories with a void turn, one that neither calls the tool "
        "nor answers (SimpleTIR's filter): no gradient, out of the denominator, still in "
        "their group's statistics",
    )
    clip_low: float = arg(0.2, "PPO clip below 1", valid="[0, 1)")
    clip_high: float = arg(0.2, "PPO clip above 1", valid=">= 0")
    loss_agg: str = arg("token-mean", "how token losses are averaged (gtpo.policy_loss)", valid=gtpo.AGGREGATIONS)
    kl_coef: float = arg(0.0, "k3 KL to the frozen policy RL started from (0: no reference model)", valid=">= 0")
    # --- machine
    device: str = arg("auto", "where to run (auto: cuda if available)", valid=("auto", "cuda", "cpu"))
    compute_dtype: str = arg(
        "auto",
        "dtype of forward passes (rollouts, log-probs, SFT, FSDP2's gathered "
        "weights) over fp32 weights; auto: bf16 on GPUs that compute it natively (A100, "
        "H100, RTX 30xx on), fp32 on older GPUs and the CPU",
        valid=("auto", *DTYPES),
    )
    dist_timeout: float = arg(
        TIMEOUT_MINUTES,
        "minutes a rank waits in a collective (rank 0 writing a checkpoint keeps the others waiting)",
        valid="> 0",
    )
    parallel: str = arg("ddp", "ddp (a copy per GPU) or fsdp (FSDP2 fully_shard)", valid=("ddp", "fsdp"))
    activation_checkpointing: bool = arg(False, "recompute decoder layers in backward to save memory")
    sandbox_workers: int = arg(8, "sandbox calls run at once per rank", valid=">= 1")
    sandbox_timeout: float = arg(10.0, "seconds per tool call", valid="> 0")
    # --- output
    save_every: int = arg(10, "checkpoint every N RL steps (and at the end)", valid=">= 1")
    keep_checkpoints: int = arg(2, "RL checkpoints kept besides step_0 (the RL start)", valid=">= 1")
    sample_every: int = arg(10, "write sample trajectories every N RL steps", valid=">= 1")
    report_to: str = arg("none", "also log each step's metrics to a tracker (optional packages)", valid=TRACKERS)

    model_defaults: ClassVar[dict] = MODEL_DEFAULTS

    def __post_init__(self):
        """The flags left at None take their MODEL_DEFAULTS value for this --model; out_dir's is
        named after the model and the data."""
        for name, (demo, other) in MODEL_DEFAULTS.items():  # in order: sft_steps reads sft_data
            if getattr(self, name) is None:
                value = demo if self.model == "demo" else other
                if name == "sft_steps":  # no SFT data, no SFT; one pass is counted once it is read
                    value = 0 if self.sft_data in ("", "none") else None if value == ONE_PASS else value
                setattr(self, name, value)
        if self.out_dir == "runs/<model>-<data>":
            name = lambda spec: re.sub(r"\.(jsonl|json|parquet)$", "", os.path.basename(spec.rstrip("/")))
            self.out_dir = os.path.join("runs", f"{name(self.model)}-{name(self.data.replace(':', '-'))}")


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
    Each flag's own range is declared beside its meaning (arg); here are the rules that
    join flags, or the flags and the number of ranks."""
    check_fields(cfg)
    if cfg.sft_steps and cfg.sft_data in ("", "none"):
        raise ConfigError(
            f"--sft_steps {cfg.sft_steps}: SFT needs --sft_data (trajectories {{problem, answer, turns}})"
        )
    for name in ("prompts_per_step", "sft_batch_size"):
        if getattr(cfg, name) % world.size:
            raise ConfigError(f"--{name} {getattr(cfg, name)}: must be a multiple of the {world.size} ranks")
    parse_demo_size(cfg.demo_size)
    if cfg.sft_steps != 0 and cfg.sft_stop_at and not (cfg.sft_check_every and cfg.val_size):
        raise ConfigError(f"--sft_stop_at {cfg.sft_stop_at}: needs --sft_check_every and --val_size above 0")
    batch = cfg.prompts_per_step * cfg.group_size
    if cfg.mini_batch_size and (batch % cfg.mini_batch_size or cfg.mini_batch_size % world.size):
        raise ConfigError(
            f"--mini_batch_size {cfg.mini_batch_size}: must be 0 (the whole batch) or divide the batch "
            f"of {batch} trajectories (prompts_per_step x group_size) and be a multiple of the "
            f"{world.size} ranks"
        )
    system = None if cfg.system_prompt == "none" else cfg.system_prompt
    if cfg.system_prompt == "auto":
        system = None if cfg.data == "toy" else policies.SYSTEM_PROMPT
    local = cfg.prompts_per_step // world.size
    return Derived(
        world_size=world.size,
        local_prompts=local,
        local_trajectories=local * cfg.group_size,
        shaped=cfg.algo == "gtpo" and cfg.shaping != "none" and cfg.alpha > 0,
        system_prompt=system,
        ignored_by_grpo="gamma, alpha, shaping, embedder, adv_norm, format_penalty" if cfg.algo == "grpo" else None,
    )


def check_prompts(sets, tokenizer, *, cfg, derived):
    """Refuse, before any work, a problem (of data.load_run's sets) whose chat prompt leaves no
    room to answer within --max_total_tokens."""
    for flag, rows in (("--data", sets.train), ("--eval_data", sets.held_out), ("--data", sets.validation)):
        for k, row in enumerate(rows):
            n = len(policies.chat_prompt_ids(tokenizer, row["problem"], derived.system_prompt))
            if n >= cfg.max_total_tokens:
                raise ConfigError(
                    f"--max_total_tokens {cfg.max_total_tokens}: the prompt of {flag} problem "
                    f"{row.get('id', k)!r} has {n} tokens; raise the limit or leave the problem out"
                )


# ---------------------------------------------------------------- eval.py


@dataclass
class EvalConfig:
    # --- evaluate
    model: str = arg("", "checkpoint directory, hub id, or 'demo' (an untrained tiny Qwen2)")
    data: list[str] = arg(
        [], "problem sets: .jsonl, .json, .parquet, 'hf:NAME[:CONFIG][:SPLIT]', or 'toy' (the demo's held-out set)"
    )
    problem_key: str = arg("auto", "column of the problem text (dotted path; see train.py --help)")
    answer_key: str = arg(
        "auto", "column of the gold answer (dotted path; '#### N' and \\boxed{} solutions give their final answer)"
    )
    reward_fn: str = arg(
        "auto",
        "'file.py:function' or 'module:function' grading instead of the built-in "
        "grader (see train.py --help); auto: training's, else none (the built-in grader)",
    )
    out: str = arg("report.json", "the JSON report (its partial records go to OUT.partial.jsonl)")
    samples: int = arg(1, "trajectories per problem (k of pass@k)", valid=">= 1")
    temperature: float = arg(
        None,
        "sampling temperature; 0 is greedy (default: 0 with --samples 1, else training's temperature, else 1.0)",
        valid=">= 0",
    )
    top_p: float = arg(1.0, "nucleus sampling", valid="(0, 1]")
    max_turns: int = arg(None, "model turns per trajectory (default: training's, else 4)", valid=">= 1")
    max_turn_tokens: int = arg(None, "tokens sampled per turn (default: training's, else 512)", valid=">= 1")
    max_total_tokens: int = arg(None, "prompt + turns + tool outputs (default: training's, else 2048)", valid=">= 2")
    system_prompt: str = arg("auto", "'auto' (training's, else model.SYSTEM_PROMPT), 'none', or text")
    train_config: str = arg("auto", "training's config.json ('auto': RUN/config.json for RUN/checkpoints/step_N)")
    seed: int = arg(
        0, "sampling seed (each batch is seeded from it, the set and the batch number)", valid="[0, 2147483647]"
    )
    batch_size: int = arg(64, "trajectories per batch (whole problems; part of the seeding)", valid=">= 1")
    rollout_batch_size: int = arg(
        None,
        "trajectories of a batch generated at once (0: all; default: "
        "training's, else 0); bounds the KV cache, not the result",
        valid=">= 0",
    )
    limit: int = arg(0, "evaluate only the first N problems of each set (0: all)", valid=">= 0")
    demo_size: str = arg("128x3", "hidden size x layers of --model demo")
    device: str = arg("auto", "where to run (auto: cuda if available)", valid=("auto", "cuda", "cpu"))
    compute_dtype: str = arg(
        "auto",
        "dtype of the weights and forward passes; auto: bf16 on GPUs that "
        "compute it natively (A100, H100, RTX 30xx on), fp32 on older GPUs and the CPU",
        valid=("auto", *DTYPES),
    )
    sandbox_workers: int = arg(8, "tool calls run at once per rank", valid=">= 1")
    sandbox_timeout: float = arg(10.0, "seconds per tool call", valid="> 0")
    # --- the other modes
    compare: list[str] = arg([], "two reports A B: accuracy side by side, B - A, paired bootstrap 95% CI")
    show: str = arg("", "a report or training sample dump to view turn by turn")
    problem: str = arg("", "with --show: the problem (key, id or index); empty lists the problems")
    html: bool = arg(False, "with --show: write an HTML view next to the file instead of printing")
    plot: list[str] = arg([], "training metrics.jsonl files to draw as PNG curves (needs matplotlib)")
    plot_out: str = arg("", "the PNG (default: metrics.png next to the first metrics file)")
