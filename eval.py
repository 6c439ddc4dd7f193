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
rewards.extract_answer finds), mean tokens (sampled tokens per trajectory). On an error, every
rank raises it (no rank is left waiting in a collective) and it is printed once.
"""

import dataclasses
import html
import json
import math
import os
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import data
import model as policies
import rewards
import rollout
import sandbox
from launch import (
    COMPUTE_DTYPES, DTYPES, ConfigError, arg, broadcast_object, check_fields, environment, finish, gather_objects,
    mixed_precision, parse_config, parse_demo_size, replicate, run_command, setup_distributed,
)  # fmt: skip


@dataclass
class Config:
    # --- evaluate
    model: str = arg("", "checkpoint directory, hub id, or 'demo' (an untrained tiny Qwen2)")
    data: list[str] = arg([], "problem sets: .jsonl, .json, .parquet, 'hf:NAME[:CONFIG][:SPLIT]', or 'toy' "
                          "(the demo's held-out set)")
    problem_key: str = arg("auto", "column of the problem text (dotted path; see train.py --help)")
    answer_key: str = arg("auto", "column of the gold answer (dotted path; '#### N' and \\boxed{} solutions "
                          "give their final answer)")
    reward_fn: str = arg("auto", "'file.py:function' or 'module:function' grading instead of the built-in "
                         "grader (see train.py --help); auto: training's, else none (the built-in grader)")
    out: str = arg("report.json", "the JSON report (its partial records go to OUT.partial.jsonl)")
    samples: int = arg(1, "trajectories per problem (k of pass@k)", valid=">= 1")
    temperature: float = arg(None, "sampling temperature; 0 is greedy (default: 0 with --samples 1, else "
                             "training's temperature, else 1.0)", valid=">= 0")
    top_p: float = arg(1.0, "nucleus sampling", valid="(0, 1]")
    max_turns: int = arg(None, "model turns per trajectory (default: training's, else 4)", valid=">= 1")
    max_turn_tokens: int = arg(None, "tokens sampled per turn (default: training's, else 512)", valid=">= 1")
    max_total_tokens: int = arg(None, "prompt + turns + tool outputs (default: training's, else 2048)", valid=">= 2")
    system_prompt: str = arg("auto", "'auto' (training's, else model.SYSTEM_PROMPT), 'none', or text")
    train_config: str = arg(
        "auto", "training's config.json ('auto': RUN/config.json for RUN/checkpoints/step_N)"
    )
    seed: int = arg(0, "sampling seed (each batch is seeded from it, the set and the batch number)",
                    valid="[0, 2147483647]")
    batch_size: int = arg(64, "trajectories per batch (whole problems; part of the seeding)", valid=">= 1")
    rollout_batch_size: int = arg(None, "trajectories of a batch generated at once (0: all; default: "
                                  "training's, else 0); bounds the KV cache, not the result", valid=">= 0")
    limit: int = arg(0, "evaluate only the first N problems of each set (0: all)", valid=">= 0")
    demo_size: str = arg("128x3", "hidden size x layers of --model demo")
    device: str = arg("auto", "where to run (auto: cuda if available)", valid=("auto", "cuda", "cpu"))
    compute_dtype: str = arg("auto", "dtype of the weights and forward passes; auto: bf16 on GPUs that "
                             "compute it natively (A100, H100, RTX 30xx on), fp32 on older GPUs and the CPU",
                             valid=COMPUTE_DTYPES)
    sandbox_workers: int = arg(8, "tool calls run at once per rank", valid=">= 1")
    sandbox_timeout: float = arg(10.0, "seconds per tool call", valid="> 0")
    # --- the other modes
    compare: list[str] = arg([], "two reports A B: accuracy side by side, B - A, paired bootstrap 95% CI")
    show: str = arg("", "a report or training sample dump to view turn by turn")
    problem: str = arg("", "with --show: the problem (key, id or index); empty lists the problems")
    html: bool = arg(False, "with --show: write an HTML view next to the file instead of printing")
    plot: list[str] = arg([], "training metrics.jsonl files to draw as PNG curves (needs matplotlib)")
    plot_out: str = arg("", "the PNG (default: metrics.png next to the first metrics file)")


INPUT_ERRORS = (ConfigError, data.DataError, rewards.RewardFnError, OSError)  # one error line, no traceback

# Settings that change what the evaluation produces: a resumed run must match them exactly.
RESULT_SETTINGS = ("model", "data", "problem_key", "answer_key", "reward_fn", "samples", "temperature", "top_p",
                   "max_turns", "max_turn_tokens", "max_total_tokens", "system_prompt", "seed", "batch_size",
                   "limit", "demo_size", "sandbox_timeout", "compute_dtype")  # fmt: skip


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
        raise ConfigError(
            f"--samples {cfg.samples} with --temperature 0: every sample would be the same greedy one"
        )
    if cfg.reward_fn == "auto":
        cfg.reward_fn = trained.get("reward_fn", "none") if trained else "none"
    for name, default in (("max_turns", 4), ("max_turn_tokens", 512), ("max_total_tokens", 2048),
                          ("rollout_batch_size", 0)):  # fmt: skip
        if getattr(cfg, name) is None:
            setattr(cfg, name, trained.get(name, default) if trained else default)
    if cfg.system_prompt == "auto" and trained and "system_prompt" not in trained:
        raise ConfigError("the training config.json does not record its system prompt: give --system_prompt")
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
            problems = data.toy_held_out(100)
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
            raise data.DataError(f"{name}/{index}: the prompt has {len(ids)} tokens, --max_total_tokens is "
                                 f"{cfg.max_total_tokens}")  # fmt: skip
        prompts += [ids] * k
    torch.manual_seed(batch_seed(cfg.seed, name, b))
    run_cfg = rollout.RolloutConfig(max_turns=cfg.max_turns, max_turn_tokens=cfg.max_turn_tokens,
                                    max_total_tokens=cfg.max_total_tokens, temperature=cfg.temperature,
                                    top_p=cfg.top_p, batch_size=cfg.rollout_batch_size)  # fmt: skip
    with torch.no_grad(), mixed_precision(policy, policy.dtype):
        trajs = rollout.rollout(policy, tokenizer, prompts, pool=pool, cfg=run_cfg)
    rows = [p for _, p in items for _ in range(k)]
    scores = rewards.outcome_scores(trajs, rows, grader=grader, reward_fn=reward_fn)  # (N,)
    records = []
    for n, (index, p) in enumerate(items):
        samples = []
        for traj, value in zip(trajs[n * k : (n + 1) * k], scores[n * k : (n + 1) * k].tolist()):
            format_error = any(rewards.turn_format_penalties(traj.turns, first_call=first_call))
            samples.append({**rewards.answer_record(traj), "correct": value >= 1, "score": value,
                            "format_error": format_error})  # fmt: skip
        records.append({"key": f"{name}/{index}", "set": name, "index": index, "id": p.get("id"),
                        "problem": p["problem"], "answer": p["answer"],
                        "num_correct": sum(s["correct"] for s in samples), "samples": samples})  # fmt: skip
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
        if k not in saved:
            raise ConfigError(f"{path} was made by an older eval.py (no {k} in its settings); "
                              "use another --out or delete it")  # fmt: skip
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
            raise data.DataError(f"{path}: {r['key']} holds another problem than the data now does "
                                 "(the data changed); use another --out or delete it")  # fmt: skip
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
        report = load_report(cfg.out)
        check_same_settings(cfg.out, report.get("settings", {}), settings)
        done.update(check_same_problems(cfg.out, report["problems"], sets))
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
    grading = {"reward_fn": rewards.load_reward_fn(cfg.reward_fn),
               "first_call": settings["first_turn_tool_call"]}  # fmt: skip
    done = {}  # key -> record, on rank 0

    def keys_so_far():
        done.update(records_so_far(cfg, settings, sets))
        return set(done)

    done_keys = on_every_rank(keys_so_far, world)
    per_batch = max(1, cfg.batch_size // cfg.samples)
    todo = [t for t in batches(sets, per_batch) if any(f"{t[0]}/{i}" not in done_keys for i, _ in t[2])]
    torch.manual_seed(cfg.seed)
    policy, tokenizer = policies.load_policy(  # in the compute dtype: no master weights to keep
        cfg.model, world.device if world.main else "meta", dtype=world.dtype,  # read once, by rank 0
        demo_size=parse_demo_size(cfg.demo_size), seed=cfg.seed,
    )
    replicate(policy, world)
    policy.eval()
    pool, grader = sandbox.Pool(cfg.sandbox_workers, timeout=cfg.sandbox_timeout), rewards.Grader()
    total = sum(len(items) for _, _, items in todo)
    bar = tqdm(total=total, desc="eval", unit="problem", disable=not world.main, dynamic_ncols=True)
    try:
        for r in range(0, len(todo), world.size):
            round_todo = todo[r : r + world.size]
            records = evaluate_round(round_todo, world=world, policy=policy, tokenizer=tokenizer, pool=pool,
                                     grader=grader, cfg=cfg, **grading)  # fmt: skip
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
        "num_problems": len(records), "num_samples": n,
        "accuracy": mean([r["num_correct"] / len(r["samples"]) for r in records]),
        "pass_at_k": {str(k): mean([pass_at_k(len(r["samples"]), r["num_correct"], k) for r in records]) for k in pass_ks(n)},
        "mean_turns": mean([len(s["turns"]) for s in samples]),
        "tool_call_rate": mean([any(t["result"] is not None for t in s["turns"]) for s in samples]),
        "mean_tool_calls": len(calls) / len(samples),
        "tool_error_rate": mean([not t["result"]["ok"] for t in calls]),
        "format_error_rate": mean([s["format_error"] for s in samples]),
        "answer_rate": mean([s["answer"] is not None for s in samples]),
        "mean_tokens": mean([sum(t["tokens"] for t in s["turns"]) for s in samples]),
        "stop_reasons": {why: mean([s["stop"] == why for s in samples]) for why in rollout.STOP_REASONS},
    }  # fmt: skip


def make_report(settings, records, environment=None):
    """The report: figures over all sets at the top level, per set under "sets", the records, and
    the versions, threads and device they were measured with (launch.environment)."""
    names = list(dict.fromkeys(r["set"] for r in records))
    per_set = {name: summarize([r for r in records if r["set"] == name]) for name in names}
    return {"kind": "eval", "settings": settings, "environment": environment, **summarize(records), "sets": per_set,
            "problems": records}  # fmt: skip


def print_table(report):
    columns = ("accuracy", "pass@k", "turns", "tool calls", "tool err", "fmt err", "answered", "tokens")
    print(f"{'set':<16} {'problems':>8} " + " ".join(f"{c:>10}" for c in columns))
    rows = list(report["sets"].items())
    for name, s in rows + ([("all", report)] if len(rows) > 1 else []):
        k = max(s["pass_at_k"], key=int)
        values = (f"{s['accuracy']:.3f}", f"{s['pass_at_k'][k]:.3f}@{k}", f"{s['mean_turns']:.2f}", f"{s['tool_call_rate']:.3f}",
                  f"{s['tool_error_rate']:.3f}", f"{s['format_error_rate']:.3f}", f"{s['answer_rate']:.3f}",
                  f"{s['mean_tokens']:.0f}")  # fmt: skip
        print(f"{name:<16} {s['num_problems']:>8} " + " ".join(f"{v:>10}" for v in values))


# ---------------------------------------------------------------- comparing two reports


def load_report(path):
    """An eval report or a training sample dump, with a clear error for anything else."""
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except FileNotFoundError:
        raise data.DataError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise data.DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(report, dict) or not isinstance(report.get("problems"), list):
        raise data.DataError(f"{path}: not an eval.py report or a train.py sample dump (no 'problems' list)")
    return report


def paired_bootstrap(a, b, resamples=10_000, seed=0):
    """(mean of b - a, 2.5th and 97.5th percentiles of that mean over problems resampled with
    replacement): a and b (P,) are per-problem accuracies of the same problems."""
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)  # (P,)
    rng = np.random.default_rng(seed)
    means = np.concatenate(
        [diff[rng.integers(0, len(diff), (min(1000, resamples - s), len(diff)))].mean(axis=1)
         for s in range(0, resamples, 1000)]
    )  # fmt: skip
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def compare(path_a, path_b):
    """Per set, on the problems both reports hold: A's and B's accuracy, B - A, its paired
    bootstrap 95% CI. Prints the table and returns its rows."""
    a, b = load_report(path_a), load_report(path_b)
    for path, report in ((path_a, a), (path_b, b)):
        if report.get("kind") != "eval":
            raise data.DataError(f"{path}: --compare takes eval.py reports (this is {report.get('kind')!r})")
    for part in ("settings", "environment"):  # the model is what is compared; anything else is noted
        sa, sb = a.get(part) or {}, b.get(part) or {}
        for k in sorted(set(sa) | set(sb)):
            if k != "model" and sa.get(k) != sb.get(k):
                print(f"note: {k} differs: A {sa.get(k)!r}, B {sb.get(k)!r}")
    by_key = {r["key"]: r for r in b["problems"]}
    rows = []
    for name in dict.fromkeys(r["set"] for r in a["problems"]):
        pairs = [(r, by_key[r["key"]]) for r in a["problems"] if r["set"] == name and r["key"] in by_key]
        for ra, rb in pairs:
            if ra["problem"] != rb["problem"]:
                raise data.DataError(f"{ra['key']}: a different problem in {path_a} and {path_b}")
        if not pairs:
            continue
        acc_a = [ra["num_correct"] / len(ra["samples"]) for ra, _ in pairs]
        acc_b = [rb["num_correct"] / len(rb["samples"]) for _, rb in pairs]
        diff, low, high = paired_bootstrap(acc_a, acc_b)
        rows.append({"set": name, "problems": len(pairs), "a": float(np.mean(acc_a)), "b": float(np.mean(acc_b)),
                     "diff": diff, "ci_low": low, "ci_high": high})  # fmt: skip
    print(f"A = {path_a}\nB = {path_b}")
    print(f"{'set':<16} {'problems':>8} {'A':>8} {'B':>8} {'B - A':>8}   paired bootstrap 95% CI")
    for r in rows:
        print(f"{r['set']:<16} {r['problems']:>8} {r['a']:>8.3f} {r['b']:>8.3f} {r['diff']:>+8.3f}   "
              f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]")  # fmt: skip
    if not rows:
        print("no problem is in both reports")
    return rows


# ---------------------------------------------------------------- the trajectory view


def find_problem(report, wanted):
    """The record whose key, id or index is `wanted`; none or several is an error."""
    found = [r for r in report["problems"] if wanted in (r.get("key"), str(r.get("id")), str(r.get("index")))]
    if len(found) == 1:
        return found[0]
    if found:
        raise data.DataError(
            f"{wanted!r} names several problems ({', '.join(r['key'] for r in found)}): give a key"
        )
    keys = ", ".join(r["key"] for r in report["problems"][:5])
    raise data.DataError(f"no problem {wanted!r} in the file (keys: {keys}, ...)")


def turn_header(j, turn):
    values = [
        f"{name} {turn[key]:+.3f}"
        for key, name in (("reward", "r"), ("return", "R"), ("advantage", "A"))
        if key in turn
    ]
    return " · ".join([f"turn {j + 1}", f"{turn['tokens']} tokens trained", *values])


def sample_header(s, number):
    verdict = "correct" if s["correct"] else "wrong"
    return (f"sample {number}: {verdict}, answer {s['answer']!r}, stop {s['stop']}, {len(s['turns'])} turns, "
            f"{sum(t['tokens'] for t in s['turns'])} tokens trained, "
            f"{sum(t['observation_tokens'] for t in s['turns'])} masked")  # fmt: skip


def show_turns(sample):
    """A trajectory record's turns as lines: T| what the policy sampled (trained), M| the tool
    output fed back (masked), each turn headed by its token count and, in a training dump, its
    reward r, return R and advantage A."""
    out = []
    for j, turn in enumerate(sample["turns"]):
        out.append(f"--- {turn_header(j, turn)}")
        out += ["T| " + line for line in turn["text"].split("\n")]
        if turn["observation_tokens"]:
            result = turn["result"] or {}
            status = "ok" if result.get("ok") else "timed out" if result.get("timed_out") else "error"
            out.append(f"--- tool output ({status}, {turn['observation_tokens']} tokens masked)")
            out += ["M| " + line for line in turn["observation"].strip("\n").split("\n")]
    return out


def show_text(record):
    """One problem and all its samples, turn by turn (see show_turns)."""
    out = [f"{record['key']}: {record['num_correct']}/{len(record['samples'])} correct",
           f"problem: {record['problem']}", f"gold answer: {record['answer']}",
           "(T| sampled by the policy, trained; M| tool output, masked)"]  # fmt: skip
    for number, s in enumerate(record["samples"]):
        out += [f"\n=== {sample_header(s, number)}", *show_turns(s)]
    return "\n".join(out)


HTML_STYLE = """body{font-family:sans-serif;max-width:70em;margin:auto} pre{white-space:pre-wrap;margin:0}
.t{background:#e3f6e3} .m{background:#eee;color:#555} .turn{font-size:85%;color:#333;margin-top:.6em}
.correct{color:#070} .wrong{color:#a00} details{margin:.3em 0}"""


def show_html(records, title):
    """The problems as one HTML page: trained text on green, masked tool output on grey."""
    parts = [f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{HTML_STYLE}</style>",
             f"<h1>{html.escape(title)}</h1><p><span class=t>sampled by the policy (trained)</span> "
             "<span class=m>tool output (masked)</span></p>"]  # fmt: skip
    for r in records:
        parts.append(f"<details><summary><b>{html.escape(r['key'])}</b> {r['num_correct']}/{len(r['samples'])} correct — "
                     f"{html.escape(r['problem'][:120])}</summary><p>gold answer: {html.escape(str(r['answer']))}</p>")  # fmt: skip
        for number, s in enumerate(r["samples"]):
            verdict = "correct" if s["correct"] else "wrong"
            parts.append(
                f"<details><summary class={verdict}>{html.escape(sample_header(s, number))}</summary>"
            )
            for j, turn in enumerate(s["turns"]):
                parts.append(f"<div class=turn>{html.escape(turn_header(j, turn))}</div>")
                parts.append(f"<pre class=t>{html.escape(turn['text'])}</pre>")
                if turn["observation_tokens"]:
                    parts.append(f"<pre class=m>{html.escape(turn['observation'])}</pre>")
            parts.append("</details>")
        parts.append("</details>")
    return "\n".join(parts)


def show(cfg):
    report = load_report(cfg.show)
    if cfg.html:
        records = [find_problem(report, cfg.problem)] if cfg.problem else report["problems"]
        path = os.path.splitext(cfg.show)[0] + ".html"
        with open(path, "w", encoding="utf-8") as f:
            f.write(show_html(records, os.path.basename(cfg.show)))
        print(f"wrote {path} ({len(records)} problems)")
    elif cfg.problem:
        print(show_text(find_problem(report, cfg.problem)))
    else:
        for r in report["problems"]:
            print(f"{r['key']:<20} {r['num_correct']}/{len(r['samples'])} correct  {r['problem'][:70]!r}")


# ---------------------------------------------------------------- training curves


PLOTTED = ("reward", "accuracy", "turns", "tool_errors", "format_errors", "kl", "zero_adv_groups", "length")


def read_metrics(path):
    """train.py's metrics.jsonl: one record per RL step."""
    return data.read_jsonl(path, lambda obj, where: obj, "metrics")


def moving_average(values, window):
    """The mean of each value and the window - 1 before it (fewer at the start)."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    starts = np.maximum(np.arange(1, len(values) + 1) - window, 0)
    return (sums[1:] - sums[starts]) / (np.arange(1, len(values) + 1) - starts)


def plot(paths, out):
    """train.py's metrics.jsonl files as one PNG: a panel per figure, a line per run (faint: each
    step; solid: the mean of the last 5 steps)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib, an optional dependency: pip install matplotlib") from None
    runs = {path: read_metrics(path) for path in paths}
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), sharex=True)
    for ax, name in zip(axes.flat, PLOTTED):
        for path, records in runs.items():
            points = [(r["step"], r[name]) for r in records if name in r]
            if points:
                steps, values = map(np.array, zip(*points))
                raw = ax.plot(steps, values, alpha=0.3)[0]
                label = os.path.basename(os.path.dirname(os.path.abspath(path)))
                ax.plot(steps, moving_average(values, 5), color=raw.get_color(), label=label)
        ax.set_title(name)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("RL step")
    axes.flat[0].legend(fontsize="small")
    fig.tight_layout()
    out = out or os.path.join(os.path.dirname(os.path.abspath(paths[0])), "metrics.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"wrote {out}")
    return out


# ---------------------------------------------------------------- main


def main(cfg):
    """One mode: evaluate (--data), --compare, --show or --plot. On an error the process group is
    left without a barrier (every rank raises the same error, see on_every_rank)."""
    world = setup_distributed(cfg.device, cfg.compute_dtype)
    settings = resolve(cfg)
    if cfg.compare:
        if len(cfg.compare) != 2:
            raise ConfigError(f"--compare takes two reports, got {len(cfg.compare)}")
        result = compare(*cfg.compare)
    elif cfg.show:
        result = show(cfg)
    elif cfg.plot:
        result = plot(cfg.plot, cfg.plot_out)
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
    cfg = parse_config(Config, prog="eval.py", description=__doc__)
    run_command(main, cfg, prog="eval.py", input_errors=INPUT_ERRORS, same_on_every_rank=True)
