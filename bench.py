"""Benchmarks that print figures measured side by side in one run (never asserted in tests).

    python bench.py advantages            # GTPO's advantage pipeline + loss vs GRPO's, N=1024 K=8 L=4096
    python bench.py sandbox               # sandbox call and session start-up vs a fresh `python -I -c`
    python bench.py rollout [--model DIR] # multi-turn rollout vs plain generate; log-prob memory
    python bench.py rewards               # grading throughput and shaping cost vs a rollout step
    python bench.py step [--model DIR]    # one RL step's time split, GTPO vs GRPO on the same rollouts
    python bench.py peer [--turns 3]      # TRL's GRPOTrainer vs ours, same model, data and reward;
                                          # --turns K: multi-turn tool calling on both sides
    python bench.py gpu MODEL_DIR         # the GPU check, ready to run (without a GPU: a CPU dry run)
    python bench.py dtype [--model DIR]   # fp32 vs bf16 compute: a rollout and an update pass

Each benchmark alternates the variants it compares (A, B, A, B, ...) so that load from elsewhere
on a shared machine falls on both alike. It reports the median of all timed calls (the typical
cost) and the minimum (the cost with the least interference, as timeit recommends), and ratios.
"""

import argparse
import ctypes
import functools
import gc
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from transformers import GenerationConfig

import gtpo
import launch
import model
import rewards
import rollout
import sandbox
import sft

ROOT = os.path.dirname(os.path.abspath(__file__))  # the scripts bench.py runs (train.py, the tests) are here

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

    rows = [("warm call in a live session", warm, 3),
            ("cold: new session + first call + close", cold, 2),
            ("  the same, in a new template (Python start)", own, 2),
            ("baseline: fresh `python -I -c` per call", fresh, 2)]  # fmt: skip
    print(f"{'what':<48}{'p50 ms':>10}{'p99 ms':>10}")
    for label, times, digits in rows:
        print(f"{label:<48}{statistics.median(times):>10.{digits}f}{_percentile(times, 99):>10.{digits}f}")
    p50 = {label: statistics.median(times) for label, times, _ in rows}
    cold_p50, fresh_p50 = p50[rows[1][0]], p50[rows[3][0]]
    print(f"cold session / fresh python -I -c: {cold_p50 / fresh_p50:.2f} (goals: <= 0.5, cold p50 <= 5 ms); "
          f"the template saves {1 - cold_p50 / p50[rows[2][0]]:.0%} of a session's start-up")  # fmt: skip
    print(f"warm call vs fresh process: {fresh_p50 / p50[rows[0][0]]:.0f}x faster (goals: >= 10x, warm p50 < 2 ms)")
    print(f"throughput: {args.batch} calls in {elapsed:.3f} s = {args.batch / elapsed:.0f} calls/s")


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
        print(f"model={name} params={sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M "
              f"vocab={len(tokenizer)} threads={torch.get_num_threads()}")  # fmt: skip
        if args.parts in ("all", "speed"):
            _bench_rollout_speed(policy, tokenizer, problems, args)
        if args.parts in ("all", "memory"):
            _bench_logprob_memory(policy, tokenizer, args)
        print()


def _bench_rollout_speed(policy, tokenizer, problems, args):
    prompts = [model.chat_prompt_ids(tokenizer, p) for p in problems]
    print(f"batch={args.batch} max_turns={args.max_turns} T={args.temperature} rounds={args.rounds}")
    cfg = rollout.RolloutConfig(
        max_turns=args.max_turns, max_turn_tokens=args.max_turn_tokens,
        max_total_tokens=args.max_total_tokens, temperature=args.temperature,
    )  # fmt: skip
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
            ids, mask = (t.to(policy.device) for t in rollout.left_pad(prompts, tokenizer.pad_token_id))
            plain = GenerationConfig(  # transformers' own sampler at the same temperature, nothing else, no stopping
                do_sample=cfg.temperature > 0, num_beams=1, temperature=cfg.temperature or 1.0, top_p=1.0, top_k=0,
                min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0,
                no_repeat_ngram_size=0, max_new_tokens=per_row, min_new_tokens=per_row, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
            start = time.perf_counter()
            policy.generate(input_ids=ids, attention_mask=mask, generation_config=plain)
            rates.setdefault("plain model.generate, same tokens", []).append(
                (per_row * len(prompts), time.perf_counter() - start, 1.0)
            )
    plain_rate = statistics.median(t / s for t, s, _ in rates["plain model.generate, same tokens"])
    for label, runs in rates.items():
        tokens, seconds, turns = (statistics.median(x) for x in zip(*runs))
        rate = statistics.median(t / s for t, s, _ in runs)
        print(f"{label:<52}{tokens:>8.0f}{seconds:>9.2f}{rate:>10.1f}{turns:>7.2f}{rate / plain_rate:>7.2f}")
    print("ratio = tokens/s against plain generate (goal: >= 0.7 with 3 turns)")
    return statistics.median(t / s for t, s, _ in rates["multi-turn, kv_reuse=True, prewarmed sandboxes"]) / plain_rate


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


def bench_rewards(args):
    tokenizer = model.tiny_tokenizer()
    policy = memorised_tiny_policy(tokenizer, [f"Problem {i}" for i in range(8)], args.hidden_size)
    problems = [f"Problem {i % 8}" for i in range(args.rollout_n)]
    cfg = rollout.RolloutConfig(max_turns=3, max_turn_tokens=96, max_total_tokens=1024, temperature=0.7)
    with sandbox.Pool(max_workers=8, timeout=10) as pool:
        pool.prewarm(len(problems), wait=True)
        start = time.perf_counter()
        trajs = rollout.rollout(
            policy, tokenizer, [model.chat_prompt_ids(tokenizer, p) for p in problems], pool, cfg
        )
        rollout_seconds = time.perf_counter() - start
    print(f"rollout step: {len(trajs)} trajectories of the demo model, 3 turns: {rollout_seconds:.2f} s "
          f"({1000 * rollout_seconds / len(trajs):.1f} ms per trajectory)")  # fmt: skip

    grader = rewards.Grader()
    pairs = synthetic_answers(args.N)
    grader.equal("x+x", "2x")  # start the sympy sandbox outside the timing
    start = time.perf_counter()
    correct = [grader.equal(rewards.extract_answer(text), gold) for text, gold in pairs]
    grading = time.perf_counter() - start
    grader.close()
    share = grading / args.N / (rollout_seconds / len(trajs))
    print(f"grading: {args.N} answers in {grading:.3f} s = {args.N / grading:.0f} answers/s "
          f"({sum(correct)} correct; 10% need sympy)")  # fmt: skip
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


STEP_VARIANTS = {  # label -> (train.Config overrides, always_old_logprobs)
    "gtpo": ({}, False),  # one optimizer step: the old-log-prob pass is skipped
    "gtpo, old pass": ({}, True),  # the same step with the separate no-grad pass
    "gtpo, 4 mini": ({"minibatches": 4}, False),  # a quarter of the batch per optimizer step
    "grpo": ({"algo": "grpo"}, False),
}


def bench_step(args):
    """One RL step of train.py, split into rollout, rewards (grading, shaping, advantages), old
    log-probs and update, on the same rollouts from the same weights: GTPO with its one optimizer
    step (no old-log-prob pass), the same with the pass forced, GTPO with 4 mini-batches (4
    optimizer steps; the pass needed), and GRPO. (This imports train.py's step functions, so that
    it times exactly the code that trains.)"""
    import dataclasses

    import data
    import train

    world = launch.World(0, 1, torch.device("cpu"))
    cfg = train.Config(model=args.model, prompts_per_step=args.prompts, group_size=args.group_size,
                       micro_batch_size=args.micro_batch_size, sft_steps=args.sft_steps)  # fmt: skip
    derived = train.check_config(cfg, world)
    policy, tokenizer = model.load_policy(args.model, demo_size=(128, 3))
    problems = data.toy_problems(args.prompts, seed=7)
    if args.model == "demo" and args.sft_steps:  # a random model makes no tool calls: SFT it first
        rows = [dict(p, turns=p["teacher"]) for p in data.toy_problems(500, seed=0)]
        sft.run(launch.wrap(policy.train(), world), tokenizer, rows, cfg=cfg, world=world,
                system_prompt=derived.system_prompt)  # fmt: skip
    prompts = [model.chat_prompt_ids(tokenizer, p["problem"], derived.system_prompt) for p in problems]
    group_index = torch.arange(args.prompts).repeat_interleave(args.group_size)
    prompts = [p for p in prompts for _ in range(args.group_size)]
    with sandbox.Pool(max_workers=8, timeout=10) as pool, torch.no_grad():
        policy.eval()
        start = time.perf_counter()  # train.py starts the next step's sandboxes during the update
        pool.prewarm(len(prompts), wait=True)
        t_sandboxes = time.perf_counter() - start
        start = time.perf_counter()
        trajs = rollout.rollout(policy, tokenizer, prompts, pool=pool, cfg=train.rollout_config(cfg, cfg.temperature))
        t_rollout = time.perf_counter() - start
    initial = {k: v.clone() for k, v in policy.state_dict().items()}
    times = {label: {"rewards": [], "old_logp": [], "update": []} for label in STEP_VARIANTS}
    trained_rows = {}
    grader = rewards.Grader()
    for _ in range(args.rounds):
        for label, (overrides, always_old) in STEP_VARIANTS.items():
            if "minibatches" in overrides:
                overrides = {"mini_batch_size": len(trajs) // overrides["minibatches"]}
            run = dataclasses.replace(cfg, **overrides)
            policy.load_state_dict(initial)
            policy.train()
            wrapped = launch.wrap(policy, world)
            optimizer = torch.optim.AdamW(wrapped.parameters(), lr=run.lr)
            embedder = rewards.make_embedder(run.embedder, tokenizer)
            start = time.perf_counter()
            scored = train.score(trajs, [p for p in problems for _ in range(args.group_size)], group_index, cfg=run,
                                 derived=train.check_config(run, world), world=world, grader=grader,
                                 embedder=embedder)  # fmt: skip
            times[label]["rewards"].append(time.perf_counter() - start)
            start = time.perf_counter()
            _, t_old = train.update(wrapped, optimizer, trajs, turn_advantages=scored.turn_advantages,
                                    trained=scored.trained, counted=scored.counted, cfg=run, world=world,
                                    pad=tokenizer.pad_token_id, always_old_logprobs=always_old)  # fmt: skip
            times[label]["old_logp"].append(t_old)
            times[label]["update"].append(time.perf_counter() - start - t_old)
            trained_rows[label] = int(scored.trained.sum())
    grader.close()
    print_step_table(args, trajs=trajs, times=times, trained_rows=trained_rows, t_rollout=t_rollout,
                     t_sandboxes=t_sandboxes)  # fmt: skip


def print_step_table(args, *, trajs, times, trained_rows, t_rollout, t_sandboxes):
    """bench_step's figures: each variant's median parts, and the ratios that matter."""
    turns = sum(len(t.turns) for t in trajs) / len(trajs)
    print(f"{len(trajs)} trajectories ({args.prompts} problems x {args.group_size}), {turns:.2f} turns each; "
          f"rollout (shared by all, sandboxes started) {t_rollout:.2f} s; starting the {len(trajs)} "
          f"sandboxes {t_sandboxes:.2f} s (train.py overlaps it with the update)")  # fmt: skip
    print(f"{'':16}{'rewards':>10}{'old logp':>10}{'update':>10}{'step':>10}{'trained rows':>14}"
          f"   (median s, {args.rounds} rounds)")  # fmt: skip
    step = {}
    for label in STEP_VARIANTS:
        parts = [statistics.median(times[label][k]) for k in ("rewards", "old_logp", "update")]
        step[label] = t_rollout + sum(parts)
        print(f"{label:<16}" + "".join(f"{p:>10.3f}" for p in parts) + f"{step[label]:>10.2f}{trained_rows[label]:>14}")
    learn = {label: sum(statistics.median(times[label][k]) for k in ("old_logp", "update")) for label in times}
    print(f"old logp + update: skipping the old-log-prob pass saves {1 - learn['gtpo'] / learn['gtpo, old pass']:.1%} "
          f"({learn['gtpo']:.3f} s against {learn['gtpo, old pass']:.3f} s); 4 mini-batches take "
          f"{learn['gtpo, 4 mini'] / learn['gtpo']:.2f}x the one-step update")  # fmt: skip
    reward_extra = statistics.median(times["gtpo"]["rewards"]) - statistics.median(times["grpo"]["rewards"])
    print(f"GTPO/GRPO step time: {step['gtpo'] / step['grpo']:.3f}; GTPO's extra reward work "
          f"(turn rewards, shaping, returns): {100 * reward_extra / step['grpo']:+.2f}% of GRPO's step. The "
          "updates differ in size where the two train different rows: groups whose advantages are all "
          "zero get no forward pass.")  # fmt: skip


QWEN = os.path.expanduser("~/.cache/gtpo/qwen2.5-coder-0.5b-instruct")  # ../shared/tools/get-qwen2.5-coder-0.5b.sh


def digit_share(text):
    """The reward both trainers get in `bench.py peer`: the share of digits in the completion, in
    [0, 1]. Any reward both can compute would do; this one differs between samples, so every
    group has signal and both train every sampled token."""
    return sum(c.isdigit() for c in text) / max(len(text), 1)


def peer_reward(record, row):
    """digit_share as train.py's reward plug-in: --reward_fn bench.py:peer_reward."""
    return digit_share(record["final_text"])


def bench_peer(args):
    """TRL's GRPOTrainer against `train.py --algo grpo`: the same local model, prompts, group size,
    token limits and reward (digit_share); seconds, sampled tokens and tool calls per step of each,
    alternating runs in fresh processes, and the ratios. --turns 1: one completion per prompt (the
    untrained demo model, then Qwen2.5-Coder-0.5B-Instruct if present). --turns K > 1: multi-turn
    tool use, ours with ```python fences and our sandbox, TRL's with `tools=[python]` (JSON tool
    calls) running the same sandbox (the demo model taught both protocols, then Qwen2.5-Coder)."""
    try:
        import trl
    except ImportError:
        print(
            "bench.py peer compares with TRL's GRPOTrainer, an optional install (never a requirement of "
            "gtpo):\n    pip install trl -c constraints.txt\nTRL is not installed here: nothing measured."
        )
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gtpo-peer-") as tmp:
        models, problems = _peer_setup(args, tmp)
        data_file = os.path.join(tmp, "prompts.jsonl")
        with open(data_file, "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in problems)
        print(
            f"TRL {trl.__version__}; {args.prompts} prompts x {args.group_size} trajectories, "
            f"{args.turns} turn(s) of at most {args.length} tokens, reward digit_share, {args.steps} steps "
            f"per run (the first not timed), {args.rounds} rounds; threads={torch.get_num_threads()}"
        )
        for m, (name, path) in enumerate(models):
            ours, theirs = [], []
            for k in range(args.rounds):  # alternate, so that both share the machine's state
                ours += _ours_steps(path, data_file, args, out=os.path.join(tmp, f"ours{m}-{k}"))
                spawn = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(1, mp_context=spawn) as fresh:  # a new process, as ours
                    out = os.path.join(tmp, f"trl{m}-{k}")
                    theirs += fresh.submit(_trl_steps, path, problems, args, out=out).result()
            _print_peer(name, ours, theirs, turns=args.turns)


def _peer_setup(args, tmp):
    """The (name, directory) of each model compared, and the problems."""
    import data

    if args.turns == 1:
        toy = data.toy_problems(args.prompts, seed=3)
        problems = [{"problem": p["problem"], "answer": p["answer"]} for p in toy]
    else:
        moduli = [97 + i for i in range(args.prompts)]
        problems = [{"problem": PEER_PROBLEM.format(m=m), "answer": str(12345 * 6789 % m)} for m in moduli]
    if args.model not in ("auto", "demo"):
        return [(args.model, args.model)], problems
    demo_dir = os.path.join(tmp, "demo-model")
    if args.turns == 1:
        model.save_policy(*model.load_policy("demo", demo_size=(128, 3)), demo_dir)
        models = [("demo (untrained)", demo_dir)]
    else:
        tokenizer = model.tiny_tokenizer()
        tokenizer.chat_template = tool_chat_template()
        policy = two_protocol_policy(tokenizer, [p["problem"] for p in problems], args.turns)
        model.save_policy(policy, tokenizer, demo_dir)
        models = [("demo, taught both protocols", demo_dir)]
    if args.model == "auto" and os.path.isdir(QWEN):
        models.append(("Qwen2.5-Coder-0.5B-Instruct", QWEN))
    return models, problems


# The multi-turn peer: one task for either protocol; each side's system prompt says how to run code.
PEER_PROBLEM = (
    "Compute 12345 * 6789 modulo {m} with Python, check the result with a second run, "
    "then give the \\boxed{{}} answer."
)
TOOL_SYSTEM_PROMPT = (
    "Solve the problem step by step. You may run Python with the python tool; what it prints comes "
    "back to you. Put the final answer in \\boxed{}."
)
PEER_TURNS = [  # (prose, code); each turn's code stands alone: TRL's tool keeps no state between calls
    ("First the product.", "print(12345 * 6789)"),
    ("Now its remainder.", "print(12345 * 6789 % 97)"),
    ("Check the square.", "print((12345 * 6789 % 97) ** 2)"),
    ("And its cube.", "print((12345 * 6789 % 97) ** 3)"),
]


def python(code: str) -> str:
    """
    Run Python code in a sandbox and return what it printed.

    Args:
        code: The Python source code to run.
    """
    with sandbox.Session() as session:
        result = session.run(code)
    return result.stdout + result.stderr


def tool_chat_template():
    """Qwen2.5's chat template as TRL recognises it (TRL parses tool calls only for templates it
    knows, compared as text)."""
    from trl.chat_template_utils import qwen2_5_chat_template

    return qwen2_5_chat_template


def tool_call_messages(problem, turns):
    """The conversation TRL's protocol makes of PEER_TURNS[:turns]: each turn a JSON tool call, each
    call's output a tool message, except the last call's (TRL leaves a call past
    max_tool_calling_iterations unrun); turns=0 gives the prompt."""
    messages = [{"role": "system", "content": TOOL_SYSTEM_PROMPT}, {"role": "user", "content": problem}]
    for j, (prose, code) in enumerate(PEER_TURNS[:turns]):
        call = {"type": "function", "function": {"name": "python", "arguments": {"code": code}}}
        messages.append({"role": "assistant", "content": prose, "tool_calls": [call]})
        if j < turns - 1:
            messages.append({"role": "tool", "name": "python", "content": python(code)})
    return messages


def two_protocol_policy(tokenizer, problems, turns, steps=200):
    """The demo model taught to answer every problem with PEER_TURNS[:turns] in both protocols: as
    ```python fences under train.py's prompt, as JSON tool calls under TRL's tool prompt. Every
    turn calls the tool, so both trainers sample `turns` turns per trajectory."""
    fences = [f"{prose}\n```python\n{code}\n```" for prose, code in PEER_TURNS[:turns]]
    render = functools.partial(tokenizer.apply_chat_template, tools=[python], tokenize=False)
    trajs = []
    with sandbox.Session() as session:
        for problem in problems:
            prompt_ids = model.chat_prompt_ids(tokenizer, problem)
            trajs.append(rollout.teacher_trajectory(tokenizer, prompt_ids, fences, session))
            messages = tool_call_messages(problem, turns)
            prompt, whole = render(messages[:2], add_generation_prompt=True), render(messages)
            assert whole.startswith(prompt), "the chat template does not extend the prompt"
            traj = rollout.Trajectory.start(tokenizer.encode(prompt, add_special_tokens=False))
            calls = tokenizer.encode(whole[len(prompt) :].rstrip("\n"), add_special_tokens=False)
            traj.extend(calls, True, 0)
            trajs.append(traj)
    return memorise(model.tiny_model(tokenizer, hidden_size=128, num_hidden_layers=4), trajs, steps)


def _print_peer(name, ours, theirs, *, turns):
    """Each: [(seconds, sampled tokens, tool calls)] per timed step."""
    print(f"\nmodel: {name}")
    print(f"{'':<36}{'s/step':>8}{'range':>16}{'tokens/step':>13}{'calls/step':>12}{'ms/token':>10}")
    rows = {f"train.py --algo grpo --max_turns {turns}": ours, "TRL GRPOTrainer": theirs}
    for label, steps in rows.items():
        seconds, tokens, calls = zip(*steps)
        span = f"{min(seconds):.2f}-{max(seconds):.2f}"
        print(
            f"{label:<36}{statistics.median(seconds):>8.2f}{span:>16}{statistics.median(tokens):>13.0f}"
            f"{statistics.median(calls):>12.1f}{1000 * sum(seconds) / sum(tokens):>10.2f}"
        )

    def per_token(steps):
        return sum(s for s, *_ in steps) / sum(t for _, t, _ in steps)

    ratio = statistics.median(s for s, *_ in ours) / statistics.median(s for s, *_ in theirs)
    print(f"ours / TRL: {ratio:.2f} per step, {per_token(ours) / per_token(theirs):.2f} per sampled token")


OUTPUT_TOKENS = 64  # a tool output's share of the multi-turn token budget


def _ours_steps(model_dir, data_file, args, *, out):
    """[(seconds, sampled tokens, tool calls run)] of train.py's steps after the first, from its
    metrics.jsonl."""
    rows = args.prompts * args.group_size
    micro = args.micro_batch or rows
    if args.turns == 1:
        limits = ["--system_prompt", "none", "--max_total_tokens", str(args.length + 256)]
    else:  # the system prompt that explains the fences; each turn capped, the whole as TRL's plus a prompt
        limits = ["--system_prompt", "auto", "--max_total_tokens", str(512 + _trl_length(args))]
    flags = [
        "--model", model_dir, "--data", data_file, "--algo", "grpo", "--max_turns", str(args.turns), *limits,
        "--first_turn_tool_call", "false", "--reward_fn", "bench.py:peer_reward", "--sft_steps", "0",
        "--eval_size", "0", "--prompts_per_step", str(args.prompts), "--group_size", str(args.group_size),
        "--max_turn_tokens", str(args.length), "--micro_batch_size", str(micro), "--lr", "1e-6",
        "--temperature", "1.0", "--max_steps", str(args.steps), "--save_every", str(10**6), "--out_dir", out,
    ]  # fmt: skip
    done = subprocess.run([sys.executable, "train.py", *flags], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"train.py {' '.join(flags)} failed:\n{done.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f][1:]
    parts = ("t_rollout", "t_reward", "t_old_logp", "t_update")
    return [(sum(r[k] for k in parts), r["length"] * rows, r["tool_calls"] * rows) for r in records]


def _trl_length(args):
    """TRL's max_completion_length: the whole conversation after the prompt, tool outputs included."""
    return args.length if args.turns == 1 else args.turns * (args.length + OUTPUT_TOKENS)


def _trl_steps(model_dir, problems, args, *, out):
    """[(seconds, sampled tokens, tool calls run)] of GRPOTrainer's steps after the first, timed by
    a callback (run in a new process, as train.py is)."""
    import datasets
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = model.load_tokenizer(model_dir)
    # as train.py: fp32 weights (with bf16 autocast on CUDA, as TRL's bf16=True), every activation kept
    # (TRL's default recomputes them in the backward pass, as train.py's --activation_checkpointing)
    policy = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = args.prompts * args.group_size
    if args.turns == 1:
        prompts = [tokenizer.decode(model.chat_prompt_ids(tokenizer, p["problem"], None)) for p in problems]
        tools = None

        def reward(completions, **_):
            return [digit_share(c) for c in completions]
    else:
        tokenizer.chat_template = tool_chat_template()
        prompts = [tool_call_messages(p["problem"], 0) for p in problems]
        tools = [python]

        def reward(completions, **_):  # each completion a list of messages: the last one's text
            return [digit_share(c[-1]["content"]) for c in completions]

    class StepTimes(transformers.TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self.start)

    cpu = not torch.cuda.is_available()
    micro = args.micro_batch or rows
    config = GRPOConfig(
        output_dir=out, per_device_train_batch_size=micro, gradient_accumulation_steps=rows // micro,
        num_generations=args.group_size, max_completion_length=_trl_length(args),
        max_tool_calling_iterations=(args.turns - 1) or None,
        learning_rate=1e-6, beta=0.0, num_iterations=1, temperature=1.0, top_p=1.0, loss_type="dapo",
        max_steps=args.steps, logging_steps=1, report_to="none", save_strategy="no", use_cpu=cpu,
        bf16=not cpu, activation_checkpointing=False, seed=0, shuffle_dataset=False, disable_tqdm=True,
    )  # fmt: skip
    timer = StepTimes()
    dataset = datasets.Dataset.from_list([{"prompt": p} for p in prompts])
    trainer = GRPOTrainer(
        model=policy, reward_funcs=[reward], args=config, train_dataset=dataset, processing_class=tokenizer,
        callbacks=[timer], tools=tools,
    )  # fmt: skip
    trainer.remove_callback(transformers.PrinterCallback)  # its per-step log lines
    trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    calls = [h.get("tools/call_frequency", 0.0) for h in logs]  # calls run per trajectory
    lengths = [h["completions/mean_length"] for h in logs]  # sampled tokens only, tool outputs masked
    return [(s, n * rows, c * rows) for s, n, c in zip(timer.times[1:], lengths[1:], calls[1:])]


def cpu_bf16_instructions():
    """The CPU's bf16 matrix instructions torch can use ("none": bf16 is emulated, and slow)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return ", ".join(sorted({"avx512_bf16", "amx_bf16"} & set(flags))) or "none"


def bench_dtype(args):
    """fp32 against bf16 compute over the same fp32 weights (--compute_dtype), side by side: a
    rollout (--rows trajectories, one turn of --new_tokens) and an update pass (forward and
    backward of --rows sequences of --update_tokens), alternating fp32, bf16, fp32, ... over
    --rounds after a warm-up of each."""
    names = [args.model] if args.model != "auto" else ["demo"] + ([QWEN] if os.path.isdir(QWEN) else [])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}; CPU kernels {torch.backends.cpu.get_cpu_capability()}, bf16 instructions: "
          f"{cpu_bf16_instructions()}; {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'model':<34}{'phase':<9}{'fp32 s':>9}{'bf16 s':>9}{'bf16/fp32':>11}  tokens fp32 / bf16")
    for name in names:
        policy, tokenizer = model.load_policy(name, device, dtype=torch.float32, demo_size=(128, 3))
        prompts = [model.chat_prompt_ids(tokenizer, p, model.SYSTEM_PROMPT) for p in rollout_problems(args.rows)]
        settings = rollout.RolloutConfig(max_turns=1, max_turn_tokens=args.new_tokens, temperature=1.0,
                                         max_total_tokens=max(map(len, prompts)) + args.new_tokens + 1)  # fmt: skip
        ids = torch.randint(0, len(tokenizer), (args.rows, args.update_tokens), device=device,
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
        times = {dtype: {"rollout": [], "update": [], "tokens": []} for dtype in (torch.float32, torch.bfloat16)}
        with sandbox.Pool(max_workers=4, timeout=10) as pool:
            for r in range(args.rounds + 1):  # round 0 warms up
                for dtype, out in times.items():
                    start = time.perf_counter()
                    with torch.no_grad(), launch.mixed_precision(policy, dtype):
                        trajs = rollout.rollout(policy, tokenizer, prompts, pool, settings,
                                                seeds=list(range(args.rows)))
                    middle = time.perf_counter()
                    logp = launch.LogProbs(policy, dtype, len(tokenizer))(ids, torch.ones_like(ids))  # (rows, L)
                    logp.sum().backward()
                    policy.zero_grad(set_to_none=True)
                    if r:
                        out["rollout"].append(middle - start)
                        out["update"].append(time.perf_counter() - middle)
                        out["tokens"].append(sum(sum(t.loss_mask) for t in trajs))
        label = "demo (128x3)" if name == "demo" else os.path.basename(name.rstrip("/"))
        for phase in ("rollout", "update"):
            a, b = (statistics.median(times[dtype][phase]) for dtype in times)
            tokens = " / ".join(str(sum(times[dtype]["tokens"])) for dtype in times) if phase == "rollout" else ""
            print(f"{label:<34}{phase:<9}{a:>9.2f}{b:>9.2f}{b / a:>11.2f}  {tokens}")
        del policy
        gc.collect()


def bench_gpu(args):
    """One command for a CUDA machine: the gpu-marked tests, two RL steps of MODEL_DIR in the
    compute dtype auto picks (bf16 on CUDA; peak memory beside the memory arithmetic), rollout
    tokens/s against plain generate on the same batch, one FSDP2 step under `torchrun
    --nproc_per_node 1` (NCCL) and, with two GPUs or more, one DDP and one FSDP2 step over 2
    processes with real problem groups (score's gathers run), each GPU's peak memory beside the
    arithmetic. Without a GPU the same stages run on the CPU (fp32, gloo) as a dry run and the
    command exits 0 if they pass; either way it exits 1 if any stage fails."""
    import tempfile

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    where = f"CUDA: {torch.cuda.get_device_name()}" if cuda else "no CUDA device: a CPU dry run (fp32, gloo) of the same stages"
    print(f"bench.py gpu {args.model_dir} — {where}", flush=True)
    stages = [("gpu-marked tests", _gpu_tests), ("two RL steps, compute dtype auto", _gpu_rl_steps),
              ("rollout vs plain generate", _gpu_rollout), ("FSDP2 step, torchrun 1 process", _gpu_fsdp_step)]  # fmt: skip
    if not cuda or torch.cuda.device_count() > 1:
        two = lambda parallel: lambda *a, **k: _gpu_two_processes(parallel, *a, **k)
        stages += [("DDP step, torchrun 2 processes", two("ddp")), ("FSDP2 step, torchrun 2 processes", two("fsdp"))]
    rows = []
    with tempfile.TemporaryDirectory(prefix="gtpo-gpu-check-") as tmp:
        for name, stage in stages:
            start = time.perf_counter()
            try:
                ok, figure = stage(args, device=device, tmp=tmp)
            except Exception as e:  # noqa: BLE001 - a failed stage is a row of the table, then exit 1
                ok, figure = False, f"{type(e).__name__}: {e}"
            rows.append((name, ok, figure, time.perf_counter() - start))
            print(f"  {name}: {'ok' if ok else 'FAILED'} ({rows[-1][3]:.0f} s)", flush=True)
    print(f"\n{'stage':<36}{'result':<8}{'seconds':>8}  figure")
    for name, ok, figure, seconds in rows:
        print(f"{name:<36}{'ok' if ok else 'FAILED':<8}{seconds:>8.0f}  {figure}")
    if not cuda:
        print("Nothing above ran on a GPU: the stages ran on the CPU to check the command itself.")
    sys.exit(0 if all(ok for _, ok, _, _ in rows) else 1)


GPU_RUN = ["--sft_steps", "0", "--eval_size", "0", "--prompts_per_step", "2", "--group_size", "4", "--max_turns", "2",
           "--max_turn_tokens", "64", "--max_total_tokens", "512", "--save_every", "1000",
           "--reward_fn", "bench.py:peer_reward"]  # fmt: skip  # every group has signal: every step trains


def trained_every_step(out_dir, steps):
    """Whether a run's metrics.jsonl has `steps` steps, each with an optimizer step."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return len(records) == steps and all(r["optimizer_steps"] >= 1 and not r["no_signal"] for r in records)


def _gpu_tests(args, *, device, tmp):
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           "tests/test_gpu.py"], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    last = (done.stdout.strip().splitlines() or ["no output"])[-1]
    return done.returncode == 0, last + ("" if done.returncode == 0 else "\n" + done.stdout[-2000:])


def _gpu_rl_steps(args, *, device, tmp):
    """train.py in this process (its peak memory is this process's), two steps in the compute dtype auto picks."""
    import train

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cfg = train.parse_args(["--model", args.model_dir, "--device", device, "--max_steps", "2",
                            "--out_dir", os.path.join(tmp, "rl"), *GPU_RUN])  # fmt: skip
    train.main(cfg)
    if not trained_every_step(cfg.out_dir, 2):
        return False, "a step took no optimizer step (see its metrics.jsonl)"
    P = parameter_count(args.model_dir)
    with open(os.path.join(cfg.out_dir, "summary.json")) as f:
        peak = f"peak {peak_kind(device)} {json.load(f)['peak_memory_gb'][0]:.2f} GB"
    return True, (f"{peak}; arithmetic: training state 16 B x {P / 1e6:,.1f}M parameters = "
                  f"{16 * P / 1e9:.3f} GB, + KV cache + activations")  # fmt: skip


def parameter_count(model_dir):
    """Parameters of the demo model or of a safetensors directory (read from the headers only)."""
    if model_dir == "demo":
        return sum(p.numel() for p in model.load_policy("demo")[0].parameters())
    from safetensors import safe_open

    total = 0
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, name), "pt") as f:
                total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def peak_kind(device):
    """What train.py's peak_memory_gb measures on device (launch.peak_memory_gb)."""
    return "allocated" if device == "cuda" else "RSS (CPU, fp32: not the GPU figure)"


def _gpu_rollout(args, *, device, tmp):
    policy, tokenizer = model.load_policy(args.model_dir, device=device, dtype=torch.float32)
    problems = rollout_problems(8)
    settings = argparse.Namespace(batch=8, max_turns=2, max_turn_tokens=64, max_total_tokens=512, temperature=0.7,
                                  rounds=2)  # fmt: skip
    with launch.mixed_precision(policy, launch.resolve_dtype("auto", device)):  # as train.py's rollouts
        ratio = _bench_rollout_speed(policy, tokenizer, problems, settings)
    return True, f"multi-turn rollout at {ratio:.2f}x plain generate's tokens/s on the same batch"


def torchrun_step(args, *, device, out_dir, parallel, ranks):
    """One RL step of train.py under torchrun; (None, summary.json) or (the reason it failed, None)."""
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), "train.py",
           "--model", args.model_dir, "--device", device, "--parallel", parallel, "--max_steps", "1",
           "--out_dir", out_dir, *GPU_RUN]  # fmt: skip
    done = subprocess.run(run, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        return f"exit {done.returncode}: {done.stderr.strip()[-1500:]}", None
    if not trained_every_step(out_dir, 1):
        return "the step took no optimizer step (see its metrics.jsonl)", None
    with open(os.path.join(out_dir, "summary.json")) as f:
        return None, json.load(f)


def _gpu_fsdp_step(args, *, device, tmp):
    error, _ = torchrun_step(args, device=device, out_dir=os.path.join(tmp, "fsdp"), parallel="fsdp", ranks=1)
    return error is None, error or f"one RL step, fully_shard over 1 rank ({'nccl' if device == 'cuda' else 'gloo'})"


def _gpu_two_processes(parallel, args, *, device, tmp):
    """One RL step over 2 ranks, each rank's peak memory beside the arithmetic of docs/results.md
    (training state 16P per GPU under DDP; under FSDP2 the larger of 16P/2 and 12P/2 + 2P)."""
    out_dir = os.path.join(tmp, f"{parallel}2")
    error, summary = torchrun_step(args, device=device, out_dir=out_dir, parallel=parallel, ranks=2)
    if error:
        return False, error
    P = parameter_count(args.model_dir)
    state = 16 * P if parallel == "ddp" else 8 * P  # FSDP2 over 2: max(16P/2, 12P/2 + 2P) = 8P
    peaks = ", ".join(f"{g:.2f}" for g in summary["peak_memory_gb"])
    return True, (f"peak {peak_kind(device)} per rank {peaks} GB; arithmetic: training state {state / 1e9:.3f} GB per rank, "
                  "+ KV cache + activations")  # fmt: skip


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
    sbx.add_argument("--block", type=int, default=5, help="starts of one variant in a row before the next "
                     "(1: each start right after the others, its caches cold)")  # fmt: skip
    sbx.add_argument("--batch", type=int, default=256, help="short calls in the throughput test")
    sbx.add_argument("--sessions", type=int, default=32, help="concurrent sessions in the throughput test")
    sbx.add_argument("--workers", type=int, default=8, help="Pool max_workers in the throughput test")
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
    rew = sub.add_parser("rewards", help="grading throughput and shaping cost next to a rollout step")
    rew.add_argument("--N", type=int, default=512, help="trajectories graded and shaped")
    rew.add_argument("--group_size", type=int, default=8, help="trajectories per problem (G)")
    rew.add_argument("--rollout_n", type=int, default=64, help="trajectories in the timed rollout step")
    rew.add_argument("--hidden_size", type=int, default=256, help="width of the demo model")
    stp = sub.add_parser("step", help="one RL step's time split: GTPO with and without the old-log-prob pass, "
                         "with 4 mini-batches, and GRPO, on the same rollouts")  # fmt: skip
    stp.add_argument(
        "--model", default="demo", help="'demo' (SFT'd first, see --sft_steps) or a checkpoint directory"
    )
    stp.add_argument(
        "--sft_steps", type=int, default=300, help="SFT steps of the demo model before measuring"
    )
    stp.add_argument("--prompts", type=int, default=16, help="problems in the step")
    stp.add_argument("--group_size", type=int, default=8, help="trajectories per problem (G)")
    stp.add_argument("--micro_batch_size", type=int, default=16, help="trajectories per forward/backward")
    stp.add_argument("--rounds", type=int, default=3, help="rounds alternating the variants")
    peer = sub.add_parser("peer", help="TRL's GRPOTrainer vs train.py --algo grpo, single- or multi-turn, "
                          "same model, prompts, group, limits, reward (needs: pip install trl)")  # fmt: skip
    peer.add_argument("--model", default="auto", help="'demo', a model directory, or 'auto': the demo model, then "
                      f"Qwen2.5-Coder-0.5B-Instruct if {QWEN} exists")  # fmt: skip
    peer.add_argument("--prompts", type=int, default=2, help="prompts per step")
    peer.add_argument("--group_size", type=int, default=4, help="trajectories per prompt (G)")
    peer.add_argument(
        "--length",
        type=int,
        default=64,
        help="tokens sampled per turn at most (TRL caps only the whole conversation, at turns x (length + 64 "
        "for each tool output))",
    )
    peer.add_argument(
        "--turns",
        type=int,
        default=1,
        help="1: single-turn GRPO; 2-4: multi-turn tool calling (ours: ```python fences; TRL: "
        "tools=[python], JSON tool calls), both running code in our sandbox",
    )
    peer.add_argument("--micro_batch", type=int, default=0, help="trajectories per forward and backward on "
                      "both sides (0: the whole step's, prompts x group_size)")  # fmt: skip
    peer.add_argument("--steps", type=int, default=4, help="steps per run; the first is not timed")
    peer.add_argument("--rounds", type=int, default=2, help="runs of each, alternating")
    gpu = sub.add_parser("gpu", help="the GPU check: gpu tests, bf16 RL steps and their peak memory, rollout "
                         "vs generate, an FSDP2 step (without a GPU: a CPU dry run)")  # fmt: skip
    gpu.add_argument("model_dir", help="a Qwen2.5 directory (safetensors), or 'demo' for the tiny model")
    dty = sub.add_parser("dtype", help="fp32 vs bf16 compute over fp32 weights: a rollout and an update pass")
    dty.add_argument("--model", default="auto", help="'demo', a model directory, or 'auto': the demo model, then "
                     f"Qwen2.5-Coder-0.5B-Instruct if {QWEN} exists")  # fmt: skip
    dty.add_argument("--rows", type=int, default=2, help="trajectories in the rollout and sequences in the update")
    dty.add_argument("--new_tokens", type=int, default=16, help="tokens sampled per rollout trajectory")
    dty.add_argument("--update_tokens", type=int, default=64, help="tokens per sequence of the update pass")
    dty.add_argument("--rounds", type=int, default=2, help="timed rounds, each fp32 then bf16")
    args = parser.parse_args()
    if args.bench == "peer" and not 1 <= args.turns <= len(PEER_TURNS):
        parser.error(f"--turns {args.turns}: must be 1 to {len(PEER_TURNS)}")
    if args.bench == "peer" and args.micro_batch and (args.prompts * args.group_size) % args.micro_batch:
        parser.error(f"--micro_batch {args.micro_batch}: must divide prompts x group_size")
    benches = {"advantages": bench_advantages, "sandbox": bench_sandbox, "rollout": bench_rollout,
               "rewards": bench_rewards, "step": bench_step, "peer": bench_peer, "gpu": bench_gpu,
               "dtype": bench_dtype}  # fmt: skip
    benches[args.bench](args)


if __name__ == "__main__":
    main()
