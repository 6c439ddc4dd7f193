"""Benchmarks that print figures measured side by side in one run (never asserted in tests).

    python bench.py advantages            # GTPO's advantage pipeline + loss vs GRPO's, N=1024 K=8 L=4096
    python bench.py sandbox               # sandbox call latency vs a fresh `python -c` per call

Each benchmark alternates the variants it compares (A, B, A, B, ...) so that load from elsewhere
on a shared machine falls on both alike. It reports the median of all timed calls (the typical
cost) and the minimum (the cost with the least interference, as timeit recommends), and ratios.
"""

import argparse
import ctypes
import statistics
import subprocess
import sys
import time

import torch

import gtpo
import sandbox


def _times_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return times


def keep_freed_memory():
    """Ask glibc to reuse freed memory for large blocks, as PyTorch's caching allocator does on GPU.

    By default glibc serves every allocation over 32 MiB with a fresh mmap, so each (N, L) int64
    temporary (32 MiB at N=1024, L=4096) pays page faults that a GPU run never sees. Returns
    False where this is not glibc (the figures are then reported once, as measured).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1


def synthetic_batch(N, K, L, group_size, seed=0):
    """A batch shaped like multi-turn rollouts: a prompt, then per turn sampled tokens followed by
    tool output, for T_i turns in 1..K; binary turn rewards on the last turn plus format penalties."""
    g = torch.Generator().manual_seed(seed)
    num_turns = torch.randint(1, K + 1, (N,), generator=g)  # (N,)
    turn_mask = torch.arange(K)[None, :] < num_turns[:, None]  # (N, K)
    turn_rewards = torch.where(torch.rand(N, K, generator=g) < 0.1, -0.1, 0.0)
    last = torch.arange(K)[None, :] == (num_turns - 1)[:, None]
    turn_rewards = turn_rewards + last * torch.randint(0, 2, (N, 1), generator=g)  # (N, K)
    prompt = L // 16
    segment = (L - prompt) // K
    position = torch.arange(L)[None, :].expand(N, L)  # (N, L)
    turn = ((position - prompt) // segment).clamp(max=K - 1)
    sampled = (position >= prompt) & ((position - prompt) % segment < 0.7 * segment)
    token_turn = torch.where(sampled & (turn < num_turns[:, None]), turn, -1)  # (N, L)
    group_index = torch.arange(N) // group_size  # (N,)
    old_logp = -torch.rand(N, L, generator=g)  # (N, L)
    logp = (old_logp + 0.05 * torch.randn(N, L, generator=g)).requires_grad_(True)
    return dict(
        turn_rewards=turn_rewards,
        turn_mask=turn_mask,
        token_turn=token_turn,
        group_index=group_index,
        logp=logp,
        old_logp=old_logp,
    )


def bench_advantages(args):
    torch.manual_seed(0)
    b = synthetic_batch(args.N, args.K, args.L, args.group_size)
    loss_mask = b["token_turn"] >= 0  # (N, L)
    outcome = b["turn_rewards"].sum(dim=1)  # (N,) GRPO's one reward per trajectory

    def gtpo_advantages():
        returns = gtpo.discounted_returns(b["turn_rewards"], b["turn_mask"], args.gamma)
        turn_adv = gtpo.normalize(returns, b["turn_mask"], b["group_index"], args.mode)
        return gtpo.token_advantages(turn_adv, b["token_turn"])

    def grpo_token_advantages():
        adv = gtpo.grpo_advantages(outcome, b["group_index"])  # (N,)
        return torch.where(loss_mask, adv[:, None], 0.0)  # (N, L)

    def loss_step(make_advantages):
        adv = make_advantages()
        loss, _ = gtpo.policy_loss(b["logp"], b["old_logp"], adv, loss_mask)
        loss.backward()
        b["logp"].grad = None

    variants = {
        "adv GTPO": gtpo_advantages,
        "adv GRPO": grpo_token_advantages,
        "step GTPO": lambda: loss_step(gtpo_advantages),
        "step GRPO": lambda: loss_step(grpo_token_advantages),
    }
    print(
        f"N={args.N} K={args.K} L={args.L} group_size={args.group_size} mode={args.mode} "
        f"trained tokens={int(loss_mask.sum())} torch threads={torch.get_num_threads()}"
    )
    print(f"{'alloc':<8}{'stat':<8}{'what':<44}{'GTPO ms':>10}{'GRPO ms':>10}{'GTPO/GRPO':>11}")
    _report_advantages("glibc", _measure(variants, args))
    if keep_freed_memory():
        _report_advantages("reuse", _measure(variants, args))
    print("glibc: the default allocator; reuse: freed memory kept, as PyTorch's CUDA allocator does.")
    print("step: advantages + policy_loss forward + backward; the loss code is the same for both, so")
    print("'advantage cost / GRPO step' is the steadier figure of GTPO's overhead (goal: under 5%).")


def _measure(variants, args):
    for fn in variants.values():  # warm-up
        fn()
    samples = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            samples[name] += _times_ms(fn, args.repeats)
    return samples


def _report_advantages(allocator, samples):
    for stat, reduce in (("median", statistics.median), ("min", min)):
        ms = {name: reduce(v) for name, v in samples.items()}
        for label, key in (("advantages (returns, normalise, to tokens)", "adv"), ("step", "step")):
            a, g = ms[f"{key} GTPO"], ms[f"{key} GRPO"]
            print(f"{allocator:<8}{stat:<8}{label:<44}{a:>10.2f}{g:>10.2f}{a / g:>11.3f}")
        measured = 100 * (ms["step GTPO"] / ms["step GRPO"] - 1)
        steady = 100 * (ms["adv GTPO"] - ms["adv GRPO"]) / ms["step GRPO"]
        print(f"{allocator:<8}{stat:<8}{'overhead: measured steps':<44}{measured:>+30.1f}%")
        print(f"{allocator:<8}{stat:<8}{'overhead: advantage cost / GRPO step':<44}{steady:>+30.1f}%")


def _percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def bench_sandbox(args):
    print(
        f"isolation={sandbox.isolation()} warm calls={args.calls} starts={args.starts} "
        f"throughput: {args.batch} calls over {args.sessions} sessions, {args.workers} workers"
    )
    warm, fresh, cold = [], [], []
    with sandbox.Session(timeout=10) as session:
        session.run("x = 0")
        for i in range(args.calls):  # warm calls and fresh processes alternate
            warm += _times_ms(lambda: session.run("x += 1"), 1)
            if i % (args.calls // args.starts) == 0:
                fresh += _times_ms(lambda: subprocess.run([sys.executable, "-c", "x = 1"], check=True), 1)
    for _ in range(args.starts):

        def start_and_call():
            with sandbox.Session(timeout=10) as s:
                assert s.run("x = 1").ok

        cold += _times_ms(start_and_call, 1)

    with sandbox.Pool(max_workers=args.workers, timeout=10) as pool:
        sessions = [pool.session() for _ in range(args.sessions)]
        pool.run(sessions, ["x = 0"] * args.sessions)  # start every worker first
        codes = ["x += 1\nx"] * args.batch
        targets = [sessions[i % args.sessions] for i in range(args.batch)]
        start = time.perf_counter()
        for k in range(0, args.batch, args.sessions):  # one call per session at a time, like turns
            results = pool.run(targets[k : k + args.sessions], codes[k : k + args.sessions])
            assert all(r.ok for r in results)
        elapsed = time.perf_counter() - start

    p50 = statistics.median(warm)
    rows = [("warm call in a live session", warm, 3), ("cold: new session + first call + close", cold, 1),
            ("baseline: fresh `python -c` per call", fresh, 1)]  # fmt: skip
    print(f"{'what':<44}{'p50 ms':>10}{'p99 ms':>10}")
    for label, times, digits in rows:
        print(f"{label:<44}{statistics.median(times):>10.{digits}f}{_percentile(times, 99):>10.{digits}f}")
    speedup = statistics.median(fresh) / p50
    print(f"warm call vs fresh process: {speedup:.0f}x faster (goals: >= 10x, warm p50 < 2 ms)")
    print(f"throughput: {args.batch} calls in {elapsed:.3f} s = {args.batch / elapsed:.0f} calls/s")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="bench", required=True)
    adv = sub.add_parser("advantages", help="GTPO advantage pipeline + loss vs GRPO's")
    adv.add_argument("--N", type=int, default=1024, help="trajectories in the batch")
    adv.add_argument("--K", type=int, default=8, help="max turns per trajectory")
    adv.add_argument("--L", type=int, default=4096, help="tokens per padded sequence")
    adv.add_argument("--group_size", type=int, default=8, help="trajectories per problem (G)")
    adv.add_argument("--gamma", type=float, default=0.9, help="turn discount")
    adv.add_argument("--mode", choices=gtpo.MODES, default="group", help="normalisation set")
    adv.add_argument("--repeats", type=int, default=5, help="timed calls of each variant per round")
    adv.add_argument("--rounds", type=int, default=9, help="rounds alternating over the variants")
    sbx = sub.add_parser("sandbox", help="sandbox latency, start-up and throughput vs python -c")
    sbx.add_argument("--calls", type=int, default=1000, help="warm calls timed in one session")
    sbx.add_argument("--starts", type=int, default=20, help="cold starts and fresh processes timed")
    sbx.add_argument("--batch", type=int, default=256, help="short calls in the throughput test")
    sbx.add_argument("--sessions", type=int, default=32, help="concurrent sessions in the throughput test")
    sbx.add_argument("--workers", type=int, default=8, help="Pool max_workers in the throughput test")
    args = parser.parse_args()
    {"advantages": bench_advantages, "sandbox": bench_sandbox}[args.bench](args)


if __name__ == "__main__":
    main()
