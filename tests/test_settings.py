"""What a run on a real model and real data gets: defaults that follow the model, refusal to
resume a run under other settings, a warning when trajectories hit a token limit, a reward
function of one's own, the first-turn tool-call rule as a setting, and evaluation settings that
just work."""

import json
import os
import re

import pytest
import torch

import config
import data
import eval as evaluation
import grading
import model
import parallel
import rewards
import rollout
import sandbox
import train

from conftest import SMALL, run_script


def test_defaults_follow_the_model_and_given_flags_win():
    """The demo keeps its tuning; any other model gets a real model's settings (no toy SFT, lr
    1e-6, long turns, no SFT early stop, its own out_dir); a flag given explicitly always wins,
    and --help shows both defaults."""
    demo = config.TrainConfig()
    assert (demo.lr, demo.sft_steps, demo.sft_data, demo.max_turn_tokens, demo.out_dir) == (
        3e-4,
        5000,
        "toy",
        64,
        "runs/demo",
    )
    real = config.TrainConfig(model="/ckpt/Qwen2.5-7B-Instruct/", data="sets/gsm8k.jsonl")
    assert (real.lr, real.sft_steps, real.sft_data, real.sft_stop_at, real.sft_check_every) == (1e-6, 0, "none", 0, 0)
    assert real.max_turn_tokens >= 1024 and real.max_total_tokens >= 4096
    assert real.out_dir == os.path.join("runs", "Qwen2.5-7B-Instruct-gsm8k")
    assert config.TrainConfig(model="org/m", sft_data="sft.jsonl").sft_steps is None  # one pass, once loaded
    assert config.TrainConfig(model="org/m", lr=5e-6, out_dir="x").lr == 5e-6
    assert train.parse_args(["--model", "org/m", "--lr", "2e-6"]).lr == 2e-6
    text = " ".join(run_script(["python", "train.py", "--help"]).stdout.split())
    assert "demo: 0.0003; other models: 1e-06" in text and "demo: toy; other models: none" in text


def test_a_real_models_sft_is_one_pass_over_the_given_rows(tmp_path, monkeypatch):
    """With --sft_data and no --sft_steps, a non-demo model runs ceil(rows / sft_batch_size) SFT
    steps; --sft_steps without --sft_data is refused before any work."""
    rows = [{"problem": f"What is {k} + 1?", "answer": str(k + 1), "turns": [f"\\boxed{{{k + 1}}}"]} for k in range(5)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    demo_dir = tmp_path / "tiny"
    tokenizer = model.tiny_tokenizer()
    model.save_policy(model.tiny_model(tokenizer, hidden_size=64, num_hidden_layers=2), tokenizer, str(demo_dir))
    steps = []
    monkeypatch.setattr(train.sft, "run", lambda *a, cfg, **k: steps.append(cfg.sft_steps) or cfg.sft_steps)
    cfg = config.TrainConfig(
        model=str(demo_dir),
        sft_data=str(tmp_path / "sft.jsonl"),
        sft_batch_size=2,
        max_steps=0,
        out_dir=str(tmp_path / "run"),
        **{**SMALL, "lr": None},
    )
    train.main(cfg)
    assert steps == [3]
    with pytest.raises(config.ConfigError, match="--sft_steps 4: SFT needs --sft_data"):
        train.main(config.TrainConfig(model=str(demo_dir), sft_steps=4, out_dir=str(tmp_path / "other")))


def test_resuming_under_other_settings_is_refused_listing_every_difference(sft_model, tmp_path):
    """A second run into the same out_dir with other settings that change the run is refused,
    every differing flag named; more steps (or another save cadence) resume."""
    train.main(config.TrainConfig(model=sft_model, sft_steps=0, out_dir=str(tmp_path), max_steps=1, **SMALL))
    with pytest.raises(config.ConfigError, match=r"--gamma 0\.9 there, 0\.5 here; --lr 0\.0003 there, 0\.001 here"):
        train.main(
            config.TrainConfig(
                model=sft_model, sft_steps=0, out_dir=str(tmp_path), max_steps=1, **{**SMALL, "lr": 1e-3, "gamma": 0.5}
            )
        )
    train.main(
        config.TrainConfig(model=sft_model, sft_steps=0, out_dir=str(tmp_path), max_steps=2, save_every=1, **SMALL)
    )
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]


def test_a_step_whose_trajectories_mostly_hit_a_token_limit_warns_once(sft_model, tmp_path, capsys):
    """When more than half of a step's trajectories stop at a token limit, the log says so once
    (not every step), and every step records the truncated share."""
    train.main(
        config.TrainConfig(
            model=sft_model, sft_steps=0, out_dir=str(tmp_path), max_steps=2, **{**SMALL, "max_turn_tokens": 3}
        )
    )
    out = capsys.readouterr().out
    assert out.count("stopped at a token limit") == 1 and "--max_turn_tokens 3" in out
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line)["truncated"] for line in f] == [1.0, 1.0]


def answered(tokenizer, guesses, gold="5", call=False):
    """One group of trajectories answering `guesses` in one turn, with or without a tool call."""
    prompt = model.chat_prompt_ids(tokenizer, "What is 2 + 3?", system=None)
    with sandbox.Session() as session:
        code = "```python\nprint(2 + 3)\n```\n" if call else ""
        return [rollout.teacher_trajectory(tokenizer, prompt, [f"{code}\\boxed{{{g}}}"], session) for g in guesses]


def scored(trajs, rows, reward_fn=None, **overrides):
    world = parallel.World(0, 1, torch.device("cpu"))
    cfg = config.TrainConfig(prompts_per_step=1, group_size=len(trajs), **{"shaping": "none", **overrides})
    return rewards.score(
        trajs,
        rows,
        torch.zeros(len(trajs), dtype=torch.long),
        cfg=cfg,
        derived=config.check_config(cfg, world),
        world=world,
        grader=grading.Grader(),
        reward_fn=reward_fn,
    )


@pytest.mark.parametrize("algo", ["gtpo", "grpo"])
def test_without_the_first_turn_rule_a_single_turn_run_trains_on_correctness(algo):
    """Answers without a tool call: under the paper's rule GRPO's rewards are all 0 (nothing to
    learn) and GTPO's carry the penalty; with --first_turn_tool_call false both reward exactly
    correctness and the group has signal."""
    trajs = answered(model.tiny_tokenizer(), ["5", "6", "5", "4"])
    rows = [{"problem": "What is 2 + 3?", "answer": "5"}] * 4
    ruled = scored(trajs, rows, algo=algo)
    free = scored(trajs, rows, algo=algo, first_turn_tool_call=False)
    assert ruled.format_errors.all() and not free.format_errors.any()
    if algo == "grpo":
        assert not ruled.trained.any()
    assert free.total_reward.tolist() == [1.0, 0.0, 1.0, 0.0] and free.trained.all()
    assert (free.turn_advantages[:, 0] > 0).tolist() == [True, False, True, False]


@pytest.mark.parametrize("algo", ["gtpo", "grpo"])
def test_a_reward_fn_replaces_the_grader_with_the_row_at_hand(tmp_path, algo):
    """--reward_fn file.py:fn gets each trajectory's record (with its extracted answer) and its
    problem row, extra columns included; its score in [0, 1] is the outcome reward (1 counts as
    correct; GRPO's trajectory reward too), format penalties still apply; a value outside [0, 1]
    is an error naming the function and the problem."""
    (tmp_path / "mine.py").write_text(
        "def partial(record, row):\n"
        "    return 1.0 if record['answer'] == row['target'] else 0.25 * bool(record['turns'][0]['code'])\n"
        "def broken(record, row):\n"
        "    return 2\n"
    )
    fn = rewards.load_reward_fn(f"{tmp_path}/mine.py:partial")
    trajs = answered(model.tiny_tokenizer(), ["7", "6", "7", "1"], call=True)
    rows = [{"problem": "What is 2 + 3?", "answer": "5", "target": "7", "id": "p0"}] * 4
    out = scored(trajs, rows, reward_fn=fn, algo=algo)
    assert out.outcomes.tolist() == [1.0, 0.25, 1.0, 0.25] and out.correct.tolist() == [True, False, True, False]
    assert out.total_reward.tolist() == [1.0, 0.25, 1.0, 0.25]  # the calls are valid: no penalty
    assert (out.turn_advantages[:, 0] > 0).tolist() == [True, False, True, False]
    with pytest.raises(rewards.RewardFnError, match=r"broken returned 2 for problem 'p0'"):
        scored(trajs, rows, reward_fn=rewards.load_reward_fn(f"{tmp_path}/mine.py:broken"))


@pytest.mark.parametrize(
    "spec,message",
    [
        ("nofunction", "expected 'file.py:function'"),
        ("missing.py:f", "no such file"),
        ("json:nothing_here", "has no function 'nothing_here'"),
        ("no_such_module_xyz:f", "importing no_such_module_xyz failed"),
    ],
)
def test_a_reward_fn_that_cannot_be_loaded_is_one_clear_error(spec, message):
    """A malformed spec, a missing file, a missing function or a failing import is a RewardFnError
    naming the spec; a dotted import of a real function loads it."""
    with pytest.raises(rewards.RewardFnError, match=message):
        rewards.load_reward_fn(spec)
    assert rewards.load_reward_fn("json:dumps") is json.dumps


def test_evaluation_samples_when_asked_for_several_samples(tmp_path):
    """--samples k > 1 without --temperature samples at training's temperature (else 1.0) and the
    report's settings say which; one sample stays greedy."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_3").mkdir(parents=True)
    saved = {"config": {**vars(config.TrainConfig()), "temperature": 0.7}, "derived": {"system_prompt": None}}
    (run / "config.json").write_text(json.dumps(saved))
    cases = [
        (str(run / "checkpoints" / "step_3"), 4, 0.7, "training's config.json"),
        ("demo", 4, 1.0, "1.0: no training config"),
        ("demo", 1, 0.0, "greedy: one sample"),
    ]
    for model_dir, samples, temperature, source in cases:
        cfg = config.EvalConfig(model=model_dir, data=["toy"], samples=samples)
        settings = evaluation.resolve(cfg)
        assert (settings["temperature"], settings["temperature_from"]) == (temperature, source)


def test_evaluation_grades_with_the_reward_fn(tmp_path):
    """eval.py --reward_fn scores every sample with the given function instead of the grader."""
    (tmp_path / "always.py").write_text("def right(record, row):\n    return True\n")
    cfg = config.EvalConfig(
        model="demo",
        data=["toy"],
        limit=2,
        max_turns=1,
        max_turn_tokens=8,
        sandbox_workers=2,
        reward_fn=f"{tmp_path}/always.py:right",
        out=str(tmp_path / "r.json"),
    )
    report = evaluation.main(cfg)
    assert report["accuracy"] == 1.0 and report["settings"]["reward_fn"].endswith("always.py:right")


def test_every_data_flag_goes_through_the_same_loader_and_keys(tmp_path, capsys):
    """--data, --eval_data and --sft_data take the same formats and --problem_key/--answer_key
    (here DAPO-style rows: a chat prompt and reward_model.ground_truth, as .jsonl and .json), and
    each prints its one-line load summary."""
    rows = [
        {
            "prompt": [{"role": "user", "content": f"What is {k} + 1?"}],
            "reward_model": {"ground_truth": str(k + 1)},
            "data_source": "mine",
            "turns": [f"\\boxed{{{k + 1}}}"],
        }
        for k in range(4)
    ]
    (tmp_path / "dapo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "dapo.json").write_text(json.dumps(rows))
    cfg = config.TrainConfig(
        model="org/m",
        data=str(tmp_path / "dapo.jsonl"),
        eval_data=str(tmp_path / "dapo.json"),
        sft_data=str(tmp_path / "dapo.jsonl"),
        answer_key="reward_model.ground_truth",
        out_dir="x",
    )
    sets = data.load_run(cfg)
    for loaded in (sets.train, sets.held_out, sets.sft_rows):
        assert [(p["problem"], p["answer"], p["data_source"]) for p in loaded] == [
            (f"What is {k} + 1?", str(k + 1), "mine") for k in range(4)
        ]
    assert capsys.readouterr().out.count("4 rows, 4 answers") == 3


def test_the_readmes_reward_example_runs_as_documented(tmp_path):
    """The README's --reward_fn example, loaded from the README as a file: full credit for the
    right number with its unit, half without the unit, none when wrong or unanswered."""
    from conftest import ROOT

    text = open(os.path.join(ROOT, "docs", "usage.md"), encoding="utf-8").read()
    code = text.split("```python\n# my_reward.py", 1)[1].split("```", 1)[0]
    (tmp_path / "my_reward.py").write_text("# my_reward.py" + code)
    fn = rewards.load_reward_fn(f"{tmp_path}/my_reward.py:units_checked")
    row = {"problem": "How far?", "answer": "12", "unit": "km"}
    cases = [
        ("12 km", "\\boxed{12 km}", 1.0),
        ("12", "\\boxed{12}", 0.5),
        ("13", "\\boxed{13 km}", 0.0),
        (None, "", 0.0),
        ("", "\\boxed{}", 0.0),
    ]
    for answer, final_text, expected in cases:
        assert fn({"answer": answer, "final_text": final_text, "turns": []}, row) == expected


def test_an_evaluation_run_prints_no_warnings(sft_model, tmp_path):
    """eval.py on a checkpoint that makes tool calls (so later turns continue from the KV cache),
    sampling because --samples 2 asks for it, writes no Python warning and no transformers
    deprecation or invalid-generation-flag message on stderr."""
    out = run_script(
        [
            "python",
            "-W",
            "error::FutureWarning",
            "-W",
            "error::DeprecationWarning:transformers",
            "eval.py",
            "--model",
            sft_model,
            "--data",
            "toy",
            "--limit",
            "4",
            "--samples",
            "2",
            "--sandbox_workers",
            "2",
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "r.json") as f:
        report = json.load(f)
    assert report["mean_turns"] > 1 and report["settings"]["temperature"] == 1.0
    noise = [line for line in out.stderr.splitlines() if re.search(r"warn|deprecat|not valid", line, re.IGNORECASE)]
    assert not noise, noise


def test_trainings_held_out_evaluation_grades_with_the_reward_fn(tmp_path):
    """train.py's held-out accuracy (summary.json) grades with --reward_fn, as eval.py does."""
    tokenizer = model.tiny_tokenizer()
    policy = model.tiny_model(tokenizer)
    cfg = config.TrainConfig(**{**SMALL, "max_turns": 1, "max_turn_tokens": 8})
    world = parallel.World(0, 1, torch.device("cpu"))
    problems = [{"problem": "What is 2 + 3?", "answer": "5"}] * 2
    with sandbox.Pool(2) as pool:
        grader = grading.Grader()
        run = train.RunState(
            cfg=cfg,
            derived=config.check_config(cfg, world),
            world=world,
            policy=policy,
            tokenizer=tokenizer,
            wrapped=policy,
            pool=pool,
            grader=grader,
            problems=[],
            reward_fn=lambda record, row: True,
        )
        accuracy = train.evaluate(run, problems, temperature=0.0)
        grader.close()
    assert accuracy == 1.0
