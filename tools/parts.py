"""The parts of an RL step timed against their alternatives, side by side in one run (never
asserted in tests): GTPO's advantages and loss against GRPO's, the sandbox against a fresh
`python -c`, the multi-turn rollout against plain generate (and the log-prob pass's memory),
grading and shaping against a rollout step, one RL step's time split. `python bench.py
NAME --help` gives each one's flags.

Each benchmark alternates the variants it compares (A, B, A, B, ...) so that load from elsewhere
on a shared machine falls on both alike. It reports the median of all timed calls (the typical
cost) and the minimum (the cost with the least interference, as timeit recommends), and ratios.
"""

import ctypes
import dataclasses
import gc
import os
import statistics
import subprocess
import sys
import time
from unittest import mock

import torch
from transformers import GenerationConfig

import config
import grading
import gtpo
import model
import parallel
import rewards
import rollout
import sandbox
import sft

QWEN = os.path.expanduser("~/.cache/gtpo/qwen2.5-coder-0.5b-instruct")  # ../shared/tools/get-qwen2.5-coder-0.5b.sh


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


def advantages_flags(sub):
    """`advantages` and its flags."""
    adv = sub.add_parser("advantages", help="GTPO advantage pipeline + loss vs GRPO's")
    adv.add_argument("--N", type=int, default=1024, help="trajectories in the batch")
    adv.add_argument("--K", type=int, default=8, help="max turns per trajectory")
    adv.add_argument("--L", type=int, default=4096, help="tokens per padded sequence")
    adv.add_argument("--group_size", type=int, default=8, help="trajectories per problem (G)")
    adv.add_argument("--gamma", type=float, default=0.9, help="turn discount")
    adv.add_argument("--mode", choices=gtpo.MODES, default="group", help="normalisation set")
    adv.add_argument("--repeats", type=int, default=5, help="timed calls of each variant per round")
    adv.add_argument("--rounds", type=int, default=9, help="rounds alternating over the variants")
    adv.set_defaults(run=bench_advantages)


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


def sandbox_flags(sub):
    """`sandbox` and its flags."""
    sbx = sub.add_parser("sandbox", help="sandbox latency, start-up and throughput vs python -c")
    sbx.add_argument("--calls", type=int, default=1000, help="warm calls timed in one session")
    sbx.add_argument("--starts", type=int, default=20, help="cold starts and fresh processes timed")
    sbx.add_argument(
        "--block",
        type=int,
        default=5,
        help="starts of one variant in a row before the next (1: each start right after the others, its caches cold)",
    )
    sbx.add_argument("--batch", type=int, default=256, help="short calls in the throughput test")
    sbx.add_argument("--sessions", type=int, default=32, help="concurrent sessions in the throughput test")
    sbx.add_argument("--workers", type=int, default=8, help="Pool max_workers in the throughput test")
    sbx.set_defaults(run=bench_sandbox)


def bench_sandbox(args):
    print(
        f"isolation={sandbox.isolation()} warm calls={args.calls} starts={args.starts} "
        f"throughput: {args.batch} calls over {args.sessions} sessions, {args.workers} workers"
    )
    warm, fresh, cold, own = [], [], [], []
    live = sandbox.Session(timeout=10)
    live.run("x = 0")

    def start_and_call(template=None):
        with sandbox.Session(timeout=10, template=template) as s:
            assert s.run("x = 1").ok

    def own_template():  # a Python start-up per session, as every session paid before the template
        template = sandbox.Template(sandbox.isolation())
        start_and_call(template)
        template.close()

    block = args.block  # each variant runs `block` times in a row (a trainer starts sessions in bursts)
    for _ in range(args.starts // block):  # the blocks alternate, so that all share the machine's state
        warm += _times_ms(lambda: live.run("x += 1"), args.calls * block // args.starts)
        cold += _times_ms(start_and_call, block)
        own += _times_ms(own_template, block)
        fresh += _times_ms(lambda: subprocess.run([sys.executable, "-I", "-c", "x = 1"], check=True), block)
    live.close()

    elapsed = sandbox_throughput(args)
    rows = [
        ("warm call in a live session", warm, 3),
        ("cold: new session + first call + close", cold, 2),
        ("  the same, in a new template (Python start)", own, 2),
        ("baseline: fresh `python -I -c` per call", fresh, 2),
    ]
    print(f"{'what':<48}{'p50 ms':>10}{'p99 ms':>10}")
    for label, times, digits in rows:
        print(f"{label:<48}{statistics.median(times):>10.{digits}f}{_percentile(times, 99):>10.{digits}f}")
    p50 = {label: statistics.median(times) for label, times, _ in rows}
    cold_p50, fresh_p50 = p50[rows[1][0]], p50[rows[3][0]]
    print(
        f"cold session / fresh python -I -c: {cold_p50 / fresh_p50:.2f} (goals: <= 0.5, cold p50 <= 5 ms); "
        f"the template saves {1 - cold_p50 / p50[rows[2][0]]:.0%} of a session's start-up"
    )
    print(f"warm call vs fresh process: {fresh_p50 / p50[rows[0][0]]:.0f}x faster (goals: >= 10x, warm p50 < 2 ms)")
    print(f"throughput: {args.batch} calls in {elapsed:.3f} s = {args.batch / elapsed:.0f} calls/s")


def sandbox_throughput(args):
    """Seconds for args.batch short calls over args.sessions live sessions, one call per session
    at a time (as turns are), through a Pool of args.workers."""
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
    return elapsed


THREE_TURNS = [
    "First the product.\n```python\na = 12345 * 6789\nprint(a)\n```",
    "Now its remainder.\n```python\nb = a % 97\nprint(b)\n```",
    "Check the square.\n```python\nprint(b * b)\n```",
]


def memorised_tiny_policy(tokenizer, problems, hidden_size, steps=150):
    """A tiny model trained to answer every problem with the same three tool-call turns, so that
    its rollouts have exactly three turns (a random model would stop at its length limit)."""
    with sandbox.Session() as session:
        prompts = [model.chat_prompt_ids(tokenizer, p) for p in problems]
        trajs = [rollout.teacher_trajectory(tokenizer, p, THREE_TURNS, session) for p in prompts]
    return memorise(model.tiny_model(tokenizer, hidden_size=hidden_size, num_hidden_layers=4), trajs, steps)


def memorise(policy, trajs, steps):
    """policy trained for `steps` full-batch steps on the trajectories' sampled tokens."""
    batch = rollout.collate(trajs, policy.config.pad_token_id)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    policy.train()
    for _ in range(steps):
        logp = model.token_logprobs(policy, batch["input_ids"], batch["attention_mask"])
        loss = sft.nll(logp, batch["loss_mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return policy.eval()


def peak_rss_increase_mb(fn):
    """Peak resident memory during fn() above the resident memory before it (Linux: the
    high-water mark is reset through /proc/self/clear_refs first)."""

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, or it counts as "before"
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS:")
    fn()
    return status("VmHWM:") - before


def rollout_problems(n):
    """n problems worded so that an instruct model calls the tool at once, and again to check."""
    return [
        f"Compute 12345 * 6789 modulo {97 + i}. Start your reply with a ```python code block and nothing "
        "before it; after seeing its output, check the result with a second code block, then give "
        "the \\boxed{} answer."
        for i in range(n)
    ]


def rollout_flags(sub):
    """`rollout` and its flags."""
    rol = sub.add_parser("rollout", help="multi-turn rollout vs plain generate; log-prob pass memory")
    rol.add_argument("--model", default="demo", help="a checkpoint directory to measure after the demo model")
    rol.add_argument("--batch", type=int, default=8, help="rollouts at once")
    rol.add_argument("--max_turns", type=int, default=3, help="turns per trajectory")
    rol.add_argument("--max_turn_tokens", type=int, default=96, help="tokens sampled per turn at most")
    rol.add_argument("--max_total_tokens", type=int, default=1024, help="tokens per trajectory at most")
    rol.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy)")
    rol.add_argument("--hidden_size", type=int, default=256, help="width of the demo model")
    rol.add_argument("--rounds", type=int, default=3, help="rounds alternating the variants")
    rol.add_argument("--chunk_tokens", type=int, default=256, help="positions per log-prob chunk")
    rol.add_argument("--parts", choices=("all", "speed", "memory"), default="all", help="what to measure")
    rol.add_argument("--activation_checkpointing", action="store_true", help="in the memory test")
    rol.add_argument("--logprob_batch", type=int, default=2, help="sequences in the log-prob memory test")
    rol.add_argument("--logprob_len", type=int, default=512, help="tokens per sequence in that test")
    rol.set_defaults(run=bench_rollout)


def bench_rollout(args):
    """The demo model always; then the checkpoint given with --model, if any."""
    for name in ["demo"] + ([args.model] if args.model != "demo" else []):
        torch.manual_seed(0)
        problems = rollout_problems(args.batch)
        if name == "demo":
            tokenizer = model.tiny_tokenizer()
            policy = memorised_tiny_policy(tokenizer, problems, args.hidden_size)
        else:
            policy, tokenizer = model.load_policy(name)
        print(
            f"model={name} params={sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M "
            f"vocab={len(tokenizer)} threads={torch.get_num_threads()}"
        )
        if args.parts in ("all", "speed"):
            _bench_rollout_speed(policy, tokenizer, problems, args)
        if args.parts in ("all", "memory"):
            _bench_logprob_memory(policy, tokenizer, args)
        print()


def _bench_rollout_speed(policy, tokenizer, problems, args):
    prompts = [model.chat_prompt_ids(tokenizer, p) for p in problems]
    print(f"batch={args.batch} max_turns={args.max_turns} T={args.temperature} rounds={args.rounds}")
    cfg = rollout.RolloutConfig(
        max_turns=args.max_turns,
        max_turn_tokens=args.max_turn_tokens,
        max_total_tokens=args.max_total_tokens,
        temperature=args.temperature,
    )
    print(f"{'what':<52}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}{'turns':>7}{'ratio':>7}")
    with sandbox.Pool(max_workers=8, timeout=10) as pool:
        rates = {}
        for _ in range(args.rounds):  # alternate the variants
            for reuse, warm in ((True, True), (False, True), (True, False)):
                cfg.kv_reuse = reuse
                if warm:  # as in training, where spares start while the policy is updated
                    pool.prewarm(len(prompts), wait=True)
                start = time.perf_counter()
                trajs = rollout.rollout(policy, tokenizer, prompts, pool, cfg)
                seconds = time.perf_counter() - start
                tokens = sum(sum(t.loss_mask) for t in trajs)
                turns = sum(len(t.turns) for t in trajs) / len(trajs)
                label = f"multi-turn, kv_reuse={reuse}, {'prewarmed' if warm else 'cold'} sandboxes"
                rates.setdefault(label, []).append((tokens, seconds, turns))
            per_row = max(1, tokens // len(prompts))
            seconds = plain_generate_seconds(policy, tokenizer, prompts, per_row, cfg.temperature)
            rates.setdefault("plain model.generate, same tokens", []).append((per_row * len(prompts), seconds, 1.0))
    plain_rate = statistics.median(t / s for t, s, _ in rates["plain model.generate, same tokens"])
    for label, runs in rates.items():
        tokens, seconds, turns = (statistics.median(x) for x in zip(*runs))
        rate = statistics.median(t / s for t, s, _ in runs)
        print(f"{label:<52}{tokens:>8.0f}{seconds:>9.2f}{rate:>10.1f}{turns:>7.2f}{rate / plain_rate:>7.2f}")
    print("ratio = tokens/s against plain generate (goal: >= 0.7 with 3 turns)")
    return statistics.median(t / s for t, s, _ in rates["multi-turn, kv_reuse=True, prewarmed sandboxes"]) / plain_rate


def plain_generate_seconds(policy, tokenizer, prompts, per_row, temperature):
    """Seconds of transformers' own sampler at the same temperature generating per_row tokens for
    each prompt, nothing else: no stopping, no tools."""
    ids, mask = (t.to(policy.device) for t in rollout.left_pad(prompts, tokenizer.pad_token_id))
    plain = GenerationConfig(
        do_sample=temperature > 0,
        num_beams=1,
        temperature=temperature or 1.0,
        top_p=1.0,
        top_k=0,
        min_p=None,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        max_new_tokens=per_row,
        min_new_tokens=per_row,
        pad_token_id=tokenizer.pad_token_id,
    )
    start = time.perf_counter()
    policy.generate(input_ids=ids, attention_mask=mask, generation_config=plain)
    return time.perf_counter() - start


def _bench_logprob_memory(policy, tokenizer, args):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (args.logprob_batch, args.logprob_len), generator=g)
    mask = torch.ones_like(ids)

    def chunked():
        return model.token_logprobs(policy, ids, mask, chunk_tokens=args.chunk_tokens)

    def naive():
        logits = policy(ids, attention_mask=mask, position_ids=model.position_ids_of(mask)).logits.float()
        return logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])

    policy.train()
    if args.activation_checkpointing:  # as when training a large model: activations stop dominating
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for backward in (False, True):
        for variant, fn in (("chunked token_logprobs", chunked), ("naive full logits", naive)):

            def run():
                with torch.set_grad_enabled(backward):
                    logp = fn()
                    if backward:
                        logp.sum().backward()

            run()  # warm-up: one-time allocations, and the parameters' .grad buffers, come first
            mb = peak_rss_increase_mb(run)
            what = "forward + backward" if backward else "forward, no grad"
            print(f"log-prob pass, {what:<18} {variant:<24}: peak +{mb:8.1f} MiB, {tuple(ids.shape)} tokens")
    policy.zero_grad(set_to_none=True)
    print(f"(activation checkpointing {'on' if args.activation_checkpointing else 'off'})")


def synthetic_answers(n, seed=0):
    """(final turn text, gold) pairs in the mix math RL sees: mostly integers, some fractions and
    decimals, a few expressions that need sympy; about half of them wrong."""
    import random

    rng = random.Random(seed)
    pairs = []
    for k in range(n):
        a, b = rng.randint(1, 999), rng.randint(2, 99)
        kind = k % 10
        gold, right = (f"\\frac{{{a}}}{{{b}}}", f"{a / b:.12g}") if kind == 8 else (str(a), str(a))
        if kind == 9:
            gold, right = f"{a}x+{b}", f"{b}+{a}x"
        pred = right if rng.random() < 0.5 else str(a + 1)
        pairs.append((f"So the answer is \\boxed{{{pred}}}.", gold))
    return pairs


def rewards_flags(sub):
    """`rewards` and its flags."""
    rew = sub.add_parser("rewards", help="grading throughput and shaping cost next to a rollout step")
    rew.add_argument("--N", type=int, default=512, help="trajectories graded and shaped")
    rew.add_argument("--group_size", type=int, default=8, help="trajectories per problem (G)")
    rew.add_argument("--rollout_n", type=int, default=64, help="trajectories in the timed rollout step")
    rew.add_argument("--hidden_size", type=int, default=256, help="width of the demo model")
    rew.set_defaults(run=bench_rewards)


def bench_rewards(args):
    tokenizer = model.tiny_tokenizer()
    policy = memorised_tiny_policy(tokenizer, [f"Problem {i}" for i in range(8)], args.hidden_size)
    problems = [f"Problem {i % 8}" for i in range(args.rollout_n)]
    cfg = rollout.RolloutConfig(max_turns=3, max_turn_tokens=96, max_total_tokens=1024, temperature=0.7)
    with sandbox.Pool(max_workers=8, timeout=10) as pool:
        pool.prewarm(len(problems), wait=True)
        start = time.perf_counter()
        trajs = rollout.rollout(policy, tokenizer, [model.chat_prompt_ids(tokenizer, p) for p in problems], pool, cfg)
        rollout_seconds = time.perf_counter() - start
    print(
        f"rollout step: {len(trajs)} trajectories of the demo model, 3 turns: {rollout_seconds:.2f} s "
        f"({1000 * rollout_seconds / len(trajs):.1f} ms per trajectory)"
    )

    grader = grading.Grader()
    pairs = synthetic_answers(args.N)
    grader.equal("x+x", "2x")  # start the sympy sandbox outside the timing
    start = time.perf_counter()
    correct = [grader.equal(grading.extract_answer(text), gold) for text, gold in pairs]
    t_grading = time.perf_counter() - start
    grader.close()
    share = t_grading / args.N / (rollout_seconds / len(trajs))
    print(
        f"grading: {args.N} answers in {t_grading:.3f} s = {args.N / t_grading:.0f} answers/s "
        f"({sum(correct)} correct; 10% need sympy)"
    )
    print(f"grading per trajectory vs rollout per trajectory: {100 * share:.2f}%")

    codes = [rewards.trajectory_code(trajs[i % len(trajs)]) for i in range(args.N)]
    group_index = torch.arange(args.N) // args.group_size
    correct = torch.rand(args.N, generator=torch.Generator().manual_seed(0)) < 0.3
    per_traj_rollout = rollout_seconds / len(trajs)
    print(f"{'shaping embedder':<18}{'ms per step':>12}{'ms per traj':>12}{'vs rollout':>12}   (N={args.N})")
    for spec in ("tokens", "policy", "hf"):
        if spec == "hf":
            directory = f"/tmp/gtpo-bench-encoder-{os.getpid()}"
            model.save_policy(policy, tokenizer, directory)
            embedder = rewards.make_embedder(f"hf:{directory}")
        else:
            embedder = rewards.make_embedder(spec, tokenizer, policy)
        start = time.perf_counter()
        rewards.shape_outcomes(correct, embedder(codes), group_index)
        seconds = time.perf_counter() - start
        share = seconds / args.N / per_traj_rollout
        print(f"{spec:<18}{1000 * seconds:>12.1f}{1000 * seconds / args.N:>12.3f}{100 * share:>11.2f}%")
    print("vs rollout = shaping time per trajectory / rollout time per trajectory")


STEP_VARIANTS = {  # label -> (TrainConfig overrides, the old-log-prob pass forced)
    "gtpo": ({}, False),  # one optimizer step: the old-log-prob pass is skipped
    "gtpo, old pass": ({}, True),  # the same step with the separate no-grad pass
    "gtpo, 4 mini": ({"minibatches": 4}, False),  # a quarter of the batch per optimizer step
    "grpo": ({"algo": "grpo"}, False),
}


def step_flags(sub):
    """`step` and its flags."""
    stp = sub.add_parser(
        "step",
        help="one RL step's time split: GTPO with and without the old-log-prob pass, "
        "with 4 mini-batches, and GRPO, on the same rollouts",
    )
    stp.add_argument("--model", default="demo", help="'demo' (SFT'd first, see --sft_steps) or a checkpoint directory")
    stp.add_argument("--sft_steps", type=int, default=300, help="SFT steps of the demo model before measuring")
    stp.add_argument("--prompts", type=int, default=16, help="problems in the step")
    stp.add_argument("--group_size", type=int, default=8, help="trajectories per problem (G)")
    stp.add_argument("--micro_batch_size", type=int, default=16, help="trajectories per forward/backward")
    stp.add_argument("--rounds", type=int, default=3, help="rounds alternating the variants")
    stp.set_defaults(run=bench_step)


def bench_step(args):
    """One RL step of train.py, split into rollout, rewards (grading, shaping, advantages), old
    log-probs and update, on the same rollouts from the same weights: GTPO with its one optimizer
    step (no old-log-prob pass), the same with the pass forced, GTPO with 4 mini-batches (4
    optimizer steps; the pass needed), and GRPO. (This imports train.py's step functions, so that
    it times exactly the code that trains.)"""
    world = parallel.World(0, 1, torch.device("cpu"))
    cfg, policy, tokenizer, rows, trajs, t_sandboxes, t_rollout = step_rollouts(args, world)
    initial = {k: v.clone() for k, v in policy.state_dict().items()}
    times = {label: {"rewards": [], "old_logp": [], "update": []} for label in STEP_VARIANTS}
    trained_rows, grader = {}, grading.Grader()
    for _ in range(args.rounds):
        for label, (overrides, always_old) in STEP_VARIANTS.items():
            if "minibatches" in overrides:
                overrides = {"mini_batch_size": len(trajs) // overrides["minibatches"]}
            policy.load_state_dict(initial)
            run = dataclasses.replace(cfg, **overrides)
            seconds, trained_rows[label] = timed_step(
                run, policy, tokenizer, rows, trajs, world=world, grader=grader, always_old=always_old
            )
            for part, value in seconds.items():
                times[label][part].append(value)
    grader.close()
    print_step_table(
        args, trajs=trajs, times=times, trained_rows=trained_rows, t_rollout=t_rollout, t_sandboxes=t_sandboxes
    )


def step_rollouts(args, world):
    """The step's settings, policy (the demo model SFT'd first: a random model makes no tool calls)
    and rollouts: (cfg, policy, tokenizer, rows, trajs, seconds starting sandboxes, seconds of
    rollout)."""
    import tasks

    cfg = config.TrainConfig(
        model=args.model,
        prompts_per_step=args.prompts,
        group_size=args.group_size,
        micro_batch_size=args.micro_batch_size,
        sft_steps=args.sft_steps,
    )
    derived = config.check_config(cfg, world)
    policy, tokenizer = model.load_policy(args.model, demo_size=(128, 3))
    rows = [p for p in tasks.toy_problems(args.prompts, seed=7) for _ in range(args.group_size)]
    if args.model == "demo" and args.sft_steps:
        teacher = [dict(p, turns=p["teacher"]) for p in tasks.toy_problems(500, seed=0)]
        wrapped = parallel.wrap(policy.train(), world)
        sft.run(wrapped, tokenizer, teacher, cfg=cfg, world=world, system_prompt=derived.system_prompt)
    prompts = [model.chat_prompt_ids(tokenizer, row["problem"], derived.system_prompt) for row in rows]
    with sandbox.Pool(max_workers=8, timeout=10) as pool, torch.no_grad():
        policy.eval()
        start = time.perf_counter()  # train.py starts the next step's sandboxes during the update
        pool.prewarm(len(prompts), wait=True)
        t_sandboxes = time.perf_counter() - start
        start = time.perf_counter()
        settings = rollout.RolloutConfig.of(cfg, temperature=cfg.temperature)
        trajs = rollout.rollout(policy, tokenizer, prompts, pool=pool, cfg=settings)
        t_rollout = time.perf_counter() - start
    return cfg, policy, tokenizer, rows, trajs, t_sandboxes, t_rollout


def timed_step(cfg, policy, tokenizer, rows, trajs, *, world, grader, always_old):
    """Scoring and the update of one RL step on the given rollouts, train.py's own functions (the
    old-log-prob pass forced with always_old): ({rewards, old_logp, update: seconds}, trained
    rows)."""
    import train

    policy.train()
    wrapped = parallel.wrap(policy, world)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=cfg.lr)
    embedder = rewards.make_embedder(cfg.embedder, tokenizer)
    group_index = torch.arange(len(rows)) // cfg.group_size  # (N,)
    start = time.perf_counter()
    derived = config.check_config(cfg, world)
    scored = rewards.score(
        trajs, rows, group_index, cfg=cfg, derived=derived, world=world, grader=grader, embedder=embedder
    )
    t_rewards, start = time.perf_counter() - start, time.perf_counter()
    forced = lambda cfg, n, needed=train.needs_old_logprobs: always_old or needed(cfg, n)
    with mock.patch.object(train, "needs_old_logprobs", forced):
        _, t_old = train.update(
            wrapped,
            optimizer,
            trajs,
            turn_advantages=scored.turn_advantages,
            trained=scored.trained,
            counted=scored.counted,
            cfg=cfg,
            world=world,
            pad=tokenizer.pad_token_id,
        )
    seconds = {"rewards": t_rewards, "old_logp": t_old, "update": time.perf_counter() - start - t_old}
    return seconds, int(scored.trained.sum())


def print_step_table(args, *, trajs, times, trained_rows, t_rollout, t_sandboxes):
    """bench_step's figures: each variant's median parts, and the ratios that matter."""
    turns = sum(len(t.turns) for t in trajs) / len(trajs)
    print(
        f"{len(trajs)} trajectories ({args.prompts} problems x {args.group_size}), {turns:.2f} turns each; "
        f"rollout (shared by all, sandboxes started) {t_rollout:.2f} s; starting the {len(trajs)} "
        f"sandboxes {t_sandboxes:.2f} s (train.py overlaps it with the update)"
    )
    print(
        f"{'':16}{'rewards':>10}{'old logp':>10}{'update':>10}{'step':>10}{'trained rows':>14}"
        f"   (median s, {args.rounds} rounds)"
    )
    step = {}
    for label in STEP_VARIANTS:
        parts = [statistics.median(times[label][k]) for k in ("rewards", "old_logp", "update")]
        step[label] = t_rollout + sum(parts)
        print(f"{label:<16}" + "".join(f"{p:>10.3f}" for p in parts) + f"{step[label]:>10.2f}{trained_rows[label]:>14}")
    learn = {label: sum(statistics.median(times[label][k]) for k in ("old_logp", "update")) for label in times}
    print(
        f"old logp + update: skipping the old-log-prob pass saves {1 - learn['gtpo'] / learn['gtpo, old pass']:.1%} "
        f"({learn['gtpo']:.3f} s against {learn['gtpo, old pass']:.3f} s); 4 mini-batches take "
        f"{learn['gtpo, 4 mini'] / learn['gtpo']:.2f}x the one-step update"
    )
    reward_extra = statistics.median(times["gtpo"]["rewards"]) - statistics.median(times["grpo"]["rewards"])
    print(
        f"GTPO/GRPO step time: {step['gtpo'] / step['grpo']:.3f}; GTPO's extra reward work "
        f"(turn rewards, shaping, returns): {100 * reward_extra / step['grpo']:+.2f}% of GRPO's step. The "
        "updates differ in size where the two train different rows: groups whose advantages are all "
        "zero get no forward pass."
    )


def add_parsers(sub):
    """The subcommands advantages, sandbox, rollout, rewards and step, with their flags."""
    for flags in (advantages_flags, sandbox_flags, rollout_flags, rewards_flags, step_flags):
        flags(sub)
