"""The multi-GPU path checked on a CPU-only machine: collectives get their tensors on the run's
device (gloo takes CPU tensors that NCCL refuses), no id the tokenizer lacks is sampled or
scored, SFT and evaluation keep to their batch sizes, a process group waits long enough, and
bf16 compute (the autocast path GPUs run) caches keys and values in one dtype."""

import ast
import contextlib
import dataclasses
import datetime
import glob
import os
import types

import pytest
import torch
import torch._lazy
import torch._lazy.ts_backend
import torch.distributed as dist

import config
import eval as evaluation
import grading
import metrics
import model
import parallel
import rewards
import rollout
import sandbox
import sft
import tasks
import train

from conftest import ROOT

torch._lazy.ts_backend.init()
LAZY = torch.device("lazy", 0)  # a device other than the CPU on which tensors still hold values


class RecordingDist:
    """A stand-in for torch.distributed in parallel.py: two ranks holding the same data (a sum
    doubles, a gather repeats), recording the device of every tensor handed to a collective and
    whether it came from parallel.on_device."""

    ReduceOp = dist.ReduceOp

    def __init__(self, monkeypatch):
        self.seen, self.placed = [], []  # (collective, device, placed by on_device); tensors kept alive
        placed_by = parallel.on_device

        def on_device(t, world):
            self.placed.append(placed_by(t, world))
            return self.placed[-1]

        monkeypatch.setattr(parallel, "on_device", on_device)
        monkeypatch.setattr(parallel, "dist", self)

    def _saw(self, name, t):
        self.seen.append((name, t.device, any(t is p for p in self.placed)))

    def all_reduce(self, t, op=None):
        self._saw("all_reduce", t)
        if op in (None, dist.ReduceOp.SUM):
            t.mul_(2)

    def all_gather(self, parts, t):
        self._saw("all_gather", t)
        for part in parts:
            part.copy_(t)

    def broadcast(self, t, src):
        self._saw("broadcast", t)

    def all_gather_object(self, out, obj):
        out[:] = [obj] * len(out)

    def broadcast_object_list(self, box, src):
        pass

    def barrier(self):
        pass

    def is_initialized(self):
        return True


def teacher_groups(tokenizer, session, problems=2, group_size=4):
    """Toy problems, each with the teacher's trajectory, one with a wrong answer, and copies."""
    trajs, rows = [], []
    for p in tasks.toy_problems(problems, seed=3):
        prompt = model.chat_prompt_ids(tokenizer, p["problem"], system=None)
        for turns in [p["teacher"], p["teacher"][:-1] + ["\\boxed{0}"]] * (group_size // 2):
            session.reset()
            trajs.append(rollout.teacher_trajectory(tokenizer, prompt, turns, session))
            rows.append(p)
    return trajs, rows


def test_every_collective_gets_its_tensors_on_the_runs_device(monkeypatch):
    """With the run's device other than the CPU (a lazy-tensor device) and a recording stand-in
    for torch.distributed, every tensor that scoring (GTPO and GRPO), dynamic sampling's
    filter, the update's planning,
    metrics reduction, evaluation, the parity check and broadcasting hand to a collective is on
    the run's device, and results come back on the caller's; with the CPU as the run's device
    the update and SFT hand over only tensors placed by parallel.on_device."""
    fake = RecordingDist(monkeypatch)
    tokenizer = model.tiny_tokenizer()
    policy = model.tiny_model(tokenizer, seed=0)
    world = parallel.World(0, 2, LAZY)
    with sandbox.Session() as session:
        trajs, rows = teacher_groups(tokenizer, session)
    group_index = torch.arange(2).repeat_interleave(4)
    grader = grading.Grader()
    for algo in ("gtpo", "grpo"):
        cfg = config.TrainConfig(algo=algo, prompts_per_step=4, group_size=4, micro_batch_size=2)
        derived = config.check_config(cfg, world)
        scored = rewards.score(
            trajs,
            rows,
            group_index,
            cfg=cfg,
            derived=derived,
            world=world,
            grader=grader,
            embedder=rewards.make_embedder("tokens", tokenizer),
        )
        assert scored.turn_advantages.device.type == "cpu" and scored.trained.any()
    halves = dataclasses.replace(cfg, mini_batch_size=4, micro_batch_size=2)
    plan = train.plan_minibatches(
        trajs, forwarded=scored.trained, counted=scored.counted, cfg=halves, world=world, pad=tokenizer.pad_token_id
    )
    assert plan[0].num_tokens == 2 * sum(sum(trajs[i].loss_mask) for i in (0, 4))  # both ranks' rows
    sums = metrics.step_sums(
        trajs,
        scored,
        groups=2,
        drawn=dict.fromkeys(metrics.DRAWN, 1),
        update_sums=dict.fromkeys(UPDATE_SUMS, 0.0),
        times=dict.fromkeys(("t_rollout", "t_reward", "t_old_logp", "t_update"), 0.0),
    )
    assert metrics.reduce(1, sums, lr=1e-3, world=world)["accuracy"] == 0.5
    scores = rewards.outcome_scores(trajs, rows, grader=grader)  # (8,) a right and a wrong one per pair
    monkeypatch.setattr(train, "sample_groups", lambda step, position, run: (rows[::4], trajs, scores))
    filtering = config.TrainConfig(prompts_per_step=4, group_size=4, filter_groups=True)
    stand_in = types.SimpleNamespace(data_position=0, cfg=filtering, world=world)
    stand_in.derived = config.check_config(filtering, world)
    drawn = train.draw_groups(1, stand_in)
    assert drawn.trajs == trajs and drawn.counts["groups_varied"] == 4
    with sandbox.Pool(4) as pool:
        run = train.RunState(
            cfg=cfg,
            derived=derived,
            world=world,
            policy=policy,
            tokenizer=tokenizer,
            wrapped=parallel.LogProbs(policy),
            pool=pool,
            grader=grader,
            problems=[],
        )
        accuracy = train.evaluate(run, rows[:1], temperature=0.0)
    assert 0 <= accuracy <= 1
    assert parallel.check_in_sync(parallel.LogProbs(policy), world) is True
    parallel.replicate(parallel.LogProbs(policy), world)
    on_lazy = set(fake.seen)
    assert {name for name, _, _ in on_lazy} == {"all_reduce", "all_gather", "broadcast"}
    assert {(device, placed) for _, device, placed in on_lazy} == {(LAZY, True)}

    fake.seen.clear()
    world = parallel.World(0, 2, torch.device("cpu"))
    cfg = config.TrainConfig(
        prompts_per_step=4, group_size=4, micro_batch_size=2, sft_steps=1, sft_batch_size=4, sft_check_every=0
    )
    wrapped = parallel.LogProbs(policy)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-3)
    train.update(
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
    sft.run(wrapped, tokenizer, [dict(p, turns=p["teacher"]) for p in rows[::4]], cfg=cfg, world=world)
    grader.close()
    assert fake.seen and all(placed for _, _, placed in fake.seen)


UPDATE_SUMS = (
    "loss",
    "clip_frac",
    "approx_kl",
    "ratio",
    "kl_ref",
    "grad_norm",
    "skipped",
    "optimizer_steps",
    "no_signal",
)
TENSOR_COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "reduce",
    "send",
    "recv",
    "isend",
    "irecv",
}
COLLECTIVES = TENSOR_COLLECTIVES | {
    "all_gather_object",
    "broadcast_object_list",
    "gather_object",
    "scatter_object_list",
    "barrier",
    "monitored_barrier",
}


def distributed_calls(tree):
    """(function name, collective) of every call of a torch.distributed collective in a module."""
    aliases = {
        a.asname or a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.Import)
        for a in n.names
        if a.name == "torch.distributed"
    }
    aliases |= (
        {"dist"}
        if any(
            isinstance(n, ast.ImportFrom) and n.module == "torch" and any(a.name == "distributed" for a in n.names)
            for n in ast.walk(tree)
        )
        else set()
    )
    calls = []
    for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
                owner = ast.unparse(node.func.value)
                if owner in aliases or owner == "torch.distributed":
                    calls.append((fn, node.func.attr))
    imported = [
        a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module == "torch.distributed"
        for a in n.names
        if a.name in COLLECTIVES
    ]
    return calls, imported


def test_only_parallel_calls_collectives_and_each_tensor_passes_through_on_device():
    """No project module but parallel.py calls a torch.distributed collective (they all go through
    parallel.py's helpers), and in parallel.py every function that hands a tensor to one also calls
    on_device."""
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "tests", "*.py"))):
        with open(path) as f:
            calls, imported = distributed_calls(ast.parse(f.read()))
        name = os.path.relpath(path, ROOT)
        assert not imported, f"{name} imports {imported} from torch.distributed"
        if name != "parallel.py":
            assert not calls, f"{name} calls {[c for _, c in calls]} directly: use parallel.py's helpers"
            continue
        assert calls, "parallel.py should hold the collectives"
        for fn, collective in calls:
            if collective in TENSOR_COLLECTIVES:
                called = {ast.unparse(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call)}
                assert "on_device" in called, f"parallel.{fn.name} hands {collective} a tensor not from on_device"


def test_the_process_group_waits_the_configured_timeout(monkeypatch):
    """Under torchrun the process group is made with an explicit timeout (default
    config.TIMEOUT_MINUTES, long enough for rank 0 to write a 7B checkpoint while the others
    wait), not the backend's own."""
    made = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(parallel.dist, "init_process_group", lambda backend, **kw: made.update(kw, backend=backend))
    monkeypatch.setattr(parallel.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(parallel.dist, "get_world_size", lambda: 2)
    world = parallel.setup_distributed("cpu")
    assert made == {"backend": "gloo", "timeout": datetime.timedelta(minutes=config.TIMEOUT_MINUTES)}
    assert world.size == 2 and config.TIMEOUT_MINUTES >= 30
    parallel.setup_distributed("cpu", timeout_minutes=90)
    assert made["timeout"] == datetime.timedelta(minutes=90)
    assert config.TrainConfig().dist_timeout == config.TIMEOUT_MINUTES


# ---------------------------------------------------------------- ids the tokenizer lacks


def padded_head_model(tokenizer, extra=64):
    """A tiny Qwen2 whose head has `extra` rows beyond the tokenizer (as Qwen2.5's has 271 or
    more), set along the mean final hidden state so that they would win most argmaxes."""
    policy = model.tiny_model(tokenizer, seed=0, vocab_size=len(tokenizer) + extra)
    ids = torch.randint(0, len(tokenizer), (8, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = policy.model(input_ids=ids).last_hidden_state.reshape(-1, policy.config.hidden_size)
        direction = hidden.mean(0)
        policy.get_output_embeddings().weight[len(tokenizer) :] = 10 * direction / direction.norm()
    return policy, ids


def test_no_id_beyond_the_tokenizer_is_sampled_or_scored():
    """With a head whose extra rows would win most argmaxes, sampled and greedy rollouts only
    produce ids the tokenizer has (no IndexError in the stop criterion, no undecodable token),
    and token log-probs are the softmax over the tokenizer's ids alone."""
    tokenizer = model.tiny_tokenizer()
    n = len(tokenizer)
    policy, ids = padded_head_model(tokenizer)
    with torch.no_grad():
        logits = policy(input_ids=ids).logits  # (8, 40, n + 64)
    assert (logits.argmax(-1) >= n).float().mean() > 0.5  # the extra rows would dominate
    prompts = [model.chat_prompt_ids(tokenizer, f"What is {k} times 7?", system=None) for k in range(4)]
    with sandbox.Pool(4) as pool, torch.no_grad():
        for temperature in (0.0, 1.0):
            cfg = rollout.RolloutConfig(max_turns=2, max_turn_tokens=16, max_total_tokens=120, temperature=temperature)
            trajs = rollout.rollout(policy, tokenizer, prompts, pool, cfg, seeds=list(range(4)))
            sampled = [t for tr in trajs for t, m in zip(tr.input_ids, tr.loss_mask) if m]
            assert sampled and max(sampled) < n
    with torch.no_grad():
        scored = parallel.LogProbs(policy, vocab_size=n)(ids, torch.ones_like(ids))  # (8, 40)
        whole = parallel.LogProbs(policy)(ids, torch.ones_like(ids))
    expected = logits[:, :-1, :n].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(scored[:, 1:], expected, atol=1e-5, rtol=0)
    assert (whole[:, 1:] - expected).abs().max() > 1  # the extra rows would have mattered


# ---------------------------------------------------------------- SFT and evaluation batch sizes


def forward_rows(wrapped):
    """Rows of every forward of wrapped, and whether it was told which positions are needed."""
    seen = []
    wrapped.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0].shape[0], kwargs.get("needed") is not None)), with_kwargs=True
    )
    return seen


def test_sft_forwards_micro_batches_and_its_gradient_does_not_depend_on_their_size():
    """SFT runs forwards of at most --micro_batch_size rows, each projecting only trained
    positions, and its loss and gradients are the same whatever that size (to float rounding)."""
    tokenizer = model.tiny_tokenizer()
    rows = [dict(p, turns=p["teacher"]) for p in tasks.toy_problems(6, seed=2, mistake_rate=0.5)]
    trajs = sft.teacher_trajectories(rows, tokenizer, system_prompt=None, timeout=10.0)
    world = parallel.World(0, 1, torch.device("cpu"))
    results = []
    for size in (6, 4, 1):
        policy = model.tiny_model(tokenizer, seed=0)
        wrapped = parallel.LogProbs(policy)
        seen = forward_rows(wrapped)
        loss = sft.accumulate(wrapped, trajs, pad=tokenizer.pad_token_id, micro_batch_size=size, world=world)
        assert [r for r, _ in seen] == [min(size, 6 - s) for s in range(0, 6, size)] and all(n for _, n in seen)
        results.append((loss, [p.grad.clone() for p in policy.parameters()]))
    for loss, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-6)
        for g, g0 in zip(grads, results[0][1]):
            torch.testing.assert_close(g, g0, atol=1e-6, rtol=1e-5)
    policy = model.tiny_model(tokenizer, seed=0)
    wrapped = parallel.LogProbs(policy)
    seen = forward_rows(wrapped)
    cfg = config.TrainConfig(sft_steps=1, sft_batch_size=6, micro_batch_size=2, sft_check_every=0)
    sft.run(wrapped, tokenizer, rows, cfg=cfg, world=world)
    assert [r for r, _ in seen] == [2, 2, 2]


def generate_rows(policy):
    """Rows of every generate call of policy."""
    seen, generate = [], policy.generate

    def recorded(**kwargs):
        seen.append(kwargs["input_ids"].shape[0])
        return generate(**kwargs)

    policy.generate = recorded
    return seen


def test_evaluation_generates_at_most_rollout_batch_size_trajectories_at_once(tmp_path):
    """train.py's held-out evaluation and eval.py both generate at most --rollout_batch_size
    trajectories at once (0: all of them)."""
    tokenizer = model.tiny_tokenizer()
    policy = model.tiny_model(tokenizer, seed=0)
    seen = generate_rows(policy)
    world = parallel.World(0, 1, torch.device("cpu"))
    problems = tasks.toy_held_out(7)
    for size, widest in ((3, 3), (0, 7)):
        cfg = config.TrainConfig(rollout_batch_size=size, max_turns=1, max_turn_tokens=8, eval_size=7)
        with sandbox.Pool(4) as pool:
            run = train.RunState(
                cfg=cfg,
                derived=config.check_config(cfg, world),
                world=world,
                policy=policy,
                tokenizer=tokenizer,
                wrapped=parallel.LogProbs(policy),
                pool=pool,
                grader=grading.Grader(),
                problems=[],
            )
            train.evaluate(run, problems, temperature=1.0)
            run.grader.close()
        assert max(seen) == widest and sum(seen) == 7
        seen.clear()
    cfg = evaluation.parse_config(
        config.EvalConfig,
        "eval.py",
        "",
        ["--model", "demo", "--data", "toy", "--rollout_batch_size", "2", "--max_turns", "1", "--max_turn_tokens", "8"],
    )
    evaluation.resolve(cfg)
    with sandbox.Pool(4) as pool:
        grader = grading.Grader()
        evaluation.evaluate_batch(
            ("toy", 0, list(enumerate(problems[:5]))),
            policy=policy,
            tokenizer=tokenizer,
            pool=pool,
            grader=grader,
            cfg=cfg,
        )
        grader.close()
    assert seen == [2, 2, 1]


# ---------------------------------------------------------------- bf16 compute


def test_a_bf16_rollout_caches_keys_and_values_in_bf16_over_fp32_weights():
    """Under bf16 compute over fp32 weights, a turn's KV cache holds keys and values in bf16
    alike (RoPE would otherwise make the keys fp32), and the weights stay fp32."""
    tokenizer = model.tiny_tokenizer()
    policy = model.tiny_model(tokenizer, seed=0)
    prompts = [model.chat_prompt_ids(tokenizer, f"What is {k} times 7?", system=None) for k in range(3)]
    ids, mask = rollout.left_pad(prompts, tokenizer.pad_token_id)
    cfg = rollout.RolloutConfig(max_turn_tokens=6, temperature=1.0)
    with torch.no_grad(), parallel.mixed_precision(policy, torch.bfloat16):
        _, (_, _, cache) = rollout.generate_turn(policy, tokenizer, ids, mask, [6] * 3, cfg, seeds=[1, 2, 3])
    assert {t.dtype for layer in cache.layers for t in (layer.keys, layer.values)} == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in policy.parameters())


def test_compute_dtype_auto_is_bf16_on_gpus_that_compute_it_and_fp32_elsewhere(monkeypatch):
    """--compute_dtype auto resolves by device: bf16 on a GPU with native bf16, fp32 on an older
    GPU (where bf16 is only emulated) and on the CPU; bf16 and fp32 are what they say."""
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(
            torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation
        )
        assert parallel.resolve_dtype("auto", "cuda:0") == expected == model.default_dtype("cuda")
    assert parallel.resolve_dtype("auto", "cpu") == torch.float32
    assert (
        parallel.resolve_dtype("bf16", "cpu") == torch.bfloat16
        and parallel.resolve_dtype("fp32", "cuda") == torch.float32
    )
    assert parallel.setup_distributed("cpu", "bf16").dtype == torch.bfloat16


def test_the_policy_embedder_gathers_once_per_call_on_every_rank_whatever_its_texts():
    """Step 3's policy embedder enters its gathering context (a collective under FSDP2) exactly
    once per call, for no code text, for one chunk's worth and for several chunks alike, so ranks with
    different trajectories never wait on each other."""
    tokenizer = model.tiny_tokenizer()
    entered = []

    @contextlib.contextmanager
    def gathered():
        entered.append(1)
        yield

    embedder = rewards.make_embedder("policy", tokenizer, model.tiny_model(tokenizer, seed=0), gathered=gathered)
    for texts in ([""] * 3, ["print(1)"], [f"print({k})" for k in range(70)]):
        entered.clear()
        assert embedder(texts).shape[0] == len(texts)
        assert entered == [1], len(texts)


def test_a_rank_without_held_out_problems_evaluates_nothing_and_joins_the_sum(monkeypatch):
    """With fewer held-out problems than ranks, a rank with none rolls nothing out and still
    takes part in the reduction (no crash while the other ranks wait)."""
    sums = []  # what this rank adds; the other rank had one problem, solved
    monkeypatch.setattr(parallel, "all_reduce", lambda values, world: sums.append(values) or [v + 1 for v in values])
    tokenizer = model.tiny_tokenizer()
    policy = model.tiny_model(tokenizer, seed=0)
    world = parallel.World(1, 2, torch.device("cpu"))
    cfg = config.TrainConfig(prompts_per_step=2, max_turns=1, max_turn_tokens=8)
    with sandbox.Pool(2) as pool:
        run = train.RunState(
            cfg=cfg,
            derived=config.check_config(cfg, world),
            world=world,
            policy=policy,
            tokenizer=tokenizer,
            wrapped=parallel.LogProbs(policy),
            pool=pool,
            grader=grading.Grader(),
            problems=[],
        )
        accuracy = train.evaluate(run, tasks.toy_held_out(1), temperature=0.0)
        run.grader.close()
    assert sums == [[0.0, 0.0]] and accuracy == 1.0
