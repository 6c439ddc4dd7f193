"""The GPU check (`python bench.py gpu MODEL_DIR`): the gpu-marked tests, bf16 RL steps
and their peak memory, rollout against plain generate, FSDP2 and DDP steps under torchrun, each
stage ok or FAILED in one table (without a GPU: a CPU dry run of every stage); and fp32 against
bf16 compute over fp32 weights (`dtype`).
"""

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import model
import parallel
import rollout
import sandbox
from tools.parts import QWEN, _bench_rollout_speed, rollout_problems

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # train.py and the tests run here


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
    print(
        f"device {device}; CPU kernels {torch.backends.cpu.get_cpu_capability()}, bf16 instructions: "
        f"{cpu_bf16_instructions()}; {torch.get_num_threads()} threads"
    )
    print(f"{'model':<34}{'phase':<9}{'fp32 s':>9}{'bf16 s':>9}{'bf16/fp32':>11}  tokens fp32 / bf16")
    for name in names:
        policy, tokenizer = model.load_policy(name, device, dtype=torch.float32, demo_size=(128, 3))
        prompts = [model.chat_prompt_ids(tokenizer, p, model.SYSTEM_PROMPT) for p in rollout_problems(args.rows)]
        longest = max(map(len, prompts)) + args.new_tokens + 1
        settings = rollout.RolloutConfig(max_turns=1, max_turn_tokens=args.new_tokens, max_total_tokens=longest)
        shape = (args.rows, args.update_tokens)
        ids = torch.randint(len(tokenizer), shape, generator=torch.Generator().manual_seed(0)).to(device)
        times = dtype_times(policy, tokenizer, prompts, ids, settings=settings, rounds=args.rounds)
        label = "demo (128x3)" if name == "demo" else os.path.basename(name.rstrip("/"))
        for phase in ("rollout", "update"):
            a, b = (statistics.median(times[dtype][phase]) for dtype in times)
            tokens = " / ".join(str(sum(times[dtype]["tokens"])) for dtype in times) if phase == "rollout" else ""
            print(f"{label:<34}{phase:<9}{a:>9.2f}{b:>9.2f}{b / a:>11.2f}  {tokens}")
        del policy
        gc.collect()


def dtype_times(policy, tokenizer, prompts, ids, *, settings, rounds):
    """{dtype: {rollout: [seconds], update: [seconds], tokens: [sampled]}} for fp32 and bf16,
    alternating over rounds after a warm-up round of each."""
    times = {dtype: {"rollout": [], "update": [], "tokens": []} for dtype in (torch.float32, torch.bfloat16)}
    with sandbox.Pool(max_workers=4, timeout=10) as pool:
        for r in range(rounds + 1):  # round 0 warms up
            for dtype, out in times.items():
                start = time.perf_counter()
                with torch.no_grad(), parallel.mixed_precision(policy, dtype):
                    trajs = rollout.rollout(policy, tokenizer, prompts, pool, settings, seeds=list(range(len(prompts))))
                middle = time.perf_counter()
                logp = parallel.LogProbs(policy, dtype, len(tokenizer))(ids, torch.ones_like(ids))  # (rows, L)
                logp.sum().backward()
                policy.zero_grad(set_to_none=True)
                if r:
                    out["rollout"].append(middle - start)
                    out["update"].append(time.perf_counter() - middle)
                    out["tokens"].append(sum(sum(t.loss_mask) for t in trajs))
    return times


def bench_gpu(args):
    """One command for a CUDA machine: the gpu-marked tests, two RL steps of MODEL_DIR in the
    compute dtype auto picks (bf16 on CUDA; peak memory beside the memory arithmetic), rollout
    tokens/s against plain generate on the same batch, one FSDP2 step under `torchrun
    --nproc_per_node 1` (NCCL) and, with two GPUs or more, one DDP and one FSDP2 step over 2
    processes with real problem groups (score's gathers run), each GPU's peak memory beside the
    arithmetic. Without a GPU the same stages run on the CPU (fp32, gloo) as a dry run and the
    command exits 0 if they pass; either way it exits 1 if any stage fails."""

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    where = (
        f"CUDA: {torch.cuda.get_device_name()}"
        if cuda
        else "no CUDA device: a CPU dry run (fp32, gloo) of the same stages"
    )
    print(f"bench.py gpu {args.model_dir} — {where}", flush=True)
    stages = [
        ("gpu-marked tests", _gpu_tests),
        ("two RL steps, compute dtype auto", _gpu_rl_steps),
        ("rollout vs plain generate", _gpu_rollout),
        ("FSDP2 step, torchrun 1 process", _gpu_fsdp_step),
    ]
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


GPU_RUN = [
    "--sft_steps",
    "0",
    "--eval_size",
    "0",
    "--prompts_per_step",
    "2",
    "--group_size",
    "4",
    "--max_turns",
    "2",
    "--max_turn_tokens",
    "64",
    "--max_total_tokens",
    "512",
    "--save_every",
    "1000",
    "--reward_fn",
    "tools.peer:peer_reward",
]  # every group has signal: every step trains


def trained_every_step(out_dir, steps):
    """Whether a run's metrics.jsonl has `steps` steps, each with an optimizer step."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return len(records) == steps and all(r["optimizer_steps"] >= 1 and not r["no_signal"] for r in records)


def _gpu_tests(args, *, device, tmp):
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    last = (done.stdout.strip().splitlines() or ["no output"])[-1]
    return done.returncode == 0, last + ("" if done.returncode == 0 else "\n" + done.stdout[-2000:])


def _gpu_rl_steps(args, *, device, tmp):
    """train.py in this process (its peak memory is this process's), two steps in the compute dtype auto picks."""
    import train

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cfg = train.parse_args(
        [
            "--model",
            args.model_dir,
            "--device",
            device,
            "--max_steps",
            "2",
            "--out_dir",
            os.path.join(tmp, "rl"),
            *GPU_RUN,
        ]
    )
    train.main(cfg)
    if not trained_every_step(cfg.out_dir, 2):
        return False, "a step took no optimizer step (see its metrics.jsonl)"
    P = parameter_count(args.model_dir)
    with open(os.path.join(cfg.out_dir, "summary.json")) as f:
        peak = f"peak {peak_kind(device)} {json.load(f)['peak_memory_gb'][0]:.2f} GB"
    return True, (
        f"{peak}; arithmetic: training state 16 B x {P / 1e6:,.1f}M parameters = "
        f"{16 * P / 1e9:.3f} GB, + KV cache + activations"
    )


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
    """What train.py's peak_memory_gb measures on device (parallel.peak_memory_gb)."""
    return "allocated" if device == "cuda" else "RSS (CPU, fp32: not the GPU figure)"


def _gpu_rollout(args, *, device, tmp):
    policy, tokenizer = model.load_policy(args.model_dir, device=device, dtype=torch.float32)
    problems = rollout_problems(8)
    settings = argparse.Namespace(
        batch=8, max_turns=2, max_turn_tokens=64, max_total_tokens=512, temperature=0.7, rounds=2
    )
    with parallel.mixed_precision(policy, parallel.resolve_dtype("auto", device)):  # as train.py's rollouts
        ratio = _bench_rollout_speed(policy, tokenizer, problems, settings)
    return True, f"multi-turn rollout at {ratio:.2f}x plain generate's tokens/s on the same batch"


def torchrun_step(args, *, device, out_dir, parallel, ranks):
    """One RL step of train.py under torchrun; (None, summary.json) or (the reason it failed, None)."""
    run = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(ranks),
        "train.py",
        "--model",
        args.model_dir,
        "--device",
        device,
        "--parallel",
        parallel,
        "--max_steps",
        "1",
        "--out_dir",
        out_dir,
        *GPU_RUN,
    ]
    done = subprocess.run(run, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        return f"exit {done.returncode}: {done.stderr.strip()[-1500:]}", None
    if not trained_every_step(out_dir, 1):
        return "the step took no optimizer step (see its metrics.jsonl)", None
    with open(os.path.join(out_dir, "summary.json")) as f:
        return None, json.load(f)


def _gpu_fsdp_step(args, *, device, tmp):
    error, _ = torchrun_step(args, device=device, out_dir=os.path.join(tmp, "fsdp"), parallel="fsdp", ranks=1)
    return (error is None, error or f"one RL step, fully_shard over 1 rank ({'nccl' if device == 'cuda' else 'gloo'})")


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
    return True, (
        f"peak {peak_kind(device)} per rank {peaks} GB; arithmetic: training state {state / 1e9:.3f} GB per rank, "
        "+ KV cache + activations"
    )


def add_parsers(sub):
    """The subcommands gpu and dtype, with their flags."""
    gpu = sub.add_parser(
        "gpu",
        help="the GPU check: gpu tests, bf16 RL steps and their peak memory, rollout "
        "vs generate, an FSDP2 step (without a GPU: a CPU dry run)",
    )
    gpu.add_argument("model_dir", help="a Qwen2.5 directory (safetensors), or 'demo' for the tiny model")
    dty = sub.add_parser("dtype", help="fp32 vs bf16 compute over fp32 weights: a rollout and an update pass")
    dty.add_argument(
        "--model",
        default="auto",
        help=f"'demo', a model directory, or 'auto': the demo model, then Qwen2.5-Coder-0.5B-Instruct if {QWEN} exists",
    )
    dty.add_argument("--rows", type=int, default=2, help="trajectories in the rollout and sequences in the update")
    dty.add_argument("--new_tokens", type=int, default=16, help="tokens sampled per rollout trajectory")
    dty.add_argument("--update_tokens", type=int, default=64, help="tokens per sequence of the update pass")
    dty.add_argument("--rounds", type=int, default=2, help="timed rounds, each fp32 then bf16")
    gpu.set_defaults(run=bench_gpu)
    dty.set_defaults(run=bench_dtype)
