"""TRL's GRPOTrainer next to train.py --algo grpo: the same local model, problems, group, token
limits and reward, single-turn or with multi-turn tool calls (ours: ```python fences; TRL's:
tools=[python], JSON tool calls), both running code in our sandbox; each run in a fresh process,
runs alternating. Needs `pip install trl` (never needed to train). docs/results.md says what
the two sides cannot make equal.
"""

import argparse
import functools
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import transformers

import model
import rollout
import sandbox
from tools.parts import QWEN, memorise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # train.py runs here


def digit_share(text):
    """The reward both trainers get in `python bench.py peer`: the share of digits in the completion, in
    [0, 1]. Any reward both can compute would do; this one differs between samples, so every
    group has signal and both train every sampled token."""
    return sum(c.isdigit() for c in text) / max(len(text), 1)


def peer_reward(record, row):
    """digit_share as train.py's reward plug-in: --reward_fn tools.peer:peer_reward."""
    return digit_share(record["final_text"])


def bench_peer(args):
    """TRL's GRPOTrainer against `train.py --algo grpo`: the same local model, prompts, group size,
    token limits and reward (digit_share); seconds, sampled tokens and tool calls per step of each,
    alternating runs in fresh processes, and the ratios. --turns 1: one completion per prompt (the
    untrained demo model, then Qwen2.5-Coder-0.5B-Instruct if present). --turns K > 1: multi-turn
    tool use, ours with ```python fences and our sandbox, TRL's with `tools=[python]` (JSON tool
    calls) running the same sandbox (the demo model taught both protocols, then Qwen2.5-Coder)."""
    if args.micro_batch and (args.prompts * args.group_size) % args.micro_batch:
        sys.exit(f"bench.py peer: error: --micro_batch {args.micro_batch}: must divide prompts x group_size")
    try:
        import trl
    except ImportError:
        print(
            "python bench.py peer compares with TRL's GRPOTrainer, an optional install (never a requirement of "
            "gtpo):\n    pip install trl -c constraints.txt\nTRL is not installed here: nothing measured."
        )
        return

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
    import tasks

    if args.turns == 1:
        toy = tasks.toy_problems(args.prompts, seed=3)
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
    "Compute 12345 * 6789 modulo {m} with Python, check the result with a second run, then give the \\boxed{{}} answer."
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
    settings = {
        "model": model_dir,
        "data": data_file,
        "algo": "grpo",
        "max_turns": args.turns,
        "first_turn_tool_call": "false",
        "reward_fn": "tools.peer:peer_reward",
        "sft_steps": 0,
        "eval_size": 0,
        "prompts_per_step": args.prompts,
        "group_size": args.group_size,
        "max_turn_tokens": args.length,
        "micro_batch_size": micro,
        "lr": "1e-6",
        "temperature": "1.0",
        "max_steps": args.steps,
        "save_every": 10**6,
        "out_dir": out,
    }
    flags = [*limits, *(word for name, value in settings.items() for word in (f"--{name}", str(value)))]
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


class StepTimes(transformers.TrainerCallback):
    """Seconds of each of a Trainer's optimizer steps."""

    def __init__(self):
        self.times = []

    def on_step_begin(self, *_, **__):
        self.start = time.perf_counter()

    def on_step_end(self, *_, **__):
        self.times.append(time.perf_counter() - self.start)


def _trl_steps(model_dir, problems, args, *, out):
    """[(seconds, sampled tokens, tool calls run)] of GRPOTrainer's steps after the first, timed by
    a callback (run in a new process, as train.py is)."""
    import datasets
    from trl import GRPOTrainer

    tokenizer = model.load_tokenizer(model_dir)
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

    trl_config = _trl_config(args, out)
    timer = StepTimes()
    dataset = datasets.Dataset.from_list([{"prompt": p} for p in prompts])
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=[reward],
        args=trl_config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
        tools=tools,
    )
    trainer.remove_callback(transformers.PrinterCallback)  # its per-step log lines
    trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    calls = [h.get("tools/call_frequency", 0.0) for h in logs]  # calls run per trajectory
    lengths = [h["completions/mean_length"] for h in logs]  # sampled tokens only, tool outputs masked
    return [(s, n * rows, c * rows) for s, n, c in zip(timer.times[1:], lengths[1:], calls[1:])]


def _trl_config(args, out):
    """TRL's GRPOConfig for the same batch, micro-batch, limits, learning rate and sampling as
    ours: one optimizer step per batch, no KL, token-level loss (dapo), fp32 weights (bf16
    autocast on CUDA), every activation kept (TRL's default recomputes them in backward)."""
    from trl import GRPOConfig

    rows = args.prompts * args.group_size
    cpu = not torch.cuda.is_available()
    micro = args.micro_batch or rows
    return GRPOConfig(
        output_dir=out,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=rows // micro,
        num_generations=args.group_size,
        max_completion_length=_trl_length(args),
        max_tool_calling_iterations=(args.turns - 1) or None,
        learning_rate=1e-6,
        beta=0.0,
        num_iterations=1,
        temperature=1.0,
        top_p=1.0,
        loss_type="dapo",
        max_steps=args.steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=cpu,
        bf16=not cpu,
        activation_checkpointing=False,
        seed=0,
        shuffle_dataset=False,
        disable_tqdm=True,
    )


def taught_turns(text):
    """--turns: 1 (single-turn) to len(PEER_TURNS), the turns the demo model is taught."""
    turns = int(text)
    if not 1 <= turns <= len(PEER_TURNS):
        raise argparse.ArgumentTypeError(f"--turns {turns}: must be 1 to {len(PEER_TURNS)}")
    return turns


def add_parsers(sub):
    """The subcommand peer, with its flags."""
    peer = sub.add_parser(
        "peer",
        help="TRL's GRPOTrainer vs train.py --algo grpo, single- or multi-turn, "
        "same model, prompts, group, limits, reward (needs: pip install trl)",
    )
    peer.add_argument(
        "--model",
        default="auto",
        help=f"'demo', a model directory, or 'auto': the demo model, then Qwen2.5-Coder-0.5B-Instruct if {QWEN} exists",
    )
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
        type=taught_turns,
        default=1,
        help="1: single-turn GRPO; 2-4: multi-turn tool calling (ours: ```python fences; TRL: "
        "tools=[python], JSON tool calls), both running code in our sandbox",
    )
    peer.add_argument(
        "--micro_batch",
        type=int,
        default=0,
        help="trajectories per forward and backward on both sides (0: the whole step's, prompts x group_size)",
    )
    peer.add_argument("--steps", type=int, default=4, help="steps per run; the first is not timed")
    peer.add_argument("--rounds", type=int, default=2, help="runs of each, alternating")
    peer.set_defaults(run=bench_peer)
