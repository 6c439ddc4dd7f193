"""The paper's comparisons in miniature: GRPO against GTPO, the shaping ablation and the gamma
sweep, seeds x variants, each run trained by train.py from the same SFT start per seed; and the
check that the demo still gives its published figures.

    python -m tools.repro                                         # every variant, seeds 0 1 2, 40 RL steps
    python -m tools.repro --seeds 0 1 2 3 4 --jobs 2 --variants gtpo_code grpo -- --eval_samples 4
    python -m tools.repro --check_demo                            # python train.py, seed 0, vs the published summary
    python -m tools.repro --check_demo runs/demo/summary.json     # a finished demo run vs the published summary

Each seed gets its SFT start (train.py --max_steps 0, or a run directory given with --starts);
every variant (REPRO_VARIANTS: train.py flags) then trains --max_steps RL steps from it, and
eval.py measures each final checkpoint by kind of problem. Flags after -- go to every train.py
run. Resumable: finished runs and evaluations are read back, a cut run resumes from its last
checkpoint. Writes results.md (a table of mean +- standard error over seeds, the paired
differences from --baseline, GRPO by default, each variant's credit view: the mean advantage by
turn, tool call and end, and held-out accuracy by kind), results.json, curves.png and
credit.png to --out.

--check_demo runs `python train.py --seed S` (--seeds, default 0) at the published thread count
into --out/demo/seedS, or reads the summary.json files given, and compares each with
DEMO_REFERENCE: the summary figures, exactly, and the environment they were measured in
(parallel.environment). Exit code 0 when every figure is the published one, 1 when one differs,
2 when a summary cannot be read.
--publish writes DEMO_REFERENCE from the runs instead (after a deliberate change) and prints the
table docs/results.md shows.
"""

import argparse
import concurrent.futures
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # train.py and eval.py run here
REPRO_VARIANTS = {  # name -> train.py flags (everything else: the demo's defaults)
    "grpo": ["--algo", "grpo"],
    "gtpo_no_shaping": ["--shaping", "none"],
    "gtpo_code": [],  # the paper's GTPO: gamma 0.9, similarity shaping on the code
    "gtpo_text": ["--shaping", "text"],  # shaping on the whole trajectory text
    "gamma_0.5": ["--gamma", "0.5"],
    "gamma_0.7": ["--gamma", "0.7"],
    "gamma_1.0": ["--gamma", "1.0"],  # gamma 0.9 is gtpo_code
    "gtpo_turn_norm": ["--adv_norm", "turn"],  # returns normalised per (problem, turn index)
    "gtpo_batch_norm": ["--adv_norm", "batch"],  # returns normalised over the whole batch's turns
    "gtpo_filter_groups": ["--filter_groups"],  # DAPO's dynamic sampling
    "gtpo_mask_truncated": ["--mask_truncated"],  # no loss on trajectories cut off by a token limit
    "gtpo_mask_void": ["--mask_void_turns"],  # SimpleTIR's void-turn filter
}


def in_parallel(args, fn, items):
    """[fn(*item) for item in items], args.jobs at a time (threads; the work is in subprocesses)."""
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        return list(pool.map(lambda item: fn(*item), items))


def child_env(args):
    """The environment of train.py and eval.py runs: the cores shared out over --jobs."""
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    return dict(os.environ, OMP_NUM_THREADS=str(threads)) if args.jobs > 1 else None


def demo_tuning():
    """The demo's own settings of every train.py flag whose default follows --model, as flags:
    an RL run from a checkpoint directory would otherwise get a real model's (lr 1e-6, turns of
    1,024 tokens), under which the demo's policy does not move in 40 steps."""
    import config

    return [
        f"--{name}={demo}" for name, (demo, _) in config.MODEL_DEFAULTS.items() if name not in ("out_dir", "sft_steps")
    ]


def rl_command(args, variant, seed, start, out):
    """train.py's command of one RL run: the demo's tuning, the variant's flags, then --'s."""
    return [
        sys.executable,
        "train.py",
        "--model",
        os.path.join(start, "checkpoints", "step_0"),
        "--sft_steps",
        "0",
        "--seed",
        str(seed),
        "--max_steps",
        str(args.max_steps),
        "--out_dir",
        out,
        *demo_tuning(),
        *REPRO_VARIANTS[variant],
        *args.train_flags,
    ]


def repro_run(args, variant, seed, start):
    """One train.py RL run from an SFT start (resumed if cut; skipped once summary.json exists)."""
    out = os.path.join(args.out, variant, f"seed{seed}")
    if not os.path.exists(os.path.join(out, "summary.json")):
        os.makedirs(out, exist_ok=True)
        command = rl_command(args, variant, seed, start, out)
        started = time.time()
        with open(os.path.join(out, "log.txt"), "a") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=child_env(args))
        if done.returncode:
            sys.exit(f"tools.repro: {variant} seed {seed} failed; see {out}/log.txt")
        print(f"{variant:<16} seed {seed}: {(time.time() - started) / 60:.1f} min", flush=True)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    return summary, metrics


def repro_start(args, seed, index):
    """The SFT start of a seed: the given run directory, or one made here (train.py --max_steps 0)."""
    if args.starts:
        return args.starts[index]
    start = os.path.join(args.out, f"sft_seed{seed}")
    if not os.path.exists(os.path.join(start, "summary.json")):
        command = [
            sys.executable,
            "train.py",
            "--seed",
            str(seed),
            "--max_steps",
            "0",
            "--out_dir",
            start,
            *args.train_flags,
        ]
        os.makedirs(start, exist_ok=True)
        with open(os.path.join(start, "log.txt"), "a") as log:
            if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=child_env(args)).returncode:
                sys.exit(f"tools.repro: SFT of seed {seed} failed; see {start}/log.txt")
    return start


def mean_se(values):
    """(mean, standard error over seeds) of the values that exist."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return statistics.fmean(values), se


def steps_to(metrics, threshold, window=5):
    """The first RL step at which the mean training accuracy of the last `window` steps reaches
    threshold (None if never)."""
    for k in range(len(metrics)):
        recent = metrics[max(0, k - window + 1) : k + 1]
        if statistics.fmean(r["accuracy"] for r in recent) >= threshold:
            return metrics[k]["step"]
    return None


STEP_TIMES = ("t_rollout", "t_reward", "t_old_logp", "t_update")  # a step's seconds, in metrics.jsonl


def repro_row(variant, runs, threshold):
    """A results row: held-out accuracy after RL and its change from the start, sampled and
    greedy, (mean, SE) over seeds; steps to the threshold; per step, the zero-advantage groups,
    turns, seconds, groups drawn and the share of trajectories masked out of the loss."""
    row = {"variant": variant, "seeds": len(runs)}
    for kind in ("sampled", "greedy"):
        row[f"{kind}_after"] = mean_se([s[f"after_rl_{kind}"] for s, _ in runs])
        gains = [s[f"after_rl_{kind}"] - s[f"before_rl_{kind}"] for s, _ in runs if s[f"before_rl_{kind}"] is not None]
        row[f"{kind}_gain"] = mean_se(gains)
    reached = [steps_to(m, threshold) for _, m in runs]
    row["steps_to_threshold"] = mean_se(reached)
    row["reached_threshold"] = sum(r is not None for r in reached)
    row["zero_adv_groups"] = mean_se([statistics.fmean(r["zero_adv_groups"] for r in m) for _, m in runs])
    row["turns"] = mean_se([statistics.fmean(r["turns"] for r in m) for _, m in runs])
    row["seconds_per_step"] = mean_se([statistics.fmean(sum(r[t] for t in STEP_TIMES) for r in m) for _, m in runs])
    for key in ("groups_drawn", "masked"):  # None for runs of a train.py without the controls
        row[key] = mean_se([statistics.fmean(r[key] for r in m) if key in m[0] else None for _, m in runs])
    return row


def repro_table(rows, threshold):
    """The results as a Markdown table (mean ± standard error over seeds)."""
    fmt = lambda ms, scale=100, digits=1, unit="": (
        "—" if ms[0] is None else f"{scale * ms[0]:.{digits}f} ± {scale * ms[1]:.{digits}f}{unit}"
    )  # noqa: E731
    columns = [
        "variant",
        "seeds",
        "sampled after RL",
        "sampled gain",
        "greedy after RL",
        "greedy gain",
        f"steps to train acc {threshold:.2f} (seeds)",
        "zero-adv groups",
        "turns",
        "s / step",
        "groups drawn / step",
        "masked",
    ]
    lines = [
        "| " + " | ".join(columns) + " |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        steps = (
            "—"
            if r["steps_to_threshold"][0] is None
            else f"{fmt(r['steps_to_threshold'], 1)} ({r['reached_threshold']})"
        )
        lines.append(
            f"| {r['variant']} | {r['seeds']} | {fmt(r['sampled_after'])} | {fmt(r['sampled_gain'])} | "
            f"{fmt(r['greedy_after'])} | {fmt(r['greedy_gain'])} | {steps} | "
            f"{fmt(r['zero_adv_groups'], unit='%')} | {fmt(r['turns'], 1, 2)} | "
            f"{fmt(r['seconds_per_step'], 1, 1)} | {fmt(r['groups_drawn'], 1, 1)} | "
            f"{fmt(r['masked'], unit='%')} |"
        )
    return "\n".join(lines)


T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)  # Student t, df 1..10


def repro_paired(finished, variants, seeds, baseline="grpo", kind="sampled", effect=0.03):
    """Each variant against the baseline, seed by seed (both trained from the same SFT start):
    the mean difference of held-out accuracy after RL, its 95% t-interval over seeds, and the
    seeds a difference of `effect` would need to be found at that spread (a paired test at 5%
    with 80% power: n = ((1.96 + 0.84) sd / effect)^2, normal approximation)."""
    lines = [
        f"| {kind} accuracy after RL, minus {baseline} | seeds | mean | 95% interval | per seed | "
        f"seeds for {100 * effect:.0f} points |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    rows = []
    for variant in variants:
        if variant == baseline:
            continue
        diffs = [
            finished[variant, s][0][f"after_rl_{kind}"] - finished[baseline, s][0][f"after_rl_{kind}"] for s in seeds
        ]
        mean, se = mean_se(diffs)
        sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        half = T_975[len(diffs) - 2] * se if 2 <= len(diffs) <= len(T_975) + 1 else float("nan")
        need = math.ceil(((1.96 + 0.84) * sd / effect) ** 2) if sd == sd else None
        rows.append(
            {
                "variant": variant,
                "diffs": diffs,
                "mean": mean,
                "interval": [mean - half, mean + half],
                "seeds_for_effect": need,
            }
        )
        lines.append(
            f"| {variant} | {len(diffs)} | {100 * mean:+.1f} | [{100 * (mean - half):+.1f}, "
            f"{100 * (mean + half):+.1f}] | {', '.join(f'{100 * d:+.0f}' for d in diffs)} | {need} |"
        )
    return "\n".join(lines), rows


def repro_family_accuracy(args, checkpoint, out):
    """Held-out accuracy on the toy task's two-step and one-step problems: eval.py on the same 100
    held-out problems as train.py, --eval_samples per problem at T = 1 (the training
    temperature); skipped when its report exists."""
    import tasks

    if not os.path.exists(out):
        command = [
            sys.executable,
            "eval.py",
            "--model",
            checkpoint,
            "--data",
            "toy",
            "--samples",
            str(args.eval_samples),
            "--temperature",
            "1",
            "--system_prompt",
            "none",
            "--out",
            out,
        ]
        done = subprocess.run(command, capture_output=True, text=True, env=child_env(args))
        if done.returncode:
            sys.exit(f"tools.repro: evaluating {checkpoint} failed: {done.stderr[-2000:]}")
    with open(out) as f:
        report = json.load(f)
    two_step = {k for k, p in enumerate(tasks.toy_held_out(100)) if p["family"] in tasks.TWO_STEP_FAMILIES}
    split = {"two_step": [], "one_step": []}
    for r in report["problems"]:
        split["two_step" if r["index"] in two_step else "one_step"].append(r["num_correct"] / len(r["samples"]))
    return {"all": report["accuracy"], **{k: statistics.fmean(v) for k, v in split.items()}}


def repro_family_table(starts, finals):
    """Sampled held-out accuracy, all problems and by kind: the SFT start, and per variant after RL
    and its gain over the start (mean ± SE over seeds). starts: {seed: split}; finals: {variant:
    {seed: split}}."""
    pct = lambda ms: f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"  # noqa: E731
    kinds = ("all", "two_step", "one_step")
    start = [cell for k in kinds for cell in (pct(mean_se([s[k] for s in starts.values()])), "")]
    lines = [
        "| run | all problems | gain | two-step problems | gain | one-step problems | gain |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        "| SFT start | " + " | ".join(start) + " |",
    ]
    for variant, by_seed in finals.items():
        cells = []
        for kind in kinds:
            cells.append(pct(mean_se([by_seed[s][kind] for s in by_seed])))
            cells.append(pct(mean_se([by_seed[s][kind] - starts[s][kind] for s in by_seed])))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def repro_mean_curve(runs, path, fields):
    """The seeds' mean of each metric per RL step, as a metrics.jsonl (for eval.py's plot)."""
    steps = min(len(m) for _, m in runs)
    with open(path, "w") as f:
        for i in range(steps):
            mean = {k: statistics.fmean(m[i][k] for _, m in runs) for k in fields if k in runs[0][1][i]}
            f.write(json.dumps({"step": runs[0][1][i]["step"], **mean}) + "\n")
    return path


def repro_credit(runs):
    """A variant's credit view (metrics.credit_view) over every RL step of every seed: each cell's
    mean advantage and turns, and the two shares as (mean, SE) over seeds; None for runs that
    logged no credit view."""
    records = [r for _, m in runs for r in m if "credit" in r]
    if not records:
        return None
    turns = {cell: sum(r["credit"][cell][1] for r in records) for cell in records[0]["credit"]}
    weighted = lambda cell: sum(r["credit"][cell][0] * r["credit"][cell][1] for r in records if r["credit"][cell][1])
    cells = {cell: [weighted(cell) / n if n else None, n] for cell, n in turns.items()}
    shares = {
        k: mean_se([statistics.fmean(r[k] for r in m) for _, m in runs])
        for k in ("credit_neg_correct", "credit_pos_error")
    }
    return {"cells": cells, **shares}


def repro_credit_table(variant, credit):
    """A variant's credit view as Markdown: a row per turn index, a column per (tool call, end),
    each the mean advantage (and turns), then the two shares."""
    columns = list(dict.fromkeys(cell.split("/", 1)[1] for cell in credit["cells"]))  # "call/end"
    turns = list(dict.fromkeys(cell.split("/", 1)[0] for cell in credit["cells"]))
    text = lambda mean, n: "—" if mean is None else f"{mean:+.2f} ({n})"
    lines = [
        f"credit view, {variant}: mean advantage (turns) by turn and the turn's tool call / the trajectory's end",
        "",
        "| turn | " + " | ".join(c.replace("/", ", ") for c in columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for j in turns:
        lines.append(f"| {j} | " + " | ".join(text(*credit["cells"][f"{j}/{c}"]) for c in columns) + " |")
    (neg, neg_se), (pos, pos_se) = credit["credit_neg_correct"], credit["credit_pos_error"]
    lines += [
        "",
        f"turns of correct trajectories with A < 0: {100 * neg:.1f} ± {100 * neg_se:.1f}%; "
        f"erroring tool calls' turns with A > 0: {100 * pos:.1f} ± {100 * pos_se:.1f}% (mean ± SE over seeds)",
    ]
    return "\n".join(lines)


def repro_credit_plot(credits, path):
    """Each variant's mean advantage by turn index, a line per (tool call, end), as one PNG;
    skipped with a message without matplotlib (optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no credit figure: it needs matplotlib (pip install matplotlib)")
        return None
    fig, axes = plt.subplots(1, len(credits), figsize=(4.5 * len(credits), 3.6), sharey=True, squeeze=False)
    for ax, (variant, credit) in zip(axes[0], credits.items()):
        columns = dict.fromkeys(cell.split("/", 1)[1] for cell in credit["cells"])
        for column in columns:
            points = [
                (int(c.split("/")[0]), m)
                for c, (m, _) in credit["cells"].items()
                if c.split("/", 1)[1] == column and m is not None
            ]
            if points:
                ax.plot(*zip(*points), marker="o", label=column.replace("/", ", "))
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(variant)
        ax.set_xlabel("turn")
    axes[0][0].set_ylabel("mean advantage")
    axes[0][-1].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def repro_by_kind(args, starts):
    """({seed: start's split}, {variant: {seed: final checkpoint's split}}) of two-step and
    one-step held-out accuracy (see repro_family_accuracy)."""
    seeds = list(starts)
    start_split = dict(
        zip(
            seeds,
            in_parallel(
                args,
                repro_family_accuracy,
                [
                    (
                        args,
                        os.path.join(starts[seed], "checkpoints", "step_0"),
                        os.path.join(args.out, f"start_seed{seed}_eval.json"),
                    )
                    for seed in seeds
                ],
            ),
        )
    )
    pairs = [(variant, seed) for variant in args.variants for seed in args.seeds]
    runs = [os.path.join(args.out, variant, f"seed{seed}") for variant, seed in pairs]
    splits = in_parallel(
        args,
        repro_family_accuracy,
        [
            (args, os.path.join(run, "checkpoints", f"step_{args.max_steps}"), os.path.join(run, "eval_final.json"))
            for run in runs
        ],
    )
    finals = {variant: {} for variant in args.variants}
    for (variant, seed), split in zip(pairs, splits):
        finals[variant][seed] = split
    return start_split, finals


def run(args):
    """GRPO, GTPO without shaping, with code shaping, with whole-text shaping, and the gamma sweep,
    each from the same SFT start per seed. Resumable: finished runs and evaluations are read back,
    a cut run resumes from its last checkpoint. Writes results.md, results.json, curves.png
    (the seeds' mean curves) and credit.png (the credit views; both need matplotlib) to --out."""
    import reports

    starts = dict(
        zip(args.seeds, in_parallel(args, repro_start, [(args, seed, k) for k, seed in enumerate(args.seeds)]))
    )
    pairs = [(variant, seed) for variant in args.variants for seed in args.seeds]
    finished = dict(zip(pairs, in_parallel(args, repro_run, [(args, v, seed, starts[seed]) for v, seed in pairs])))
    rows, curves = [], []
    for variant in args.variants:
        runs = [finished[variant, seed] for seed in args.seeds]
        rows.append(repro_row(variant, runs, args.threshold))
        curves.append(repro_mean_curve(runs, os.path.join(args.out, variant, "mean_metrics.jsonl"), reports.PLOTTED))
    table = repro_table(rows, args.threshold)
    results = {"seeds": args.seeds, "max_steps": args.max_steps, "train_flags": args.train_flags, "rows": rows}
    if args.baseline in args.variants and len(args.seeds) > 1:
        for kind in ("sampled", "greedy"):
            paired, results[f"paired_with_{args.baseline}_{kind}"] = repro_paired(
                finished, args.variants, args.seeds, baseline=args.baseline, kind=kind
            )
            table += "\n\n" + paired
    credits = {variant: repro_credit([finished[variant, seed] for seed in args.seeds]) for variant in args.variants}
    credits = {variant: credit for variant, credit in credits.items() if credit}
    for variant, credit in credits.items():
        table += "\n\n" + repro_credit_table(variant, credit)
    results["credit"] = credits
    if credits:
        repro_credit_plot(credits, os.path.join(args.out, "credit.png"))
    if args.eval_samples:
        results["by_kind_start"], results["by_kind_final"] = repro_by_kind(args, starts)
        table += "\n\n" + repro_family_table(results["by_kind_start"], results["by_kind_final"])
    print(table)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    try:
        reports.plot(curves, os.path.join(args.out, "curves.png"))
    except reports.ConfigError as e:  # matplotlib is optional
        print(f"no plot: {e}")
    return rows


# ---------------------------------------------------------------- the demo's published figures

DEMO_REFERENCE = os.path.join(ROOT, "docs", "demo_reference.json")
DEMO_FIGURES = ("sft_steps_done", "before_rl_sampled", "before_rl_greedy", "after_rl_sampled", "after_rl_greedy")
DEMO_SETTINGS = ("algo", "rl_steps", "eval_samples", "temperature", "held_out_problems")  # what makes it the demo


def cannot_check(message):
    """End the command with exit code 2: nothing was compared (1 means a figure differs)."""
    print(f"tools.repro: {message}", file=sys.stderr)
    sys.exit(2)


def demo_run(args, seed, threads):
    """summary.json of `python train.py --seed S` at `threads` torch threads (None: torch's default)
    in a new run directory: an existing one may hold older code's figures, so it is refused."""
    out = os.path.abspath(os.path.join(args.out, "demo", f"seed{seed}"))
    if os.path.exists(out):
        cannot_check(f"{out} exists: compare it with --check_demo {out}/summary.json, or delete it to rerun")
    os.makedirs(out)
    print(
        f"python train.py --seed {seed} --out_dir {out}  ({threads or 'default'} threads; log: {out}/log.txt)",
        flush=True,
    )
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with open(os.path.join(out, "log.txt"), "a") as log:
        done = subprocess.run(
            [sys.executable, "train.py", "--seed", str(seed), "--out_dir", out],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
    if done.returncode:
        cannot_check(f"the demo with seed {seed} failed; see {out}/log.txt")
    return os.path.join(out, "summary.json")


def read_summary(path):
    """A demo run's summary.json; anything else (missing, unreadable, another run's settings) ends
    the command naming it, since comparing it would blame the code for a difference of settings."""
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError) as e:
        cannot_check(f"{path}: not a train.py summary.json ({e})")
    missing = [k for k in ("seed", *DEMO_FIGURES, *DEMO_SETTINGS) if not isinstance(summary, dict) or k not in summary]
    if missing:
        cannot_check(f"{path}: not a train.py summary.json (no {', '.join(missing)})")
    return summary


def verdict(moved, differ, published):
    """What a comparison means, in one line (usage.md explains it at length); differ: the
    environment fields that differ from the published ones."""
    if not moved:
        return "the published figures, exactly"
    if not differ:
        return (
            "different figures in the published environment: the code now computes something else than when "
            "they were published (a regression, or an intended change to republish with --publish)"
        )
    advice = []
    if differ - {"threads", "cpu_capability", "device", "ranks"}:
        advice.append("install with -c constraints.txt (torch: its CPU wheel)")
    if "threads" in differ:
        advice.append(f"set OMP_NUM_THREADS={published['threads']}")
    if "cpu_capability" in differ:
        advice.append(f"torch's {published['cpu_capability']} kernels (ATEN_CPU_CAPABILITY can only lower them)")
    if differ & {"device", "ranks"}:
        advice.append(f"{published['device']}, {published['ranks']} process")
    return (
        "different figures in another environment: consistent with float rounding, which SFT's stopping "
        "step amplifies (docs/results.md#how-far-the-figures-move); to tell, rerun in the published one"
        + (": " + "; ".join(advice) if advice else "")
    )


def check_demo(paths, reference):
    """Compare each summary.json with the published one of its seed: the figures exactly, the
    environment field by field. Prints what differs and what it means; True if no figure does."""
    print(f"published: docs/demo_reference.json ({reference['command']})")
    same = True
    for path in paths:
        summary = read_summary(path)
        published = reference["summaries"].get(str(summary["seed"]))
        if published is None:
            cannot_check(f"{path}: seed {summary['seed']} has no published figures")
        other = [f"{k} {summary[k]} (the demo's: {published[k]})" for k in DEMO_SETTINGS if summary[k] != published[k]]
        if other:
            cannot_check(f"{path}: not the demo's settings: {', '.join(other)}")
        moved = [k for k in DEMO_FIGURES if summary[k] != published[k]]
        env, published_env = summary.get("environment"), reference["environment"]
        differ = [k for k in published_env if (env or {}).get(k) != published_env[k]]  # all, if not recorded
        print(f"\nseed {summary['seed']}: {path}")
        print(f"{'':<20} {'published':>10} {'here':>10}")
        for k in DEMO_FIGURES:
            print(f"{k:<20} {published[k]:>10} {summary[k]:>10}{'   differs' if k in moved else ''}")
        changes = "; ".join(f"{k}: {published_env[k]} -> {(env or {}).get(k, 'unknown')}" for k in differ)
        print("environment: " + (changes or "the published one"))
        print("result: " + verdict(moved, set(differ), published_env))
        same = same and not moved
    return same


def publish_demo(paths):
    """Write DEMO_REFERENCE from these runs' summary.json (one environment for all) and return the
    markdown table docs/results.md shows."""
    summaries = sorted((read_summary(path) for path in paths), key=lambda s: s["seed"])
    if any("environment" not in s for s in summaries):
        cannot_check("--publish: a run without a recorded environment cannot be published")
    if len({json.dumps(s["environment"], sort_keys=True) for s in summaries}) != 1:
        cannot_check("--publish: the runs were measured in different environments")
    reference = {
        "command": f"python train.py --seed S (OMP_NUM_THREADS={summaries[0]['environment']['threads']})",
        "environment": summaries[0]["environment"],
        "summaries": {str(s["seed"]): {k: s[k] for k in (*DEMO_FIGURES, *DEMO_SETTINGS)} for s in summaries},
    }
    with open(DEMO_REFERENCE, "w") as f:
        json.dump(reference, f, indent=1)
        f.write("\n")
    return demo_table(reference)


def demo_table(reference):
    """The published figures as docs/results.md's table."""
    lines = [
        "| seed | SFT steps | sampled: before RL (after SFT) → after RL | greedy: before → after |",
        "| --- | --- | --- | --- |",
    ]
    for seed, f in reference["summaries"].items():
        moves = []
        for kind in ("sampled", "greedy"):
            before, after = f[f"before_rl_{kind}"], f[f"after_rl_{kind}"]
            points = f"{round(100 * (after - before)):+d}".replace("-", "−")
            moves.append(f"{before:.2f} → {after:.2f} ({points})")
        lines.append(f"| {seed} | {f['sft_steps_done']} | {moves[0]} | {moves[1]} |")
    return "\n".join(lines)


def demo(args):
    """--check_demo and --publish: the exit code. The seeds are checked against the published ones
    before anything runs, since a run takes minutes."""
    reference = None
    try:
        with open(DEMO_REFERENCE) as f:
            reference = json.load(f)
    except (OSError, ValueError) as e:
        if not args.publish:  # --publish replaces it
            cannot_check(f"no published figures to compare with: {e}")
    seeds = args.seeds or ([int(k) for k in reference["summaries"]] if args.publish and reference else [0])
    if reference and not args.publish and not args.check_demo:
        unknown = [s for s in seeds if str(s) not in reference["summaries"]]
        if unknown:
            cannot_check(f"--seeds: no published figures for seed {', '.join(map(str, unknown))}")
    threads = reference["environment"]["threads"] if reference else None
    paths = args.check_demo or [demo_run(args, seed, threads) for seed in seeds]
    if args.publish:
        print(publish_demo(paths))
        return 0
    return 0 if check_demo(paths, reference) else 1


def add_demo_flags(parser):
    """--check_demo and --publish: the demo's published figures."""
    parser.add_argument(
        "--check_demo",
        nargs="*",
        metavar="SUMMARY",
        help="compare the demo's summary.json with the published one (docs/demo_reference.json): "
        "the files given, or python train.py run here for --seeds; exit code 0: the published "
        "figures, 1: a figure differs, 2: nothing could be compared",
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help="with --check_demo: write docs/demo_reference.json from these runs instead "
        "(after a deliberate change) and print docs/results.md's table",
    )


def make_parser():
    parser = argparse.ArgumentParser(
        prog="python -m tools.repro", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="seeds (each its own SFT start); default 0 1 2, and 0 with --check_demo"
    )
    parser.add_argument(
        "--starts",
        nargs="*",
        default=[],
        help="a run directory per seed to start RL from "
        "(its checkpoints/step_0); default: SFT each seed here with train.py --max_steps 0",
    )
    parser.add_argument(
        "--variants", nargs="+", default=list(REPRO_VARIANTS), choices=list(REPRO_VARIANTS), help="which runs"
    )
    parser.add_argument(
        "--baseline",
        default="grpo",
        choices=list(REPRO_VARIANTS),
        help="the variant every other is paired with, seed by seed",
    )
    parser.add_argument("--max_steps", type=int, default=40, help="RL steps per run")
    parser.add_argument("--threshold", type=float, default=0.5, help="training accuracy (5-step mean) to reach")
    parser.add_argument("--out", default="runs/repro", help="where the runs and results go")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once, the cores shared out among them (OMP_NUM_THREADS); 2 on a 2-core machine",
    )
    parser.add_argument(
        "--eval_samples",
        type=int,
        default=4,
        help="samples per held-out problem in the by-kind evaluation of each run (0: skip it)",
    )
    parser.add_argument("train_flags", nargs=argparse.REMAINDER, help="after --: more train.py flags for every run")
    add_demo_flags(parser)
    return parser


def main():
    parser = make_parser()
    args = parser.parse_args()
    args.train_flags = [f for f in args.train_flags if f != "--"]
    if args.check_demo is not None:
        if args.train_flags or args.starts or (args.seeds and args.check_demo):
            parser.error(
                "--check_demo takes SUMMARY files or --seeds, and no train.py flags or --starts "
                f"(got {' '.join(args.train_flags + args.starts) or '--seeds with files'})"
            )
        sys.exit(demo(args))
    if args.publish:
        parser.error("--publish goes with --check_demo")
    args.seeds = args.seeds or [0, 1, 2]
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: must be at least 1")
    if args.starts and len(args.starts) != len(args.seeds):
        parser.error(f"--starts: give one run directory per seed ({len(args.seeds)})")
    run(args)


if __name__ == "__main__":
    main()
