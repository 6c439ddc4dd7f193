"""train.py on the tiny model: the RL step trains, GRPO is GTPO's reduction, data parallelism and
resumption are exact, and bad input is one clear error line."""

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import types
import unittest.mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import checkpoint
import config
import grading
import gtpo
import metrics
import model
import parallel
import reports
import rewards
import rollout
import sandbox
import sft
import tasks
import train

from conftest import ROOT, SMALL, run_script, torchrun


def weights(directory):
    return load_file(os.path.join(directory, "model.safetensors"))


def train_config(sft_model, out_dir, **overrides):
    return config.TrainConfig(model=sft_model, sft_steps=0, out_dir=str(out_dir), **{**SMALL, **overrides})


# A run of two RL steps with a KL term, a checkpoint and a sample dump per step: what one run checks
# (every parameter trained, the metrics) and the straight run that a resumed fp32 run must equal.
TWO_STEPS = dict(max_steps=2, save_every=1, sample_every=1, kl_coef=0.05)


# The practitioner's controls together, over TWO_STEPS: the run one process makes, that two ranks
# and a resumed run must equal.
CONTROLS = dict(TWO_STEPS, filter_groups=True, max_filter_rounds=3, mask_truncated=True, mask_void_turns=True)


@pytest.fixture(scope="module")
def controlled(sft_model, tmp_path_factory):
    """The out_dir of CONTROLS's run (fp32, one process, made once)."""
    out = tmp_path_factory.mktemp("controls")
    train.main(train_config(sft_model, out, compute_dtype="fp32", **CONTROLS))
    return out


@pytest.fixture(scope="module")
def two_steps(sft_model, tmp_path_factory):
    """The out_dir of TWO_STEPS's run (fp32, made once)."""
    out = tmp_path_factory.mktemp("two_steps")
    train.main(train_config(sft_model, out, compute_dtype="fp32", **TWO_STEPS))
    return out


STEP_MODULES = {"model.py", "rollout.py", "rewards.py", "gtpo.py", "parallel.py"}  # and train.py itself


def test_one_rl_steps_code_calls_into_five_project_modules(sft_model, tmp_path, monkeypatch):
    """A reader following one RL step (train.rl_step, with a KL term so that every pass runs)
    opens at most six files: train.py's step code calls into no project module but STEP_MODULES
    (the sandbox and the grader sit behind rollout and rewards; data order, metrics and
    checkpoints are the loop's, outside the step)."""
    train_py, called = os.path.join(ROOT, "train.py"), set()

    def watch(frame, event, arg):
        if event == "call" and frame.f_back is not None and frame.f_back.f_code.co_filename == train_py:
            path = frame.f_code.co_filename
            if os.path.dirname(path) == ROOT and path != train_py:
                called.add(os.path.basename(path))

    def watched_step(*args, real=train.rl_step, **kwargs):
        sys.setprofile(watch)
        try:
            return real(*args, **kwargs)
        finally:
            sys.setprofile(None)

    monkeypatch.setattr(train, "rl_step", watched_step)
    train.main(train_config(sft_model, tmp_path, max_steps=1, kl_coef=0.05, mini_batch_size=8))
    assert called and called <= STEP_MODULES, called


def test_two_rl_steps_change_every_parameter_with_finite_metrics(sft_model, two_steps):
    """Two RL steps (with a KL term) move every parameter tensor of the policy, log finite metrics
    with every field (and the credit view, covering every turn), and leave a summary with the
    seed and the environment it ran in; the checkpoint is a loadable HF model; the sample dumps
    hold each turn's reward, return and advantage, consistent with gamma."""
    tmp_path = two_steps
    before, after = weights(sft_model), weights(tmp_path / "checkpoints" / "step_2")
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"not trained: {unchanged}"
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        credit = r.pop("credit")  # {"turn/call/end": [mean advantage or None, turns]}
        assert all(isinstance(v, (int, float)) and v == v and abs(v) != float("inf") for v in r.values()), r
        assert set(metrics.FIELDS) <= set(r)
        assert len(credit) == config.TrainConfig.max_turns * 3 * 2  # K turn indices x 3 kinds of call x 2 ends
        every_turn = round(r["turns"] * SMALL["prompts_per_step"] * SMALL["group_size"])
        assert sum(n for _, n in credit.values()) == every_turn and 0 <= r["credit_neg_correct"] <= 1
    assert records[0]["kl"] == 0 < records[1]["kl"], "step 1 samples from the reference itself"
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["seed"] == 0 and summary["ranks_in_sync"] is True
    assert summary["environment"] == parallel.environment(parallel.World(0, 1, torch.device("cpu")))
    reloaded, _ = model.load_policy(str(tmp_path / "checkpoints" / "step_2"))
    assert torch.equal(reloaded.model.embed_tokens.weight, after["model.embed_tokens.weight"])
    dump = reports.load_report(tmp_path / "samples" / "step_1.json")  # what `eval.py --show` reads
    assert len(dump["problems"]) == 2 and all(len(p["samples"]) == SMALL["group_size"] for p in dump["problems"])
    for s in (s for p in dump["problems"] for s in p["samples"]):
        r, R = [t["reward"] for t in s["turns"]], [t["return"] for t in s["turns"]]
        for j in range(len(r)):  # the dumped returns are the discounted sums of the dumped rewards
            assert R[j] == pytest.approx(r[j] + (0.9 * R[j + 1] if j + 1 < len(r) else 0.0), abs=1e-5)
    assert re.search(
        r"--- turn 1 · \d+ tokens trained · r [+-]\d\.\d{3} · R .* · A ", reports.show_text(dump["problems"][0])
    )


def single_turn_group(tokenizer, session):
    """Single-turn trajectories (one tool call and the answer in the same turn, no format
    error), some right and some wrong, in two groups."""
    trajs, golds = [], []
    for a, b in ((2, 3), (40, 2)):
        prompt = model.chat_prompt_ids(tokenizer, f"What is {a} + {b}?", system=None)
        for guess in (a + b, a + b + 1, a + b, a - b):
            session.reset()
            text = f"```python\nprint({a} + {b})\n```\n\\boxed{{{guess}}}"
            trajs.append(rollout.teacher_trajectory(tokenizer, prompt, [text], session))
            golds.append(str(a + b))
    return trajs, golds


def test_grpo_is_gtpo_reduced_on_single_turn_data():
    """On single-turn trajectories without format errors, GTPO with group normalisation and no
    shaping (any gamma) gives exactly GRPO's advantages and therefore the same update."""
    tokenizer = model.tiny_tokenizer()
    with sandbox.Session() as session:
        trajs, golds = single_turn_group(tokenizer, session)
    assert all(len(t.turns) == 1 and t.turns[0].valid_call for t in trajs)
    world = parallel.World(0, 1, torch.device("cpu"))
    group_index = torch.arange(2).repeat_interleave(4)
    results = []
    for algo, gamma in (("grpo", 0.9), ("gtpo", 0.5), ("gtpo", 1.0)):
        cfg = config.TrainConfig(
            algo=algo,
            gamma=gamma,
            shaping="none",
            adv_norm="group",
            prompts_per_step=2,
            group_size=4,
            micro_batch_size=3,
            lr=1e-2,
        )
        derived = config.check_config(cfg, world)
        scored = rewards.score(
            trajs,
            [{"answer": g} for g in golds],
            group_index,
            cfg=cfg,
            derived=derived,
            world=world,
            grader=grading.Grader(),
        )
        policy = model.tiny_model(tokenizer, seed=0).train()
        wrapped = parallel.wrap(policy, world, cfg.parallel)
        optimizer = torch.optim.AdamW(wrapped.parameters(), lr=cfg.lr)
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
        results.append((scored.turn_advantages, policy.state_dict()))
    (adv_grpo, grpo), *gtpos = results
    assert adv_grpo.abs().sum() > 0, "the data must have reward variance"
    for adv, params in gtpos:
        assert torch.equal(adv, adv_grpo)
        assert all(torch.equal(params[k], grpo[k]) for k in grpo)


def test_a_non_finite_loss_skips_the_step_and_keeps_the_weights(capsys):
    """A NaN in the advantages makes the gradient non-finite: the optimizer step is skipped with a
    warning, the parameters are untouched, and the next finite update trains normally."""
    tokenizer = model.tiny_tokenizer()
    with sandbox.Session() as session:
        trajs, _ = single_turn_group(tokenizer, session)
    world = parallel.World(0, 1, torch.device("cpu"))
    cfg = config.TrainConfig(prompts_per_step=2, group_size=4, micro_batch_size=4)
    policy = model.tiny_model(tokenizer, seed=0).train()
    wrapped = parallel.wrap(policy, world, cfg.parallel)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    advantages = torch.zeros(8, cfg.max_turns)
    advantages[:, 0] = torch.tensor([1.0, -1.0] * 4)
    advantages[3, 0] = float("nan")
    everyone = torch.ones(8, dtype=torch.bool)
    sums, _ = train.update(
        wrapped,
        optimizer,
        trajs,
        turn_advantages=advantages,
        trained=everyone,
        counted=everyone,
        cfg=cfg,
        world=world,
        pad=0,
    )
    assert sums["skipped"] == 1 and "non-finite" in capsys.readouterr().out
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    advantages[3, 0] = 1.0
    sums, _ = train.update(
        wrapped,
        optimizer,
        trajs,
        turn_advantages=advantages,
        trained=everyone,
        counted=everyone,
        cfg=cfg,
        world=world,
        pad=0,
    )
    assert sums["skipped"] == 0 and not all(torch.equal(before[k], v) for k, v in policy.state_dict().items())


def without_signal_and_a_sandbox_failure(tokenizer):
    """single_turn_group with the second group all wrong (no signal) and row 1's sandbox failed."""
    with sandbox.Session() as session:
        trajs, golds = single_turn_group(tokenizer, session)
    golds[4:] = ["999"] * 4
    trajs[1].turns[0].result = sandbox.Result(False, "", "sandbox failure\n", infra_error=True)
    return trajs, golds


def test_groups_with_all_zero_advantages_and_sandbox_failures_are_not_trained():
    """A group whose trajectories all score the same, and a trajectory whose sandbox failed,
    have trained=False; every other row of a group with signal is trained."""
    tokenizer = model.tiny_tokenizer()
    trajs, golds = without_signal_and_a_sandbox_failure(tokenizer)
    world = parallel.World(0, 1, torch.device("cpu"))
    cfg = config.TrainConfig(shaping="none", prompts_per_step=2, group_size=4)
    scored = rewards.score(
        trajs,
        [{"answer": g} for g in golds],
        torch.arange(2).repeat_interleave(4),
        cfg=cfg,
        derived=config.check_config(cfg, world),
        world=world,
        grader=grading.Grader(),
    )
    assert scored.trained.tolist() == [True, False, True, True, False, False, False, False]
    assert (scored.turn_advantages[1] == 0).all()


def random_rollouts(tokenizer, policy, temperature, n=8):
    """n sampled single-problem rollouts of a tiny policy, with the sampler's own log-probs."""
    cfg = rollout.RolloutConfig(
        max_turns=2, max_turn_tokens=24, max_total_tokens=200, temperature=temperature, record_logprobs=True
    )
    prompts = [model.chat_prompt_ids(tokenizer, f"What is {k} times 7?", system=None) for k in range(n)]
    with sandbox.Pool(max_workers=4, timeout=5) as pool:
        return rollout.rollout(policy, tokenizer, prompts, pool, cfg, seeds=list(range(n)))


def spy_on_old_logprobs(monkeypatch):
    """Record the batches and outputs of every train.no_grad_logprobs call."""
    calls, original = [], train.no_grad_logprobs

    def spy(wrapped, mb, **settings):
        out = original(wrapped, mb, **settings)
        calls.append((mb.batch, out))
        return out

    monkeypatch.setattr(train, "no_grad_logprobs", spy)
    return calls


def test_old_logprobs_are_the_samplers_own_at_the_sampling_temperature(monkeypatch):
    """At temperature 0.7 the update's old log-probs (computed before its first optimizer step)
    equal the sampler's own to 1e-4, and differ from the same tokens scored at temperature 1."""
    tokenizer = model.tiny_tokenizer()
    policy = model.tiny_model(tokenizer, seed=0)
    trajs = random_rollouts(tokenizer, policy, temperature=0.7)
    world = parallel.World(0, 1, torch.device("cpu"))
    cfg = config.TrainConfig(prompts_per_step=2, group_size=4, mini_batch_size=4, temperature=0.7, micro_batch_size=3)
    calls = spy_on_old_logprobs(monkeypatch)
    everything = rollout.collate(trajs, tokenizer.pad_token_id)
    with torch.no_grad():  # the same tokens scored at temperature 1, before the update
        at_one = model.token_logprobs(policy, everything["input_ids"], everything["attention_mask"])
    wrapped = parallel.wrap(policy.train(), world, cfg.parallel)
    everyone = torch.ones(8, dtype=torch.bool)
    advantages = torch.tensor([1.0, -1.0] * 4)[:, None].expand(8, cfg.max_turns)
    train.update(
        wrapped,
        torch.optim.SGD(wrapped.parameters(), lr=0.1),
        trajs,
        turn_advantages=advantages,
        trained=everyone,
        counted=everyone,
        cfg=cfg,
        world=world,
        pad=tokenizer.pad_token_id,
    )
    assert len(calls) == 2, "one pass per mini-batch, both before the first optimizer step"
    for batch, old in calls:
        mask = batch["loss_mask"]
        sampler = torch.tensor(
            [t.sample_logp + [0.0] * (mask.shape[1] - len(t.sample_logp)) for t in rows_of(batch, trajs)]
        )
        torch.testing.assert_close(old[mask], sampler[mask], atol=1e-4, rtol=0)
    mask = everything["loss_mask"]
    sampler = torch.tensor([t.sample_logp + [0.0] * (mask.shape[1] - len(t.sample_logp)) for t in trajs])
    assert (at_one[mask] - sampler[mask]).abs().max() > 1e-2, "temperature 1 scores differ from the sampler's"


def rows_of(batch, trajs):
    """The trajectory of each row of a collated batch, matched by its tokens."""
    by_ids = {tuple(t.input_ids): t for t in trajs}
    widths = batch["attention_mask"].sum(1).tolist()
    return [by_ids[tuple(batch["input_ids"][k, :w].tolist())] for k, w in enumerate(widths)]


def test_one_optimizer_step_skips_the_old_logprob_pass_and_changes_nothing(monkeypatch):
    """With one mini-batch and one epoch the update runs no separate old-log-prob pass (the ratio
    is 1 by construction) and ends at the same parameters, to 1e-6, as with the pass."""
    tokenizer = model.tiny_tokenizer()
    trajs = random_rollouts(tokenizer, model.tiny_model(tokenizer, seed=0), temperature=1.0)
    world = parallel.World(0, 1, torch.device("cpu"))
    cfg = config.TrainConfig(prompts_per_step=2, group_size=4, micro_batch_size=3)
    everyone = torch.ones(8, dtype=torch.bool)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5] * 2)[:, None].expand(8, cfg.max_turns)
    calls = spy_on_old_logprobs(monkeypatch)
    results = []
    for always in (False, True):
        policy = model.tiny_model(tokenizer, seed=0).train()
        wrapped = parallel.wrap(policy, world, cfg.parallel)
        if always:
            monkeypatch.setattr(train, "needs_old_logprobs", lambda cfg, num_minibatches: True)
        sums, _ = train.update(
            wrapped,
            torch.optim.AdamW(wrapped.parameters(), lr=1e-2),
            trajs,
            turn_advantages=advantages,
            trained=everyone,
            counted=everyone,
            cfg=cfg,
            world=world,
            pad=tokenizer.pad_token_id,
        )
        assert len(calls) == int(always) and sums["optimizer_steps"] == 1 and sums["ratio"] == pytest.approx(1.0)
        results.append(policy.state_dict())
    for name, value in results[0].items():
        torch.testing.assert_close(value, results[1][name], atol=1e-6, rtol=0)


def test_the_denominator_counts_every_sampled_token_and_zero_advantage_rows_get_no_forward():
    """Mini-batch k holds rows i with i mod M = k; its denominator is the sampled tokens of all
    its rows but sandbox failures (zero-advantage groups included), or of its trained rows only
    with --loss_denominator signal; only trained rows are in its batch."""
    tokenizer = model.tiny_tokenizer()
    trajs, golds = without_signal_and_a_sandbox_failure(tokenizer)
    world = parallel.World(0, 1, torch.device("cpu"))
    sampled = [sum(t.loss_mask) for t in trajs]
    for denominator in ("sampled", "signal"):
        cfg = config.TrainConfig(
            shaping="none", prompts_per_step=2, group_size=4, mini_batch_size=4, loss_denominator=denominator
        )
        scored = rewards.score(
            trajs,
            [{"answer": g} for g in golds],
            torch.arange(2).repeat_interleave(4),
            cfg=cfg,
            derived=config.check_config(cfg, world),
            world=world,
            grader=grading.Grader(),
        )
        plan = train.plan_minibatches(
            trajs, forwarded=scored.trained, counted=scored.counted, cfg=cfg, world=world, pad=tokenizer.pad_token_id
        )
        assert len(plan) == 2
        for k, mb in enumerate(plan):
            members = range(k, 8, 2)
            counted = [i for i in members if i != 1 and (denominator == "sampled" or i < 4)]
            assert mb.num_tokens == sum(sampled[i] for i in counted)
            assert mb.num_seqs == len(counted)
            forwarded = sorted(t.input_ids for t in rows_of(mb.batch, trajs))
            assert forwarded == sorted(trajs[i].input_ids for i in members if i < 4 and i != 1)
            assert mb.forwarded_tokens == sum(sampled[i] for i in members if i < 4 and i != 1)


def test_several_minibatches_move_the_ratio_and_clip():
    """Four mini-batches of one batch: the later ones see a policy already moved by the earlier
    steps, so the logged ratio departs from 1, approx_kl is positive and clipping acts; the
    statistics are means over the four optimizer steps."""
    tokenizer = model.tiny_tokenizer()
    trajs = random_rollouts(tokenizer, model.tiny_model(tokenizer, seed=0), temperature=1.0)
    world = parallel.World(0, 1, torch.device("cpu"))
    everyone = torch.ones(8, dtype=torch.bool)
    advantages = torch.tensor([1.0, -1.0] * 4)[:, None].expand(8, 4)
    stats = {}
    for mini in (0, 2):
        cfg = config.TrainConfig(prompts_per_step=2, group_size=4, mini_batch_size=mini, micro_batch_size=4)
        policy = model.tiny_model(tokenizer, seed=0).train()
        wrapped = parallel.wrap(policy, world, cfg.parallel)
        stats[mini], _ = train.update(
            wrapped,
            torch.optim.AdamW(wrapped.parameters(), lr=3e-2),
            trajs,
            turn_advantages=advantages,
            trained=everyone,
            counted=everyone,
            cfg=cfg,
            world=world,
            pad=tokenizer.pad_token_id,
        )
    assert stats[0]["optimizer_steps"] == 1 and stats[0]["clip_frac"] == 0 and stats[0]["approx_kl"] == 0
    assert stats[2]["optimizer_steps"] == 4
    assert stats[2]["clip_frac"] > 0 and stats[2]["approx_kl"] > 0 and stats[2]["ratio"] != pytest.approx(1.0)


def truncated_and_void(tokenizer):
    """Two groups of four two-turn trajectories (a call, then an answer), one of each group right;
    row 1 cut off by a token limit in its second turn, row 5 ending on a turn of prose (a void
    turn: no call, no answer), row 6 both."""
    trajs, golds = [], []
    with sandbox.Session() as session:
        for a, b in ((2, 3), (40, 2)):
            prompt = model.chat_prompt_ids(tokenizer, f"What is {a} + {b}?", system=None)
            for k, guess in enumerate((a + b, a + b + 1, a + b + 2, a - b)):
                session.reset()
                last = f"so \\boxed{{{guess}}}" if (a, k) not in ((40, 1), (40, 2)) else "I am not sure."
                trajs.append(
                    rollout.teacher_trajectory(tokenizer, prompt, [f"```python\nprint({a} + {b})\n```", last], session)
                )
                golds.append(str(a + b))
    for i in (1, 6):
        trajs[i].stop_reason = "max_length"
    return trajs, golds


@pytest.mark.parametrize(
    "flags, masked",
    [
        ({"mask_truncated": True}, [1, 6]),
        ({"mask_void_turns": True}, [5, 6]),
        ({"mask_truncated": True, "mask_void_turns": True}, [1, 5, 6]),
    ],
)
def test_masked_trajectories_stay_in_their_groups_statistics_but_get_no_gradient_and_no_denominator(flags, masked):
    """--mask_truncated (rows stopped at a token limit) and --mask_void_turns (rows with a turn
    that neither calls nor answers), alone and together: the masked rows keep their rewards and
    advantages and the other rows' advantages are unchanged (they stay in their group's
    statistics); they are neither trained nor counted, the denominator is the other rows'
    sampled tokens, and the update does not depend on their tokens (scrambled, the weights are
    bit-identical; without the flags, scrambling them changes the weights)."""
    tokenizer = model.tiny_tokenizer()
    trajs, golds = truncated_and_void(tokenizer)
    world = parallel.World(0, 1, torch.device("cpu"))
    scores = {}
    for name, extra in (("plain", {}), ("masked", flags)):
        cfg = config.TrainConfig(shaping="none", prompts_per_step=2, group_size=4, **extra)
        scores[name] = rewards.score(
            trajs,
            [{"answer": g} for g in golds],
            torch.arange(2).repeat_interleave(4),
            cfg=cfg,
            derived=config.check_config(cfg, world),
            world=world,
            grader=grading.Grader(),
        )
    plain, scored = scores["plain"], scores["masked"]
    assert scored.truncated.nonzero().flatten().tolist() == [1, 6] and scored.void.nonzero().flatten().tolist() == [
        5,
        6,
    ]
    assert scored.masked.nonzero().flatten().tolist() == masked and not plain.masked.any()
    assert torch.equal(scored.turn_advantages, plain.turn_advantages) and (scored.turn_advantages[masked] != 0).any()
    assert not (scored.trained[masked] | scored.counted[masked]).any()
    assert scored.counted.sum() == 8 - len(masked) and plain.trained.all()
    plan = train.plan_minibatches(
        trajs,
        forwarded=scored.trained,
        counted=scored.counted,
        cfg=dataclasses.replace(cfg, mini_batch_size=0, micro_batch_size=16),
        world=world,
        pad=tokenizer.pad_token_id,
    )
    assert plan[0].num_tokens == sum(sum(t.loss_mask) for i, t in enumerate(trajs) if i not in masked)

    def updated(score, trajectories):
        torch.manual_seed(0)
        policy = model.tiny_model(tokenizer, seed=0).train()
        wrapped = parallel.wrap(policy, world, "ddp")
        train.update(
            wrapped,
            torch.optim.SGD(wrapped.parameters(), lr=0.5),
            trajectories,
            turn_advantages=score.turn_advantages,
            trained=score.trained,
            counted=score.counted,
            cfg=config.TrainConfig(prompts_per_step=2, group_size=4),
            world=world,
            pad=tokenizer.pad_token_id,
        )
        return policy.state_dict()

    scrambled = [
        dataclasses.replace(t, input_ids=[(x * 7 + 3) % 300 if m else x for x, m in zip(t.input_ids, t.loss_mask)])
        if i in masked
        else t
        for i, t in enumerate(trajs)
    ]
    for score, differ in ((scored, False), (plain, True)):
        before, after = updated(score, trajs), updated(score, scrambled)
        assert any(not torch.equal(before[n], after[n]) for n in before) is differ


def test_with_a_kl_penalty_zero_advantage_rows_are_forwarded_and_the_loss_is_the_full_batch_loss():
    """With kl_coef > 0 every counted row has a loss (its KL term), so the update's loss equals
    policy_loss over all counted rows at once, zero-advantage group included, with their token
    count as the denominator."""
    tokenizer = model.tiny_tokenizer()
    trajs, golds = without_signal_and_a_sandbox_failure(tokenizer)
    world = parallel.World(0, 1, torch.device("cpu"))
    cfg = config.TrainConfig(shaping="none", prompts_per_step=2, group_size=4, kl_coef=0.5, micro_batch_size=3)
    scored = rewards.score(
        trajs,
        [{"answer": g} for g in golds],
        torch.arange(2).repeat_interleave(4),
        cfg=cfg,
        derived=config.check_config(cfg, world),
        world=world,
        grader=grading.Grader(),
    )
    policy, reference = model.tiny_model(tokenizer, seed=0).train(), model.tiny_model(tokenizer, seed=1)
    ref = parallel.LogProbs(reference.eval().requires_grad_(False))
    counted = [i for i in range(8) if scored.counted[i]]
    batch = rollout.collate([trajs[i] for i in counted], tokenizer.pad_token_id)
    with torch.no_grad():
        logp = model.token_logprobs(policy, batch["input_ids"], batch["attention_mask"])
        ref_logp = model.token_logprobs(reference, batch["input_ids"], batch["attention_mask"])
    advantages = gtpo.token_advantages(scored.turn_advantages[counted], batch["token_turn"])
    expected, _ = gtpo.policy_loss(logp, logp, advantages, batch["loss_mask"], ref_logp=ref_logp, kl_coef=0.5)
    wrapped = parallel.wrap(policy, world, cfg.parallel)
    sums, _ = train.update(
        wrapped,
        torch.optim.SGD(wrapped.parameters(), lr=0.0),
        trajs,
        turn_advantages=scored.turn_advantages,
        trained=scored.trained,
        counted=scored.counted,
        cfg=cfg,
        world=world,
        pad=tokenizer.pad_token_id,
        ref=ref,
    )
    assert sums["loss"] == pytest.approx(float(expected), abs=1e-6) and sums["kl_ref"] > 0


def test_the_credit_view_is_the_mean_advantage_by_turn_tool_call_and_end():
    """A hand-built batch gives the credit table by hand: each (turn index, tool call ok / error /
    none, trajectory correct / wrong) cell holds its turns' mean advantage and count (an
    unparsable call is an error; a trajectory with a sandbox failure counts nowhere); the shares
    are correct trajectories' turns with A < 0 and erroring turns with A > 0. Sums from two
    ranks' halves give the same view as the whole batch."""
    ran = lambda ok: sandbox.Result(ok=ok, stdout="", stderr="")
    call = lambda result, valid=True: rollout.Turn(text="```python\n1\n```", code="1", valid_call=valid, result=result)
    answer = rollout.Turn(text="\\boxed{1}")
    infra = sandbox.Result(ok=False, stdout="", stderr="", infra_error=True)
    turns = [
        [call(ran(True)), answer],
        [call(ran(False)), call(ran(True)), answer],
        [call(None, valid=False), answer],
        [call(infra), answer],
    ]
    trajs = [rollout.Trajectory(0, [], [], [], turns=t) for t in turns]
    advantages = torch.tensor(
        [[0.5, -0.25, 0.0], [-1.0, 0.375, -0.5], [0.625, 0.125, 0.0], [0.75, 0.75, 0.0]]
    )  # (N, K)
    scored = types.SimpleNamespace(
        turn_advantages=advantages,
        correct=torch.tensor([True, False, True, False]),
        infra=torch.tensor([False, False, False, True]),
    )
    view = metrics.credit_view(metrics.credit_sums(trajs, scored))
    expected = {
        "1/ok/correct": [0.5, 1],
        "1/error/wrong": [-1.0, 1],
        "1/error/correct": [0.625, 1],
        "2/none/correct": [-0.0625, 2],
        "2/ok/wrong": [0.375, 1],
        "3/none/wrong": [-0.5, 1],
    }
    assert len(view["credit"]) == 3 * 3 * 2
    assert {cell: v for cell, v in view["credit"].items() if v[1]} == expected
    assert all(v == [None, 0] for cell, v in view["credit"].items() if cell not in expected)
    assert view["credit_neg_correct"] == 1 / 4 and view["credit_pos_error"] == 1 / 2
    halves = [
        metrics.credit_sums(
            trajs[i : i + 2], types.SimpleNamespace(**{k: v[i : i + 2] for k, v in vars(scored).items()})
        )
        for i in (0, 2)
    ]
    assert metrics.credit_view({k: halves[0][k] + halves[1][k] for k in halves[0]}) == view


def test_logged_statistics_are_means_over_the_optimizer_steps(monkeypatch):
    """clip_frac, approx_kl and ratio are, per optimizer step, token-weighted over its trained
    tokens, then averaged over the steps (two mini-batches, two epochs: four steps)."""
    tokenizer = model.tiny_tokenizer()
    trajs = random_rollouts(tokenizer, model.tiny_model(tokenizer, seed=0), temperature=1.0)
    world = parallel.World(0, 1, torch.device("cpu"))
    everyone = torch.ones(8, dtype=torch.bool)
    cfg = config.TrainConfig(prompts_per_step=2, group_size=4, mini_batch_size=4, ppo_epochs=2, micro_batch_size=3)
    seen, original = [], gtpo.policy_loss

    def spy(logp, old_logp, advantages, loss_mask, **settings):
        loss, stats = original(logp, old_logp, advantages, loss_mask, **settings)
        seen.append((int(loss_mask.sum()), stats))
        return loss, stats

    monkeypatch.setattr(gtpo, "policy_loss", spy)
    wrapped = parallel.wrap(model.tiny_model(tokenizer, seed=0).train(), world, cfg.parallel)
    sums, _ = train.update(
        wrapped,
        torch.optim.AdamW(wrapped.parameters(), lr=3e-2),
        trajs,
        turn_advantages=torch.tensor([1.0, -1.0] * 4)[:, None].expand(8, 4),
        trained=everyone,
        counted=everyone,
        cfg=cfg,
        world=world,
        pad=tokenizer.pad_token_id,
    )
    assert sums["optimizer_steps"] == 4 and len(seen) == 8, "two micro-batches per mini-batch"
    for name, key in (("clip_frac", "clip_frac"), ("approx_kl", "approx_kl"), ("ratio", "ratio_mean")):
        per_step = []
        for step in range(4):
            micro = seen[2 * step : 2 * step + 2]
            tokens = sum(n for n, _ in micro)
            per_step.append(sum(n * float(stats[key]) for n, stats in micro) / tokens)
        assert sums[name] == pytest.approx(sum(per_step) / 4, abs=1e-6)
    assert sums["clip_frac"] > 0


@settings(max_examples=80, deadline=None)
@given(varied=st.lists(st.booleans(), min_size=24, max_size=24), rounds=st.integers(1, 6), filtering=st.booleans())
def test_dynamic_sampling_trains_the_first_groups_whose_scores_differ(varied, rounds, filtering):
    """With --filter_groups the batch is the first prompts_per_step groups of the stream whose
    scores differ (no kept group has all-equal scores while the rounds find enough), in stream
    order, drawn in as few rounds of prompts_per_step problems as that takes, at most
    max_filter_rounds; when they run out, the first alike groups fill the batch. The data
    position moves past every round drawn, and the counts say how many groups were drawn, how
    many differ and in how many rounds. Without the flag: the next prompts_per_step groups."""
    P, G, start = 4, 2, 8
    differs = lambda q: varied[q % len(varied)]  # the group at stream position q has differing scores

    def sample_groups(step, position, run):
        stream = range(position, position + P)
        scores = torch.tensor([[1.0, 0.0] if differs(q) else [1.0, 1.0] for q in stream]).flatten()  # (P * G,)
        return [{"position": q} for q in stream], [f"{q}/{j}" for q in stream for j in range(G)], scores

    cfg = config.TrainConfig(prompts_per_step=P, group_size=G, filter_groups=filtering, max_filter_rounds=rounds)
    world = parallel.World(0, 1, torch.device("cpu"))
    run = types.SimpleNamespace(data_position=start, cfg=cfg, derived=config.check_config(cfg, world), world=world)
    with unittest.mock.patch.object(train, "sample_groups", sample_groups):
        drawn = train.draw_groups(1, run)
    enough = lambda r: sum(map(differs, range(start, start + P * r))) >= P
    used = next((r for r in range(1, rounds + 1) if enough(r)), rounds) if filtering else 1
    seen = range(start, start + P * used)
    hits, misses = [q for q in seen if differs(q)], [q for q in seen if not differs(q)]
    positions = [p["position"] for p in drawn.problems]
    if filtering:
        assert positions == sorted(hits[:P] + misses[: max(P - len(hits), 0)])
        assert all(map(differs, positions)) or len(hits) < P
    else:
        assert positions == list(seen)
    assert drawn.trajs == [f"{q}/{j}" for q in positions for j in range(G)]
    assert drawn.scores.view(P, G).tolist() == [[1.0, 0.0] if differs(q) else [1.0, 1.0] for q in positions]
    assert run.data_position == start + P * used
    assert drawn.counts == {"groups_drawn": P * used, "groups_varied": min(len(hits), P), "filter_rounds": used}


def test_under_two_ranks_dynamic_sampling_hands_each_rank_its_share_of_one_processs_batch(tmp_path):
    """torchrun's two ranks, each generating its half of every round, end dynamic sampling with
    the batch one process would have (positions 1, 3, 4, 7 of tests/dist_draw.py's stream), each
    rank its contiguous half, whichever rank generated a group: trajectories, sandbox results and
    scores travel whole, and both ranks count the same rounds and move the data position alike."""
    done = run_script(torchrun("tests/dist_draw.py", str(tmp_path / "out")))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"out_rank{r}.pt") for r in (0, 1)]
    assert [r["positions"] for r in ranks] == [[1, 3], [4, 7]]
    for r in ranks:
        assert r["tokens"] == [[q, j] for q in r["positions"] for j in range(2)]
        assert r["texts"] == [f"turn {q}/{j}" for q in r["positions"] for j in range(2)]
        assert r["outputs"] == [f"{q}\n" for q in r["positions"] for _ in range(2)]
        assert r["scores"].tolist() == [1.0, 0.0] * 2 and r["data_position"] == 8
        assert r["counts"] == {"groups_drawn": 8, "groups_varied": 4, "filter_rounds": 2}


def test_rollout_seeds_depend_on_the_position_in_the_stream_only():
    """A trajectory's seed is a function of (seed, step, global position): the seeds of a step
    cut into two ranks' shares are the seeds of the whole step, and they are distinct."""
    whole = rollout.rollout_seeds(3, step=5, first=80, count=16)
    assert (
        rollout.rollout_seeds(3, step=5, first=80, count=8) + rollout.rollout_seeds(3, step=5, first=88, count=8)
        == whole
    )
    assert len(set(whole)) == 16 and all(0 <= s < 2**63 for s in whole)
    assert rollout.rollout_seeds(4, step=5, first=80, count=16) != whole


# dist_update.py's settings (parallel, adv_norm, mini_batch_size, compute_dtype, embedder) of the
# default suite, all run in one launch per world size; the slow ones cover the same paths with
# fewer mini-batches, or in fp32.
UPDATES = [
    ("ddp", "group", 0, "fp32", "tokens"),
    ("ddp", "batch", 0, "fp32", "tokens"),
    ("fsdp", "group", 4, "fp32", "policy"),
    ("ddp", "group", 2, "fp32", "tokens"),
    ("fsdp", "group", 2, "fp32", "tokens"),
    ("fsdp", "group", 4, "bf16", "policy"),
]
SLOW_UPDATES = [
    ("fsdp", "group", 0, "fp32", "tokens"),
    ("ddp", "group", 4, "fp32", "tokens"),
    ("ddp", "group", 2, "bf16", "tokens"),
]
NO_SIGNAL = "ddp:group:0:none:fp32:tokens"


def update_setting(parallel, adv_norm, mini_batch_size, compute_dtype, embedder, signal="signal"):
    return f"{parallel}:{adv_norm}:{mini_batch_size}:{signal}:{compute_dtype}:{embedder}"


def reference(setting):
    """The 1-process run a 2-process setting must equal, as (world, setting): the plain, unwrapped
    process, except for FSDP2 in bf16, whose mixed-precision policy computes from gathered bf16
    weights where a plain process computes from fp32 weights under autocast (their updates are
    4% apart, against 0.5% for FSDP2 over one rank and over two): FSDP2 over torchrun's one rank."""
    if setting.startswith("fsdp:") and ":bf16:" in setting:
        return "fsdp_one", setting
    return "one", "ddp" + setting[setting.index(":") :]  # one process has no wrapper to choose


@pytest.fixture(scope="module")
def updates(tmp_path_factory):
    """tests/dist_update.py's result per (world, setting), world "two" (torchrun's 2 ranks) or a
    reference's (see reference): one launch per world gives every setting of its list (UPDATES
    and, on two ranks, the no-signal one; or SLOW_UPDATES)."""
    results = {}

    def launch_list(world, updates):
        settings = [update_setting(*u) for u in updates]
        if world != "two":
            return list(dict.fromkeys(s for w, s in map(reference, settings) if w == world))
        return settings + ([NO_SIGNAL] if updates is UPDATES else [])

    def get(world, setting):
        if (world, setting) not in results:
            batch = next(b for b in (launch_list(world, UPDATES), launch_list(world, SLOW_UPDATES)) if setting in b)
            out = tmp_path_factory.mktemp("update") / "out.pt"
            script = ["tests/dist_update.py", str(out), *batch]
            command = {"two": torchrun(*script), "fsdp_one": torchrun(*script, ranks=1)}.get(world)
            done = run_script(command or [sys.executable, *script])
            assert done.returncode == 0, done.stderr[-3000:]
            results.update({(world, s): r for s, r in zip(batch, torch.load(out))})
        return results[world, setting]

    return get


@pytest.mark.parametrize(
    "parallel, adv_norm, mini_batch_size, compute_dtype, embedder",
    UPDATES + [pytest.param(*u, marks=pytest.mark.slow) for u in SLOW_UPDATES],
)
def test_two_process_update_equals_one_process_update(
    updates, parallel, adv_norm, mini_batch_size, compute_dtype, embedder
):
    """Fed the same trajectories (each rank its share of the groups, the second rank fewer trained
    rows in fewer micro-batches, and its own initial weights until wrap gives it rank 0's), the
    2-process update (DDP, or FSDP2 fully_shard) gives the 1-process parameters (fp32: to 1e-5;
    bf16 compute: to 2e-3, FSDP2 against FSDP2 over one rank, see reference), and DDP's ranks end
    identical: gradient sync, gradient clipping, the global token count of each mini-batch
    (one; three of 4 trajectories; or six of 2, where the second rank has nothing to train in
    three and joins with a stand-in row; two epochs over them) and batch-wide normalisation are
    exact. Step 3 gives credit with the policy's own embedder under FSDP2 too. Under FSDP2 each
    micro-batch's gradients are reduce-scattered at once: before every forward but a
    mini-batch's first, every gradient is there at its shard's size."""
    setting = update_setting(parallel, adv_norm, mini_batch_size, compute_dtype, embedder)
    one, two = updates(*reference(setting)), updates("two", setting)
    assert one["optimizer_steps"] == two["optimizer_steps"] == 2 * (12 // (mini_batch_size or 12))
    assert two["world_size"] == 2 and two["in_sync"] is (True if parallel == "ddp" else None)
    assert one["shaped"] > 0 and two["shaped"] > 0  # failed trajectories got similarity credit
    initial = model.tiny_model(model.tiny_tokenizer(), seed=0).state_dict()
    atol = 1e-5 if compute_dtype == "fp32" else 2e-3
    for name, value in one["weights"].items():
        moved = (value - initial[name.removeprefix("policy.")]).abs().max()
        assert moved > 1e-5, f"{name} was not trained"
        torch.testing.assert_close(two["weights"][name], value, atol=atol, rtol=0)
    if parallel == "fsdp":
        records = two["gradients"]  # per forward with gradients: [(gradient's local size, parameter's)]
        present = [r for r in records if all(g is not None for g, _ in r)]
        assert len(present) == len(records) - two["optimizer_steps"]
        assert all(g == p for r in present for g, p in r)
        if mini_batch_size != 2:  # mini-batches of one row per rank have one micro-batch
            whole = sum(p.numel() for p in model.tiny_model(model.tiny_tokenizer(), seed=0).parameters())
            assert present and sum(math.prod(p) for _, p in present[0]) < whole  # shards, not whole tensors


def test_a_step_without_signal_on_any_rank_does_no_work_and_is_logged_skipped(updates):
    """When no rank has a trained token (every group's advantages zero), torchrun's two ranks alike
    skip the forward, backward and optimizer step: no optimizer step, the parameters untouched,
    `no_signal` logged, and neither rank waits on the other."""
    two = updates("two", NO_SIGNAL)
    assert two["world_size"] == 2 and two["no_signal"] == 1 and two["optimizer_steps"] == 0
    initial = model.tiny_model(model.tiny_tokenizer(), seed=0).state_dict()
    for name, value in two["weights"].items():
        assert torch.equal(value, initial[name.removeprefix("policy.")]), f"{name} moved"


def test_without_signal_the_update_runs_no_forward_and_the_log_line_says_skipped():
    """A batch whose groups all lack signal: update() calls no forward and no optimizer step, and
    the step's log line says `upd skipped (no signal)` where the update time would be."""
    tokenizer = model.tiny_tokenizer()
    with sandbox.Session() as session:
        trajs, _ = single_turn_group(tokenizer, session)
    world = parallel.World(0, 1, torch.device("cpu"))
    cfg = config.TrainConfig(shaping="none", prompts_per_step=2, group_size=4)
    scored = rewards.score(
        trajs,
        [{"answer": "999"}] * 8,
        torch.arange(2).repeat_interleave(4),
        cfg=cfg,
        derived=config.check_config(cfg, world),
        world=world,
        grader=grading.Grader(),
    )
    assert not scored.trained.any()
    policy = model.tiny_model(tokenizer, seed=0).train()
    forwards = []
    policy.register_forward_pre_hook(lambda *_: forwards.append(1))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    sums, _ = train.update(
        parallel.wrap(policy, world, cfg.parallel),
        optimizer,
        trajs,
        turn_advantages=scored.turn_advantages,
        trained=scored.trained,
        counted=scored.counted,
        cfg=cfg,
        world=world,
        pad=tokenizer.pad_token_id,
    )
    assert forwards == [] and optimizer.state == {} and sums["optimizer_steps"] == 0 and sums["no_signal"] == 1
    step_sums = metrics.step_sums(
        trajs,
        scored,
        groups=2,
        drawn=dict.fromkeys(metrics.DRAWN, 1),
        update_sums=sums,
        times=dict.fromkeys(("t_rollout", "t_reward", "t_old_logp", "t_update"), 0.0),
    )
    assert "upd skipped (no signal)" in metrics.log_line(metrics.reduce(1, step_sums, lr=1e-2, world=world))


def torchrun_train(model_dir, out_dir, parallel, max_steps, *flags):
    """tests/dist_train.py (train.py, counting each rank's weight reads) under a 2-process torchrun."""
    args = [
        "tests/dist_train.py",
        "--model",
        model_dir,
        "--sft_steps",
        "0",
        "--max_steps",
        str(max_steps),
        "--save_every",
        "1",
        "--out_dir",
        str(out_dir),
        "--parallel",
        parallel,
        *[f"--{k}={v}" for k, v in SMALL.items()],
        *flags,
    ]
    done = run_script(torchrun(*args), timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize(
    "parallel, compute_dtype", [("ddp", "fp32"), ("fsdp", "bf16"), pytest.param("fsdp", "fp32", marks=pytest.mark.slow)]
)
def test_torchrun_training_ends_with_identical_parameters_on_both_ranks(sft_model, tmp_path, parallel, compute_dtype):
    """`torchrun --nproc_per_node 2 train.py` (gloo; DDP, or FSDP2 with parameters gathered for
    generation; fp32 or bf16 compute) trains, saves (the optimizer sharded by
    torch.distributed.checkpoint), stops and resumes; only rank 0 reads the weights (at the
    start and at the resume), the other gets them by broadcast; under DDP every rank ends with
    the same parameters (train.py compares them and records it in summary.json, with the number
    of ranks; FSDP2's ranks hold different shards by design, and its exactness is the update
    test's)."""
    torchrun_train(sft_model, tmp_path, parallel, 1, f"--compute_dtype={compute_dtype}")
    assert os.listdir(tmp_path / "checkpoints" / "step_1" / "optimizer")
    done = torchrun_train(sft_model, tmp_path, parallel, 2, f"--compute_dtype={compute_dtype}")
    assert f"resumed from {tmp_path}/checkpoints/step_1" in done.stdout
    reads = [json.load(open(tmp_path / f"reads_rank{r}.json")) for r in (0, 1)]
    assert reads[0]["from_pretrained"] == 1 and reads[0]["safetensors"] >= 1
    assert reads[1] == {"from_pretrained": 0, "safetensors": 0}
    with open(tmp_path / "summary.json") as f:
        summary = json.load(f)
    assert summary["ranks_in_sync"] is (True if parallel == "ddp" else None) and summary["environment"]["ranks"] == 2
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
    before, after = weights(sft_model), weights(tmp_path / "checkpoints" / "step_2")
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "compute_dtype, steps, controls",
    [("fp32", 2, False), ("bf16", 2, False), ("fp32", 2, True), pytest.param("fp32", 4, False, marks=pytest.mark.slow)],
)
def test_resuming_gives_bit_identical_parameters(
    sft_model, two_steps, controlled, tmp_path, compute_dtype, steps, controls
):
    """N steps straight and N/2 steps, stop, resume, N/2 steps give bit-identical parameters
    (model, optimizer, scheduler, RNG, data position and the KL reference are all restored), in
    fp32 and in bf16 compute alike, and with the practitioner's controls (dynamic sampling's
    rounds move the data position further)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run = dict(CONTROLS if controls else TWO_STEPS, max_steps=steps, save_every=steps // 2, compute_dtype=compute_dtype)
    if (compute_dtype, steps) == ("fp32", 2):
        straight = controlled if controls else two_steps  # the same run, made once
    else:
        train.main(train_config(sft_model, straight, **run))
    train.main(train_config(sft_model, resumed, **{**run, "max_steps": steps // 2}))
    train.main(train_config(sft_model, resumed, **run))
    a, b = (weights(straight / "checkpoints" / f"step_{steps}"), weights(resumed / "checkpoints" / f"step_{steps}"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], weights(sft_model)[k]) for k in a)
    lines = lambda d: [json.loads(x) for x in open(d / "metrics.jsonl")]
    drop_time = lambda r: {k: v for k, v in r.items() if not k.startswith("t_")}
    assert [drop_time(r) for r in lines(straight)] == [drop_time(r) for r in lines(resumed)]


def test_with_the_controls_two_ranks_train_the_batches_one_process_trains(sft_model, controlled, tmp_path):
    """With --filter_groups, --mask_truncated and --mask_void_turns together, torchrun's two ranks
    (DDP) train the batches one process trains: every step's statistics of its trajectories
    (reward, accuracy, turns, length, truncated, void and masked shares, groups drawn and with
    differing scores, rounds) are equal, and the weights after two steps agree to 1e-5; in these
    steps the filter drew more than one round and the masks left trajectories out."""
    flags = [f"--{k}={v}" for k, v in CONTROLS.items() if k not in ("max_steps", "save_every")]
    torchrun_train(sft_model, tmp_path, "ddp", 2, "--compute_dtype=fp32", *flags)
    lines = lambda d: [json.loads(x) for x in open(d / "metrics.jsonl")]
    keys = ("reward", "accuracy", "turns", "length", "truncated", "void", "masked", *metrics.DRAWN)
    one, two = lines(controlled), lines(tmp_path)
    assert [{k: pytest.approx(r[k], abs=1e-6) for k in keys} for r in one] == [{k: r[k] for k in keys} for r in two]
    assert max(r["filter_rounds"] for r in one) > 1 and max(r["masked"] for r in one) > 0
    a, b = weights(controlled / "checkpoints" / "step_2"), weights(tmp_path / "checkpoints" / "step_2")
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_resuming_under_fsdp_gives_bit_identical_parameters(sft_model, tmp_path):
    """Under torchrun with FSDP2, 2 steps straight and 1 step, stop, resume, 1 step give
    bit-identical parameters: each rank's optimizer shard comes back from
    torch.distributed.checkpoint exactly."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    torchrun_train(sft_model, straight, "fsdp", max_steps=2)
    torchrun_train(sft_model, resumed, "fsdp", max_steps=1)
    torchrun_train(sft_model, resumed, "fsdp", max_steps=2)
    a, b = weights(straight / "checkpoints" / "step_2"), weights(resumed / "checkpoints" / "step_2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_on_another_number_of_ranks_is_refused(tmp_path):
    """A run saved by 2 ranks does not resume in 1 process: one error naming both counts and how
    to resume, before any work."""
    cfg = config.TrainConfig(out_dir=str(tmp_path), **SMALL)
    os.makedirs(tmp_path / "checkpoints" / "step_3")
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"config": dataclasses.asdict(cfg)}, f)
    with open(tmp_path / "checkpoints" / "step_3" / "trainer.json", "w") as f:
        json.dump({"step": 3, "ranks": 2}, f)
    with pytest.raises(
        config.ConfigError,
        match=r"written by 2 rank\(s\), this run has 1: resume with 2 \(torchrun "
        r"--nproc_per_node 2\)",
    ):
        checkpoint.check_resume(cfg, parallel.World(0, 1, torch.device("cpu")))


def test_a_killed_run_resumes_from_its_last_checkpoint(sft_model, tmp_path):
    """SIGKILL during training, then the same command: it resumes from the newest checkpoint,
    redoes only the lost steps and finishes with one metrics record per step."""
    args = [
        sys.executable,
        "train.py",
        "--model",
        sft_model,
        "--sft_steps",
        "0",
        "--max_steps",
        "2",
        "--save_every",
        "1",
        "--out_dir",
        str(tmp_path),
        *[f"--{k}={v}" for k, v in SMALL.items()],
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not os.path.isdir(tmp_path / "checkpoints" / "step_1") and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before its first RL checkpoint"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = checkpoint.steps(str(tmp_path))
    assert saved[-1] >= 1 and not os.path.exists(tmp_path / "summary.json")
    done = run_script(args, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {tmp_path}/checkpoints/step_{saved[-1]}" in done.stdout
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2]
    assert json.load(open(tmp_path / "summary.json"))["rl_steps"] == 2


def test_held_out_accuracy_is_the_mean_over_eval_samples_trajectories_per_problem(sft_model, monkeypatch):
    """Sampled held-out accuracy rolls out exactly eval_samples trajectories per problem, each
    problem's copies together, and returns the share of them graded correct; greedy rolls out
    one per problem whatever eval_samples is."""
    problems = tasks.toy_held_out(100)[:6]
    policy, tokenizer = model.load_policy(sft_model)
    world = parallel.World(0, 1, torch.device("cpu"))
    cfg = config.TrainConfig(model=sft_model, eval_samples=3, **SMALL)
    graded, real_grade = [], grading.grade

    def grade(trajs, golds, grader):  # records what train.evaluate grades
        graded.append((golds, real_grade(trajs, golds, grader)))
        return graded[-1][1]

    monkeypatch.setattr(grading, "grade", grade)
    with sandbox.Pool(4) as pool:
        grader = grading.Grader()
        derived = config.check_config(cfg, world)
        run = train.RunState(
            cfg=cfg,
            derived=derived,
            world=world,
            policy=policy,
            tokenizer=tokenizer,
            wrapped=policy,
            pool=pool,
            grader=grader,
            problems=[],
        )
        evaluate = lambda t: train.evaluate(run, problems, temperature=t)
        sampled = evaluate(1.0)
        sampled_golds = [g for golds, _ in graded for g in golds]
        sampled_correct = torch.cat([c for _, c in graded])
        graded.clear()
        greedy = evaluate(0.0)
        grader.close()
    assert sampled_golds == [p["answer"] for p in problems for _ in range(3)]
    assert sampled == pytest.approx(float(sampled_correct.float().mean()))
    assert [g for golds, _ in graded for g in golds] == [p["answer"] for p in problems]
    assert greedy == pytest.approx(float(torch.cat([c for _, c in graded]).float().mean()))


@pytest.mark.parametrize("stop_at, checks, steps_done", [(0.5, [5, 10], 10), (0.0, [5, 10, 15, 20], 20)])
def test_sft_ends_at_the_first_check_that_reaches_sft_stop_at(tmp_path, monkeypatch, stop_at, checks, steps_done):
    """Every sft_check_every SFT steps the greedy accuracy on the validation problems is
    checked and logged; SFT ends at the first check that reaches sft_stop_at (never when it is
    0), and summary.json records the steps done."""
    scripted = iter([0.1, 0.6, 0.2, 0.9])  # the accuracies the checks see, in turn
    seen = []

    def evaluate(run, problems, *, temperature):
        if not problems:  # eval_size 0: no held-out problems
            return None
        seen.append(([p["id"] for p in problems], temperature))
        return next(scripted)

    monkeypatch.setattr(train, "evaluate", evaluate)
    cfg = config.TrainConfig(
        out_dir=str(tmp_path), sft_steps=20, sft_check_every=5, sft_stop_at=stop_at, val_size=6, max_steps=0, **SMALL
    )
    train.main(cfg)
    records = [json.loads(line) for line in open(tmp_path / "sft_checks.jsonl")]
    assert [r["step"] for r in records] == checks
    assert [r["stop"] for r in records] == [False] * (len(checks) - 1) + [stop_at > 0]
    assert [r["val_greedy"] for r in records] == [0.1, 0.6, 0.2, 0.9][: len(checks)]
    validation = [p["id"] for p in tasks.toy_held_out(6, cfg.toy_size, seed=2)]
    assert seen == [(validation, 0.0)] * len(checks), "greedy, on the validation problems"
    assert json.load(open(tmp_path / "summary.json"))["sft_steps_done"] == steps_done


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data", "BAD"], r"BAD:2: not valid JSON"),
        (["--model", "/no/such/model"], r"no model at '/no/such/model'"),
        (["--algo", "ppo"], r"--algo 'ppo': must be one of gtpo, grpo"),
        (["--group_size", "many"], r"argument --group_size: invalid int value: 'many'"),
        (["--no_such_flag", "1"], r"unrecognized arguments: --no_such_flag 1"),
        (["--sft_decay_start", "1.5"], r"--sft_decay_start 1.5: must be in \[0, 1\]"),
        (["--eval_samples", "0"], r"--eval_samples 0: must be >= 1"),
        (["--sft_stop_at", "1.5"], r"--sft_stop_at 1.5: must be in \[0, 1\]"),
        (
            ["--sft_steps", "5", "--sft_stop_at", "0.5", "--sft_check_every", "0"],
            r"--sft_stop_at 0.5: needs --sft_check_every",
        ),
        (
            ["--mini_batch_size", "48"],
            r"--mini_batch_size 48: must be 0 \(the whole batch\) or divide the batch of 128",
        ),
        (["--rollout_batch_size", "-1"], r"--rollout_batch_size -1: must be >= 0"),
        (["--loss_denominator", "all"], r"--loss_denominator 'all': must be one of sampled, signal"),
    ],
)
def test_bad_input_is_one_error_line_without_a_traceback(tmp_path, capsys, flags, message):
    """Bad JSONL, a missing model path and invalid flags exit non-zero with exactly one error
    line naming the input, and no traceback (train.py's command in this process; the real
    command is test_flags.py's test_a_bad_flag_stops_the_command_before_any_work)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": oops}\n')
    flags = [str(bad) if f == "BAD" else f for f in flags]
    with pytest.raises(SystemExit) as done:
        argv = ["--out_dir", str(tmp_path / "run"), "--sft_steps", "0", *flags]
        parallel.run_command(train.main, train.parse_args(argv), prog="train.py", input_errors=train.INPUT_ERRORS)
    stderr = capsys.readouterr().err
    assert done.value.code != 0
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and re.search(message.replace("BAD", str(bad)), errors[0]), stderr


def test_problem_stream_is_a_permutation_per_epoch_and_resumable():
    """problems_at visits every problem once per epoch, and any window equals the same window of
    one long read (so resuming needs only the position)."""
    problems = [{"problem": str(k)} for k in range(7)]
    long = [p["problem"] for p in train.problems_at(problems, 0, 21, seed=3)]
    for epoch in range(3):
        assert sorted(long[7 * epoch : 7 * epoch + 7], key=int) == [str(k) for k in range(7)]
    assert [p["problem"] for p in train.problems_at(problems, 5, 9, seed=3)] == long[5:14]
    assert long != [p["problem"] for p in train.problems_at(problems, 0, 21, seed=4)]


def test_toy_teacher_trajectories_are_correct_and_use_one_to_three_tool_turns():
    """Every toy teacher trajectory, run through the sandbox, ends with the right answer; it
    makes 1-3 tool calls (two-step families at least 2 dependent ones), a mistaken call is
    followed by a fixed one, the two-step families are at least 30% of problems, and the
    problems are reproducible with distinct ids."""
    tokenizer = model.tiny_tokenizer()
    problems = tasks.toy_problems(60, seed=11, mistake_rate=0.5)
    two_step = [p for p in problems if p["family"] in tasks.TWO_STEP_FAMILIES]
    assert len(two_step) >= 0.3 * len(problems)
    with sandbox.Session() as session:
        for p in problems:
            session.reset()
            prompt = model.chat_prompt_ids(tokenizer, p["problem"], system=None)
            traj = rollout.teacher_trajectory(tokenizer, prompt, p["teacher"], session)
            assert grading.is_equivalent(grading.extract_answer(traj.final_text), p["answer"]), p
            calls = [t for t in traj.turns if t.code is not None]
            good = [t for t in calls if t.result.ok]
            assert 1 <= len(good) <= 3 and len(calls) - len(good) <= 1
            assert len(good) == (2 if p["family"] in tasks.TWO_STEP_FAMILIES else 1)
            for k, t in enumerate(calls[:-1]):
                if not t.result.ok:
                    assert calls[k + 1].result.ok and "Error" in t.observation
            if len(good) == 2:  # the second call uses the first call's printed output
                assert good[0].result.stdout.strip() in good[1].code
    assert tasks.toy_problems(5, seed=1) == tasks.toy_problems(5, seed=1)
    assert len({p["id"] for p in problems}) == len(problems)


def test_sft_trains_exactly_the_assistant_turns():
    """The SFT trajectories' trained tokens decode to the assistant's turns (ending with the
    end-of-message token) and the untrained ones after the prompt to the real tool outputs."""
    tokenizer = model.tiny_tokenizer()
    rows = [dict(p, turns=p["teacher"]) for p in tasks.toy_problems(10, seed=2, mistake_rate=0.5)]
    for row, traj in zip(rows, sft.teacher_trajectories(rows, tokenizer, system_prompt=None, timeout=10.0)):
        trained = [t for t, m in zip(traj.input_ids, traj.loss_mask) if m]
        assert tokenizer.decode(trained) == "".join(row["turns"]) + "<|im_end|>"
        observed = [t for k, (t, m) in enumerate(zip(traj.input_ids, traj.loss_mask)) if not m and k >= traj.prompt_len]
        assert tokenizer.decode(observed) == "".join(t.observation for t in traj.turns[:-1])
        assert "```output" in tokenizer.decode(observed)


def test_an_error_on_one_rank_ends_the_torchrun_job_at_once(sft_model, tmp_path):
    """Under torchrun, an exception on rank 1 in the middle of RL (injected at step 2 by
    tests/dist_fail.py) ends the job with a non-zero status and the error in the log, instead of
    rank 0 waiting in a collective for the other rank (gloo's timeout is 30 minutes)."""
    done = run_script(torchrun("tests/dist_fail.py", sft_model, str(tmp_path)), timeout=240)
    assert done.returncode != 0
    assert "injected failure on rank 1 at RL step 2" in done.stderr, done.stderr[-3000:]
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1]
