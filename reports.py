"""Reading what eval.py and train.py wrote: two reports side by side with a paired bootstrap
interval (eval.py --compare), one problem's trajectories turn by turn as text or HTML (--show,
also a training sample dump with each turn's r, R and A), and training curves (--plot).

    compare("before.json", "after.json")      # per set: A, B, B - A and its 95% interval
    show(cfg)                                  # cfg.show, cfg.problem, cfg.html (config.EvalConfig)
    plot(["runs/demo/metrics.jsonl"], "")      # PNG curves (needs matplotlib)
"""

import html
import json
import os

import numpy as np

import data
from config import ConfigError

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
        [
            diff[rng.integers(0, len(diff), (min(1000, resamples - s), len(diff)))].mean(axis=1)
            for s in range(0, resamples, 1000)
        ]
    )
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
        rows.append(
            {
                "set": name,
                "problems": len(pairs),
                "a": float(np.mean(acc_a)),
                "b": float(np.mean(acc_b)),
                "diff": diff,
                "ci_low": low,
                "ci_high": high,
            }
        )
    print(f"A = {path_a}\nB = {path_b}")
    print(f"{'set':<16} {'problems':>8} {'A':>8} {'B':>8} {'B - A':>8}   paired bootstrap 95% CI")
    for r in rows:
        print(
            f"{r['set']:<16} {r['problems']:>8} {r['a']:>8.3f} {r['b']:>8.3f} {r['diff']:>+8.3f}   "
            f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        )
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
        raise data.DataError(f"{wanted!r} names several problems ({', '.join(r['key'] for r in found)}): give a key")
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
    return (
        f"sample {number}: {verdict}, answer {s['answer']!r}, stop {s['stop']}, {len(s['turns'])} turns, "
        f"{sum(t['tokens'] for t in s['turns'])} tokens trained, "
        f"{sum(t['observation_tokens'] for t in s['turns'])} masked"
    )


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
    out = [
        f"{record['key']}: {record['num_correct']}/{len(record['samples'])} correct",
        f"problem: {record['problem']}",
        f"gold answer: {record['answer']}",
        "(T| sampled by the policy, trained; M| tool output, masked)",
    ]
    for number, s in enumerate(record["samples"]):
        out += [f"\n=== {sample_header(s, number)}", *show_turns(s)]
    return "\n".join(out)


HTML_STYLE = """body{font-family:sans-serif;max-width:70em;margin:auto} pre{white-space:pre-wrap;margin:0}
.t{background:#e3f6e3} .m{background:#eee;color:#555} .turn{font-size:85%;color:#333;margin-top:.6em}
.correct{color:#070} .wrong{color:#a00} details{margin:.3em 0}"""


def show_html(records, title):
    """The problems as one HTML page: trained text on green, masked tool output on grey."""
    parts = [
        f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title><style>{HTML_STYLE}</style>",
        f"<h1>{html.escape(title)}</h1><p><span class=t>sampled by the policy (trained)</span> "
        "<span class=m>tool output (masked)</span></p>",
    ]
    for r in records:
        parts.append(
            f"<details><summary><b>{html.escape(r['key'])}</b> {r['num_correct']}/{len(r['samples'])} correct — "
            f"{html.escape(r['problem'][:120])}</summary><p>gold answer: {html.escape(str(r['answer']))}</p>"
        )
        for number, s in enumerate(r["samples"]):
            verdict = "correct" if s["correct"] else "wrong"
            parts.append(f"<details><summary class={verdict}>{html.escape(sample_header(s, number))}</summary>")
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
