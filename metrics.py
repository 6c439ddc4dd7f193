"""What a training run reports: each RL step's metrics, summed over ranks and reduced to one
record (reduce), printed as one line with fixed fields (log_line), appended to metrics.jsonl and
sent to an optional experiment tracker (open_tracker: tensorboard or wandb), with the credit
view (the mean advantage by turn index, tool call and end: credit_sums); sample groups with
every turn's r, R and A (write_samples, viewed with `python eval.py --show`); summary.json.

    sums = step_sums(trajs, scored, groups=..., update_sums=..., times=...)   # this rank's
    record = reduce(step, sums, lr=lr, world=world)   # on every rank (a collective)
    log_step(record, run, cfg)                      # rank 0: the line, metrics.jsonl, the tracker
    tracker = open_tracker("tensorboard", out_dir, config)   # or "wandb", or "none" (a no-op)
"""

import json
import numbers
import os
import time

from tqdm import tqdm

import rewards
from config import TRACKERS, ConfigError
from parallel import all_reduce

DRAWN = ("groups_drawn", "groups_varied", "filter_rounds")  # train.draw_groups's counts, alike on every rank
FIELDS = (
    "reward",
    "accuracy",
    "turns",
    "tool_errors",
    "format_errors",
    "shaped",
    "length",
    "loss",
    "clip_frac",
    "kl",
    "grad_norm",
    "lr",
)  # metrics.jsonl has at least these, every step


def step_sums(trajs, scored, *, groups, drawn, update_sums, times):
    """This rank's sums of one RL step (reduce turns every rank's into the record); drawn and
    update_sums hold values every rank has alike (train.draw_groups's counts, train.update's)."""
    G = len(trajs) // groups
    adv_zero = (scored.turn_advantages == 0).all(dim=1).view(groups, G).all(dim=1)  # (groups,)
    calls = [t for tr in trajs for t in tr.turns if t.result is not None]  # tool calls that ran
    return {
        "trajectories": len(trajs),
        "groups": groups,
        "reward": float(scored.total_reward.sum()),
        "correct": float(scored.correct.sum()),
        "turns": sum(len(t.turns) for t in trajs),
        "tool_calls": len(calls),
        "tool_errors": sum(1 for t in calls if not t.result.ok),
        "format_errors": float(scored.format_errors.sum()),
        "infra_errors": float(scored.infra.sum()),
        "failed": float((~scored.correct).sum()),
        "shaped": float(((~scored.correct) & (scored.outcomes > scored.scores)).sum()),
        "length": sum(sum(t.loss_mask) for t in trajs),
        "zero_adv_groups": float(adv_zero.sum()),
        "truncated": float(scored.truncated.sum()),
        "void": float(scored.void.sum()),
        "masked": float(scored.masked.sum()),
        **drawn,
        **update_sums,
        **times,
        **credit_sums(trajs, scored),
    }


def reduce(step, metric_sums, *, lr, world):
    """Sums over ranks -> the step's record (means over trajectories, calls, failures)."""
    keys = sorted(metric_sums)
    total = dict(zip(keys, all_reduce([float(metric_sums[k]) for k in keys], world)))
    n, ranks = total["trajectories"], world.size
    return {
        "step": step,
        "reward": total["reward"] / n,
        "accuracy": total["correct"] / n,
        "turns": total["turns"] / n,
        "tool_calls": total["tool_calls"] / n,
        "tool_errors": total["tool_errors"] / max(total["tool_calls"], 1),
        "format_errors": total["format_errors"] / n,
        "infra_errors": total["infra_errors"],
        "shaped": total["shaped"] / max(total["failed"], 1),
        "length": total["length"] / n,
        "zero_adv_groups": total["zero_adv_groups"] / total["groups"],
        "truncated": total["truncated"] / n,
        "void": total["void"] / n,
        "masked": total["masked"] / n,
        "loss": total["loss"] / ranks,
        "clip_frac": total["clip_frac"],
        "approx_kl": total["approx_kl"],
        "ratio": total["ratio"],
        "optimizer_steps": total["optimizer_steps"] / ranks,
        "kl": total["kl_ref"],
        "grad_norm": total["grad_norm"] / ranks,
        "skipped": total["skipped"] / ranks,
        "no_signal": total["no_signal"] / ranks,
        "lr": lr,
        **{k: total[k] / ranks for k in DRAWN},
        **{k: total[k] / ranks for k in ("t_rollout", "t_reward", "t_old_logp", "t_update")},
        **credit_view(total),
    }


# ---------------------------------------------------------------- the credit view

CALLS = ("ok", "error", "none")  # a turn's tool call: ran without an exception; raised, timed out or
# could not be parsed; or no call (the answer turn, or a turn of prose)
ENDS = ("correct", "wrong")  # how the turn's trajectory ended


def credit_cells(K):
    """The credit view's cells "j/call/end", turn index j from 1 to K."""
    return [f"{j}/{c}/{e}" for j in range(1, K + 1) for c in CALLS for e in ENDS]


def turn_call(turn):
    if turn.valid_call is None:
        return "none"
    return "ok" if turn.valid_call and turn.result is not None and turn.result.ok else "error"


def credit_sums(trajs, scored):
    """This rank's sums behind the credit view: per cell (turn index, the turn's tool call, the
    trajectory's end), the sum and count of its turns' advantages A_ij; and the counts behind two
    shares, correct trajectories' turns with A < 0 and erroring calls' turns with A > 0. Every
    turn counts (zero-advantage groups too), but those of trajectories with a sandbox failure."""
    K = scored.turn_advantages.shape[1]
    sums = {f"credit/{cell}/{x}": 0.0 for cell in credit_cells(K) for x in ("sum", "n")}
    sums.update(
        dict.fromkeys(("credit_neg/correct", "credit_turns/correct", "credit_pos/error", "credit_turns/error"), 0.0)
    )
    advantages, ends = scored.turn_advantages.tolist(), scored.correct.tolist()  # (N, K), (N,)
    for traj, row, correct, infra in zip(trajs, advantages, ends, scored.infra.tolist()):
        if infra:
            continue
        for j, turn in enumerate(traj.turns):
            call, end = turn_call(turn), ENDS[0] if correct else ENDS[1]
            sums[f"credit/{j + 1}/{call}/{end}/sum"] += row[j]
            sums[f"credit/{j + 1}/{call}/{end}/n"] += 1
            if correct:
                sums["credit_turns/correct"] += 1
                sums["credit_neg/correct"] += row[j] < 0
            if call == "error":
                sums["credit_turns/error"] += 1
                sums["credit_pos/error"] += row[j] > 0
    return sums


def credit_view(total):
    """The credit view of a step from every rank's credit_sums: "credit", {"j/call/end": [mean
    advantage, turns]} (mean None without turns), and the two shares."""
    K = max(int(k.split("/")[1]) for k in total if k.startswith("credit/"))
    view = {}
    for cell in credit_cells(K):
        n = total[f"credit/{cell}/n"]
        view[cell] = [total[f"credit/{cell}/sum"] / n if n else None, int(n)]
    return {
        "credit": view,
        "credit_neg_correct": total["credit_neg/correct"] / max(total["credit_turns/correct"], 1),
        "credit_pos_error": total["credit_pos/error"] / max(total["credit_turns/error"], 1),
    }


def log_line(r):
    """One line per step, fixed fields."""
    return (
        f"step {r['step']:4d} | reward {r['reward']:+.3f} | acc {r['accuracy']:.3f} | turns {r['turns']:.2f} | "
        f"trunc {r['truncated']:.2f} | void {r['void']:.2f} | tool_err {r['tool_errors']:.3f} | "
        f"fmt_err {r['format_errors']:.3f} | groups {r['groups_varied']:.0f}/{r['groups_drawn']:.0f} | "
        f"shaped {r['shaped']:.2f} | len {r['length']:.0f} | loss {r['loss']:+.4f} | clip {r['clip_frac']:.3f} | "
        f"kl {r['kl']:.4f} | gnorm {r['grad_norm']:.3f} | lr {r['lr']:.2e} | time roll {r['t_rollout']:.1f}s "
        f"rew {r['t_reward']:.1f}s upd "
        + ("skipped (no signal)" if r["no_signal"] else f"{r['t_old_logp'] + r['t_update']:.1f}s")
    )


def log_step(record, run, cfg):
    """The step's log line, its metrics.jsonl record and tracker log; once per run, a warning
    when more than half of the step's trajectories stopped at a token limit."""
    tqdm.write(log_line(record))
    with open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    run.tracker.log(record, record["step"])
    if record["truncated"] > 0.5 and not run.warned_truncated:
        run.warned_truncated = True
        tqdm.write(
            f"warning: {record['truncated']:.0%} of step {record['step']}'s trajectories stopped at a token "
            f"limit (--max_turn_tokens {cfg.max_turn_tokens}, --max_total_tokens {cfg.max_total_tokens}) "
            "before they could answer; consider raising the limits"
        )


def write_samples(path, *, trajs, problems, scored, group_size, count=2):
    """The first `count` problems' groups as JSON (view with `python eval.py --show PATH`): every
    turn's text, code and tool output, its trained and masked token counts, r, R and A. A
    record's key is the problem's id, its index its position in the file."""
    records = []
    for k, p in enumerate(problems[:count]):
        samples = []
        for i in range(k * group_size, (k + 1) * group_size):
            record = rewards.answer_record(
                trajs[i],
                turn_rewards=scored.turn_rewards[i],
                returns=scored.returns[i],
                advantages=scored.turn_advantages[i],
            )
            samples.append({**record, "correct": bool(scored.correct[i])})
        key = str(p["id"]) if p.get("id") is not None else str(k)
        records.append(
            {
                "key": key,
                "index": k,
                "problem": p["problem"],
                "answer": p["answer"],
                "num_correct": sum(s["correct"] for s in samples),
                "samples": samples,
            }
        )
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"kind": "samples", "problems": records}, f, indent=1)


def write_summary(evaluation, *, cfg, held_out, in_sync, started, environment, peak_memory_gb):
    summary = {
        "accuracy_before_rl": evaluation["before_rl_sampled"],
        "accuracy_after_rl": evaluation["after_rl_sampled"],
        **evaluation,
        "temperature": cfg.temperature,
        "held_out_problems": held_out,
        "eval_samples": cfg.eval_samples,
        "seed": cfg.seed,
        "algo": cfg.algo,
        "rl_steps": cfg.max_steps,
        "ranks_in_sync": in_sync,
        "minutes": (time.time() - started) / 60,
        "environment": environment,
        "peak_memory_gb": peak_memory_gb,
    }
    with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"summary: {json.dumps(summary)}")


# ---------------------------------------------------------------- experiment trackers (optional)


def numeric_fields(record):
    """The fields of a metrics record that a tracker logs: ints and floats (numpy's too; not
    bools, strings, lists or dicts), as floats, under their metrics.jsonl names. "step" is the
    x-axis of every series, not a series of its own."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)
    }


class NoTracker:
    """kind "none": logs nothing, writes nothing."""

    def log(self, record, step):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TensorBoardTracker(NoTracker):
    """Scalars into OUT/tensorboard (torch.utils.tensorboard), one tag per metrics.jsonl field;
    the config as a text summary. `tensorboard --logdir OUT/tensorboard` shows them."""

    def __init__(self, out_dir, config, run_name=None, start_step=0):
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(f"tracker 'tensorboard' needs the package: pip install tensorboard ({e})")
        # purge_step: a resumed run redoes the steps after its checkpoint; events of an earlier
        # attempt at those steps are hidden, as train.py drops their metrics.jsonl records.
        purge = start_step + 1 if start_step else None
        self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=purge)
        text = json.dumps({"run_name": run_name, **config}, indent=1, default=str)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), start_step)  # indented: as code
        self.writer.flush()

    def log(self, record, step):
        for name, value in numeric_fields(record).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # one write per step: a live tensorboard, nothing lost if the run dies

    def close(self):
        self.writer.close()


class WandbTracker(NoTracker):
    """A Weights & Biases run: project from WANDB_PROJECT (else "gtpo"), name run_name, the config
    as its config, its files under OUT/wandb. WANDB_MODE=offline logs to those files only (`wandb
    sync` uploads them later); other WANDB_* variables apply as wandb documents them."""

    def __init__(self, out_dir, config, run_name=None, start_step=0):
        try:
            import wandb
        except ImportError as e:
            raise ConfigError(f"tracker 'wandb' needs the wandb package: pip install wandb ({e})")
        os.makedirs(out_dir, exist_ok=True)
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or "gtpo", name=run_name, config=config, dir=out_dir
            )
        except wandb.errors.Error as e:  # no API key, no connection, a bad setting
            offline = f"WANDB_MODE=offline logs to {os.path.join(out_dir, 'wandb')} without an account"
            raise ConfigError(f"tracker 'wandb': {e} ({offline})") from e

    def log(self, record, step):
        self.run.log(numeric_fields(record), step=step)

    def close(self):
        """Finish the run, then wait until wandb's service process has written it: finish() alone
        can return before the history is on disk. teardown() ends wandb in this process; a later
        wandb.init starts it again."""
        import wandb

        self.run.finish()
        wandb.teardown()


def open_tracker(kind, out_dir, config, run_name=None, start_step=0):
    """An experiment tracker with .log(record, step) and .close() (also a context manager):
    kind "none" (a no-op), "tensorboard" (OUT/tensorboard; needs `pip install tensorboard`) or
    "wandb" (needs `pip install wandb`; see WandbTracker). The package is imported only when its
    kind is asked for; a missing one is a ConfigError naming the pip command. Each log writes the
    record's numeric fields (numeric_fields) at step. start_step: the step a run resumes from
    (tensorboard hides the events an earlier attempt wrote after it). Open it on the main rank only.
    """
    if kind == "none":
        return NoTracker()
    if kind == "tensorboard":
        return TensorBoardTracker(out_dir, config, run_name, start_step)
    if kind == "wandb":
        return WandbTracker(out_dir, config, run_name, start_step)
    raise ConfigError(f"tracker {kind!r}: expected one of {', '.join(TRACKERS)}")
