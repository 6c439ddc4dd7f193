"""Evaluate a policy with exactly the rollout and grader of training, and look at what it did.

    python eval.py --model runs/demo/checkpoints/step_40 --data toy --out runs/demo/eval.json
    python eval.py --model DIR --data gsm8k.jsonl math500.jsonl --samples 8 --temperature 0.6 --out r.json
    torchrun --nproc_per_node 8 eval.py --model DIR --data aime24.jsonl --samples 32 --temperature 1 --out r.json
    python eval.py --compare before.json after.json           # side by side, paired bootstrap CI
    python eval.py --show r.json --problem toy/17             # one problem, turn by turn
    python eval.py --show runs/demo/samples/step_10.json --html   # a training dump: r, R, A per turn
    python eval.py --plot runs/demo/metrics.jsonl             # training curves as PNG (matplotlib)

Evaluation: each --data set is cut into batches of problems (--batch_size trajectories, each
problem repeated --samples times), and batch b of set s is sampled with a seed made of (--seed,
s, b). So the report does not depend on the number of ranks, nor on whether the run was
interrupted: under torchrun the batches are dealt round-robin to ranks, rank 0 gathers each
round's records and appends them to OUT.partial.jsonl, and the same command run again resumes
from there. Greedy decoding: --samples 1 --temperature 0 (the defaults).

Figures per set (and over all sets at the top of the report): accuracy (mean over problems of
the share of correct samples), pass@k (the unbiased estimator, k = 1, 2, 4, ... up to --samples),
mean turns, tool-call rate (trajectories that ran at least one tool call), tool error rate (tool
calls whose code raised or timed out), format error rate (trajectories with an invalid call or
no call in turn 1, as in training's reward), answer rate (trajectories with an answer
grading.extract_answer finds), mean tokens (sampled tokens per trajectory). On an error, every
rank raises it (no rank is left waiting in a collective) and it is printed once.
"""

import dataclasses
import json
import math
import os
import zlib

import numpy as np
import torch
from tqdm import tqdm

import data
import grading
import model as policies
import reports
import rewards
import rollout
import sandbox
import tasks
from config import ConfigError, EvalConfig, check_fields, parse_config, parse_demo_size
from parallel import (
    DTYPES,
    broadcast_object,
    environment,
    finish,
    gather_objects,
    mixed_precision,
    replicate,
    run_command,
    setup_distributed,
)

INPUT_ERRORS = (ConfigError, data.DataError, rewards.RewardFnError, OSError)  # one error line, no traceback

# Settings that change what the evaluation produces: a resumed run must match them exactly.
RESULT_SETTINGS = (
    "model",
    "data",
    "problem_key",
    "answer_key",
    "reward_fn",
    "samples",
    "temperature",
    "top_p",
    "max_turns",
    "max_turn_tokens",
    "max_total_tokens",
    "system_prompt",
    "seed",
    "batch_size",
    "limit",
    "demo_size",
    "sandbox_timeout",
    "compute_dtype",
)


# ---------------------------------------------------------------- settings


def training_config(cfg):
    """Training's saved config and derived values, or None."""
    path = cfg.train_config
    if path == "auto":
        run_dir, checkpoints = os.path.split(os.path.dirname(os.path.abspath(cfg.model)))
        path = os.path.join(run_dir, "config.json") if checkpoints == "checkpoints" else ""
        if not os.path.isfile(path):
            return None
    elif path in ("", "none"):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
        return {**saved["config"], **saved["derived"]}
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ConfigError(f"--train_config {path}: not a train.py config.json ({e})") from None


def resolve(cfg):
    """Check the flags and fill the defaults taken from training; returns the evaluation's
    settings (None in the other modes)."""
    given = {"data": cfg.data, "compare": cfg.compare, "show": cfg.show, "plot": cfg.plot}
    modes = [f"--{m}" for m, value in given.items() if value]
    if len(modes) != 1:
        got = f"; got {', '.join(modes)}" if modes else ""
        raise ConfigError(f"give exactly one of --data (evaluate), --compare, --show, --plot{got}")
    check_fields(cfg)
    if not cfg.data:
        return None
    if not cfg.model:
        raise ConfigError("--model is required to evaluate (a checkpoint directory, hub id, or 'demo')")
    parse_demo_size(cfg.demo_size)
    trained = training_config(cfg)
    temperature_from = "--temperature"
    if cfg.temperature is None:  # one sample: greedy; several: training's temperature, else 1.0
        if cfg.samples == 1:
            cfg.temperature, temperature_from = 0.0, "greedy: one sample"
        elif trained:
            cfg.temperature, temperature_from = trained["temperature"], "training's config.json"
        else:
            cfg.temperature, temperature_from = 1.0, "1.0: no training config"
    if cfg.samples > 1 and cfg.temperature == 0:
        raise ConfigError(f"--samples {cfg.samples} with --temperature 0: every sample would be the same greedy one")
    if cfg.reward_fn == "auto":
        cfg.reward_fn = trained.get("reward_fn", "none") if trained else "none"
    for name, default in (
        ("max_turns", 4),
        ("max_turn_tokens", 512),
        ("max_total_tokens", 2048),
        ("rollout_batch_size", 0),
    ):
        if getattr(cfg, name) is None:
            setattr(cfg, name, trained.get(name, default) if trained else default)
    if cfg.system_prompt == "auto":
        cfg.system_prompt = trained["system_prompt"] if trained else policies.SYSTEM_PROMPT
    cfg.system_prompt = None if cfg.system_prompt == "none" else cfg.system_prompt
    names = [set_name(spec) for spec in cfg.data]
    if len(set(names)) < len(names):
        raise ConfigError(f"--data {' '.join(cfg.data)}: two sets have the same name ({', '.join(names)})")
    settings = {k: getattr(cfg, k) for k in RESULT_SETTINGS}
    settings["training_config"] = bool(trained)
    settings["temperature_from"] = temperature_from
    settings["first_turn_tool_call"] = trained.get("first_turn_tool_call", True) if trained else True
    return settings


def set_name(spec):
    if spec == "toy" or spec.startswith("hf:"):
        return spec.removeprefix("hf:")
    return os.path.splitext(os.path.basename(spec))[0]


def load_sets(cfg, world=None):
    """{set name: problems}, each cut to --limit; a set left empty is an error. Rank 0 prints
    each file's load summary."""
    sets = {}
    for spec in cfg.data:
        if spec == "toy":
            problems = tasks.toy_held_out(100)
        else:
            problems, summary = data.load(spec, problem_key=cfg.problem_key, answer_key=cfg.answer_key)
            if world is None or world.main:
                print(f"data: {summary}")
        sets[set_name(spec)] = problems[: cfg.limit or None]
        if not sets[set_name(spec)]:
            raise data.DataError(f"{spec}: no problems to evaluate")
    return sets


# ---------------------------------------------------------------- evaluation


def batches(sets, problems_per_batch):
    """[(set name, batch number, [(index, problem), ...])] in a fixed order."""
    out = []
    for name, problems in sets.items():
        items = list(enumerate(problems))
        for b, start in enumerate(range(0, len(items), problems_per_batch)):
            out.append((name, b, items[start : start + problems_per_batch]))
    return out


def batch_seed(seed, name, b):
    """A seed per (seed, set, batch), stable across runs and machines (crc32, not hash())."""
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 1009 + b) % 2**63


def evaluate_batch(batch, *, policy, tokenizer, pool, grader, cfg, reward_fn=None, first_call=True):
    """The problem records of one batch (set name, batch number, [(index, problem)]): every
    problem's samples, graded."""
    name, b, items = batch
    k = cfg.samples
    prompts = []
    for index, p in items:
        ids = policies.chat_prompt_ids(tokenizer, p["problem"], cfg.system_prompt)
        if len(ids) >= cfg.max_total_tokens:
            raise data.DataError(
                f"{name}/{index}: the prompt has {len(ids)} tokens, --max_total_tokens is {cfg.max_total_tokens}"
            )
        prompts += [ids] * k
    torch.manual_seed(batch_seed(cfg.seed, name, b))
    run_cfg = rollout.RolloutConfig.of(cfg, temperature=cfg.temperature)
    with torch.no_grad(), mixed_precision(policy, policy.dtype):
        trajs = rollout.rollout(policy, tokenizer, prompts, pool=pool, cfg=run_cfg)
    rows = [p for _, p in items for _ in range(k)]
    scores = rewards.outcome_scores(trajs, rows, grader=grader, reward_fn=reward_fn)  # (N,)
    records = []
    for n, (index, p) in enumerate(items):
        samples = []
        for traj, value in zip(trajs[n * k : (n + 1) * k], scores[n * k : (n + 1) * k].tolist()):
            format_error = any(rewards.turn_format_penalties(traj.turns, first_call=first_call))
            samples.append(
                {**rewards.answer_record(traj), "correct": value >= 1, "score": value, "format_error": format_error}
            )
        records.append(
            {
                "key": f"{name}/{index}",
                "set": name,
                "index": index,
                "id": p.get("id"),
                "problem": p["problem"],
                "answer": p["answer"],
                "num_correct": sum(s["correct"] for s in samples),
                "samples": samples,
            }
        )
    return records


def read_partial(path, settings, sets):
    """{key: record} of an interrupted run. A last line cut by a kill mid-write is dropped from the
    file (its batch is redone); a file made with other settings or other problems is an error
    naming the difference."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    if not text.endswith("\n"):  # cut mid-write (or just before its newline)
        lines = lines[:-1]
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise data.DataError(f"{path}:{number}: not valid JSON; delete the file to start over") from None
    if not records:
        return {}
    if "settings" not in records[0]:
        raise data.DataError(f"{path}:1: not an eval.py partial report (no settings); delete the file")
    check_same_settings(path, records[0]["settings"], settings)
    return check_same_problems(path, records[1:], sets)


def check_same_settings(path, saved, settings):
    """Refuse records made with settings that change the results (labels such as
    temperature_from do not count)."""
    for k in (*RESULT_SETTINGS, "first_turn_tool_call"):
        if saved.get(k) != settings[k]:
            raise ConfigError(
                f"{path} was made with {k}={saved.get(k)!r}, this run has {k}={settings[k]!r}; "
                "use another --out or delete it"
            )


def check_same_problems(path, records, sets):
    """{key: record}, once every record is known to hold the problem its key names today."""
    for r in records:
        problems = sets.get(r["set"], [])
        if r["index"] >= len(problems) or problems[r["index"]]["problem"] != r["problem"]:
            raise data.DataError(
                f"{path}: {r['key']} holds another problem than the data now does "
                "(the data changed); use another --out or delete it"
            )
    return {r["key"]: r for r in records}


def records_so_far(cfg, settings, sets):
    """{key: record} of an interrupted run (OUT.partial.jsonl) or a finished one (OUT) with the
    same settings and problems; starts OUT.partial.jsonl when there is none."""
    partial = cfg.out + ".partial.jsonl"
    done = read_partial(partial, settings, sets)
    if not done:  # a new partial file: its first line holds the settings
        os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
        with open(partial, "w", encoding="utf-8") as f:
            f.write(json.dumps({"settings": settings}) + "\n")
    if os.path.exists(cfg.out):  # a finished report is never overwritten by another evaluation
        finished = reports.load_report(cfg.out)
        check_same_settings(cfg.out, finished.get("settings", {}), settings)
        done.update(check_same_problems(cfg.out, finished["problems"], sets))
    return done


def on_every_rank(fn, world):
    """fn() on rank 0, its result on every rank; an error raised by fn is raised on every rank
    (so no rank is left waiting in a collective)."""
    result, error = None, None
    if world.main:
        try:
            result = fn()
        except INPUT_ERRORS as e:
            error = e
    result, error = broadcast_object((result, error), world)
    if error is not None:
        raise error
    return result


def evaluate_round(todo, *, world, **job):
    """Each rank evaluates its batch of the round (the rank-th of todo, if any); every rank gets
    all records, in batch order. An error on any rank is raised on every rank."""
    records, error = [], None
    if world.rank < len(todo):
        try:
            records = evaluate_batch(todo[world.rank], **job)
        except INPUT_ERRORS as e:
            error = e
    parts = gather_objects((records, error), world)
    for _, e in parts:
        if e is not None:
            raise e
    return [rec for part, _ in parts for rec in part]


def run_evaluation(cfg, settings, world):
    """Evaluate every set, resuming from what an earlier run left; rank 0 appends each round's
    records to OUT.partial.jsonl, then writes OUT and returns the report."""
    sets = load_sets(cfg, world)
    scoring = {"reward_fn": rewards.load_reward_fn(cfg.reward_fn), "first_call": settings["first_turn_tool_call"]}
    done = {}  # key -> record, on rank 0

    def keys_so_far():
        done.update(records_so_far(cfg, settings, sets))
        return set(done)

    done_keys = on_every_rank(keys_so_far, world)
    per_batch = max(1, cfg.batch_size // cfg.samples)
    todo = [t for t in batches(sets, per_batch) if any(f"{t[0]}/{i}" not in done_keys for i, _ in t[2])]
    policy, tokenizer = load_policy(cfg, world)
    pool, grader = sandbox.Pool(cfg.sandbox_workers, timeout=cfg.sandbox_timeout), grading.Grader()
    total = sum(len(items) for _, _, items in todo)
    bar = tqdm(total=total, desc="eval", unit="problem", disable=not world.main, dynamic_ncols=True)
    try:
        for r in range(0, len(todo), world.size):
            round_todo = todo[r : r + world.size]
            records = evaluate_round(
                round_todo,
                world=world,
                policy=policy,
                tokenizer=tokenizer,
                pool=pool,
                grader=grader,
                cfg=cfg,
                **scoring,
            )
            if world.main:
                with open(cfg.out + ".partial.jsonl", "a", encoding="utf-8") as f:
                    f.writelines(json.dumps(rec) + "\n" for rec in records)
                done.update((rec["key"], rec) for rec in records)
            bar.update(sum(len(items) for _, _, items in round_todo))
    finally:
        bar.close()
        pool.close()
        grader.close()
    if not world.main:
        return None
    return write_report(cfg, settings=settings, sets=sets, done=done, environment=environment(world))


def load_policy(cfg, world):
    """The policy in the compute dtype (no master weights to keep), read by rank 0 and copied to
    the others, and its tokenizer."""
    torch.manual_seed(cfg.seed)  # the demo model's initialisation
    device = world.device if world.main else "meta"
    policy, tokenizer = policies.load_policy(
        cfg.model, device, dtype=world.dtype, demo_size=parse_demo_size(cfg.demo_size), seed=cfg.seed
    )
    return replicate(policy, world).eval(), tokenizer


def write_report(cfg, *, settings, sets, done, environment):
    """OUT from the records, in set and problem order (written to OUT.tmp, then renamed); the
    partial file goes once OUT is in place."""
    ordered = [done[f"{n}/{i}"] for n, problems in sets.items() for i in range(len(problems))]
    report = make_report(settings, ordered, environment=environment)
    with open(cfg.out + ".tmp", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    os.replace(cfg.out + ".tmp", cfg.out)
    os.remove(cfg.out + ".partial.jsonl")
    return report


# ---------------------------------------------------------------- figures


def pass_at_k(n, c, k):
    """The unbiased estimator of pass@k from n samples of which c are correct:
    1 - C(n - c, k) / C(n, k), the chance that k of the n drawn without replacement hold a
    correct one (computed as a product, so large n does not overflow)."""
    assert 0 <= c <= n and 1 <= k <= n, (n, c, k)
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_ks(n):
    """k = 1, 2, 4, ... below n, and n."""
    return sorted({2**e for e in range(int(math.log2(n)) + 1)} | {n})


def summarize(records):
    """The figures of a list of problem records (see the module docstring)."""
    samples = [s for r in records for s in r["samples"]]
    n = min(len(r["samples"]) for r in records)
    calls = [t for s in samples for t in s["turns"] if t["result"] is not None]
    mean = lambda values: float(np.mean(values)) if len(values) else 0.0  # noqa: E731
    return {
        "num_problems": len(records),
        "num_samples": n,
        "accuracy": mean([r["num_correct"] / len(r["samples"]) for r in records]),
        "pass_at_k": {
            str(k): mean([pass_at_k(len(r["samples"]), r["num_correct"], k) for r in records]) for k in pass_ks(n)
        },
        "mean_turns": mean([len(s["turns"]) for s in samples]),
        "tool_call_rate": mean([any(t["result"] is not None for t in s["turns"]) for s in samples]),
        "mean_tool_calls": len(calls) / len(samples),
        "tool_error_rate": mean([not t["result"]["ok"] for t in calls]),
        "format_error_rate": mean([s["format_error"] for s in samples]),
        "answer_rate": mean([s["answer"] is not None for s in samples]),
        "mean_tokens": mean([sum(t["tokens"] for t in s["turns"]) for s in samples]),
        "stop_reasons": {why: mean([s["stop"] == why for s in samples]) for why in rollout.STOP_REASONS},
    }


def make_report(settings, records, environment=None):
    """The report: figures over all sets at the top level, per set under "sets", the records, and
    the versions, threads and device they were measured with (parallel.environment)."""
    names = list(dict.fromkeys(r["set"] for r in records))
    per_set = {name: summarize([r for r in records if r["set"] == name]) for name in names}
    return {
        "kind": "eval",
        "settings": settings,
        "environment": environment,
        **summarize(records),
        "sets": per_set,
        "problems": records,
    }


def print_table(report):
    columns = ("accuracy", "pass@k", "turns", "tool calls", "tool err", "fmt err", "answered", "tokens")
    print(f"{'set':<16} {'problems':>8} " + " ".join(f"{c:>10}" for c in columns))
    rows = list(report["sets"].items())
    for name, s in rows + ([("all", report)] if len(rows) > 1 else []):
        k = max(s["pass_at_k"], key=int)
        values = (
            f"{s['accuracy']:.3f}",
            f"{s['pass_at_k'][k]:.3f}@{k}",
            f"{s['mean_turns']:.2f}",
            f"{s['tool_call_rate']:.3f}",
            f"{s['tool_error_rate']:.3f}",
            f"{s['format_error_rate']:.3f}",
            f"{s['answer_rate']:.3f}",
            f"{s['mean_tokens']:.0f}",
        )
        print(f"{name:<16} {s['num_problems']:>8} " + " ".join(f"{v:>10}" for v in values))


# ---------------------------------------------------------------- main


def main(cfg):
    """One mode: evaluate (--data), --compare, --show or --plot. On an error the process group is
    left without a barrier (every rank raises the same error, see on_every_rank)."""
    world = setup_distributed(cfg.device, cfg.compute_dtype)
    settings = resolve(cfg)
    if cfg.compare:
        if len(cfg.compare) != 2:
            raise ConfigError(f"--compare takes two reports, got {len(cfg.compare)}")
        result = reports.compare(*cfg.compare)
    elif cfg.show:
        result = reports.show(cfg)
    elif cfg.plot:
        result = reports.plot(cfg.plot, cfg.plot_out)
    else:
        # what auto chose on this device: a report states the dtype its figures were computed in
        settings["compute_dtype"] = next(flag for flag, dtype in DTYPES.items() if dtype == world.dtype)
        if world.main:
            print(json.dumps({"config": dataclasses.asdict(cfg), "settings": settings}, indent=1))
        result = run_evaluation(cfg, settings, world)
        if world.main:
            print_table(result)
            print(f"wrote {cfg.out}")
    finish(world)
    return result


if __name__ == "__main__":
    # every rank raises the same input error (see on_every_rank): rank 0 says it once
    cfg = parse_config(EvalConfig, prog="eval.py", description=__doc__)
    run_command(main, cfg, prog="eval.py", input_errors=INPUT_ERRORS, same_on_every_rank=True)
