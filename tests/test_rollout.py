"""Properties of model.py and rollout.py on the tiny Qwen2 model built in code.

Two policies: the random tiny model sampled at temperature 1 (arbitrary text, every stop reason
by length), and a tiny model that memorised three scripted multi-turn trajectories (an answer
without code, a code error then an answer, and a run into max_turns), rolled out greedily.
"""

import ast
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import model
import rollout
import sandbox
import sft

SCRIPTS = {
    "Say hello.": ["Hello! \\boxed{1}"],
    "Say nothing.": ["I will not say."],
    "Divide one by zero.": ["```python\nprint(1/0)\n```", "It failed, so \\boxed{0}"],
    "Count up.": ["```python\nx = 1\nprint(x)\n```", "```python\nprint(x + 1)\n```", "```python\nprint(x)\n```"],
}
MAX_TURNS = 2


def padded(trajs, pad):
    """(input_ids, attention_mask, loss_mask) right-padded to a batch."""
    batch = rollout.collate(trajs, pad)
    return batch["input_ids"], batch["attention_mask"], batch["loss_mask"]


def spy_on_generate(policy):
    """Record what model.generate itself returned: (prompt width, new tokens per row) per call."""
    calls, original = [], policy.generate

    def generate(*args, **kwargs):
        out = original(*args, **kwargs)
        width = kwargs["input_ids"].shape[1]
        calls.append(out.sequences[:, width:].tolist())
        return out

    policy.generate = generate
    return calls


@pytest.fixture(scope="module")
def tokenizer():
    return model.tiny_tokenizer()


@pytest.fixture(scope="module")
def memorised(tokenizer):
    """A tiny model trained (by the loss path of SFT: token_logprobs on loss_mask) until it
    reproduces the scripted trajectories, whose observations come from the real sandbox."""
    policy = model.tiny_model(tokenizer, hidden_size=128)
    trajs = []
    for problem, turns in SCRIPTS.items():
        with sandbox.Session() as session:
            trajs.append(
                rollout.teacher_trajectory(tokenizer, model.chat_prompt_ids(tokenizer, problem), turns, session)
            )
    ids, attention, loss_mask = padded(trajs, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    policy.train()
    for _ in range(150):
        loss = sft.nll(model.token_logprobs(policy, ids, attention), loss_mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return policy.eval()


def run(policy, tokenizer, problems, **overrides):
    cfg = rollout.RolloutConfig(**{"max_turns": MAX_TURNS, "max_turn_tokens": 48, "max_total_tokens": 400, **overrides})
    calls = spy_on_generate(policy)
    with sandbox.Pool(max_workers=4, timeout=5) as pool:
        trajs = rollout.rollout(policy, tokenizer, [model.chat_prompt_ids(tokenizer, p) for p in problems], pool, cfg)
    del policy.generate  # drop the spy
    return trajs, calls, cfg


def check_record(tokenizer, trajs, calls, cfg):
    """The record properties every rollout must have (see the test docstrings)."""
    eos = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    for turn, rows in enumerate(calls):
        active = [t for t in trajs if len(t.turns) > turn]
        assert len(active) == len(rows)
        for traj, generated in zip(active, rows):
            sampled = [tok for tok, j in zip(traj.input_ids, traj.token_turn) if j == turn]
            # The trained tokens of turn j are exactly what generate produced, up to the stop...
            assert sampled == generated[: len(sampled)]
            rest = generated[len(sampled) :]
            # ...and what follows is padding, unless the trajectory ran out of length.
            assert all(tok == tokenizer.pad_token_id for tok in rest) or traj.stop_reason == "max_length"
            assert tokenizer.decode(sampled) == traj.turns[turn].text
            assert len(sampled) <= cfg.max_turn_tokens
            if sampled and sampled[-1] in eos:
                assert traj.turns[turn] is traj.turns[-1], "nothing is sampled after an end of message"
    for traj in trajs:
        n = len(traj.input_ids)
        assert len(traj.loss_mask) == len(traj.token_turn) == n and n <= cfg.max_total_tokens
        assert 1 <= len(traj.turns) <= cfg.max_turns and traj.stop_reason in rollout.STOP_REASONS
        assert not any(traj.loss_mask[: traj.prompt_len])
        assert all(m == (j >= 0) for m, j in zip(traj.loss_mask, traj.token_turn))
        turn_ids = [j for j in traj.token_turn if j >= 0]
        assert turn_ids == sorted(turn_ids), "turns appear in order"
        position = traj.prompt_len
        for j, turn in enumerate(traj.turns):  # sampled turn j, then its observation, masked
            length = sum(1 for x in traj.token_turn if x == j)
            position += length
            if j < len(traj.turns) - 1:
                obs = tokenizer.encode(turn.observation, add_special_tokens=False)
                assert traj.input_ids[position : position + len(obs)] == obs
                assert not any(traj.loss_mask[position : position + len(obs)])
                position += len(obs)
        assert position == n


def test_random_policy_rollouts_keep_an_exact_record(tokenizer):
    """Sampling at temperature 1 from a random model: the tokens with loss_mask True are exactly
    the tokens generate returned (the generator's record), each turn's tokens decode to its
    text, observations are never trained, and no limit is exceeded."""
    policy = model.tiny_model(tokenizer)
    torch.manual_seed(0)
    trajs, calls, cfg = run(policy, tokenizer, [f"What is {i} times 7?" for i in range(6)], max_turn_tokens=24)
    check_record(tokenizer, trajs, calls, cfg)


def test_the_total_length_limit_holds_for_rows_of_different_lengths(tokenizer):
    """With max_total_tokens tighter than max_turn_tokens allows, rows whose prompts differ in
    length each stop at their own limit, and the record stays exact."""
    policy = model.tiny_model(tokenizer)
    torch.manual_seed(5)  # a seed under which neither row samples an end of message first
    problems = ["Add.", "What is the sum of the first one hundred positive integers, computed by a loop?"]
    longest = max(len(model.chat_prompt_ids(tokenizer, p)) for p in problems)
    trajs, calls, cfg = run(policy, tokenizer, problems, max_turn_tokens=200, max_total_tokens=longest + 30)
    check_record(tokenizer, trajs, calls, cfg)
    assert {t.stop_reason for t in trajs} == {"max_length"}
    for t in trajs:  # a row cut by the token budget fills it exactly; one stopped before a tool
        # output that would not fit ends at or below it
        if t.turns[-1].result is None:
            assert len(t.input_ids) == cfg.max_total_tokens
        assert len(t.input_ids) <= cfg.max_total_tokens


def test_scripted_trajectories_come_out_well_formed(tokenizer, memorised):
    """No code and an answer; no code and no answer; a code error then an answer; and a run into
    max_turns: each has the right stop reason, tool calls, sandbox results and record."""
    trajs, calls, cfg = run(memorised, tokenizer, list(SCRIPTS), temperature=0)
    check_record(tokenizer, trajs, calls, cfg)
    hello, silent, divide, count = trajs
    assert hello.stop_reason == "answer" and hello.turns[0].code is None
    assert silent.stop_reason == "no_answer" and silent.turns[0].valid_call is None
    assert divide.stop_reason == "answer" and divide.turns[0].valid_call is True
    assert not divide.turns[0].result.ok and "ZeroDivisionError" in divide.turns[0].observation
    assert count.stop_reason == "max_turns" and len(count.turns) == MAX_TURNS
    assert count.turns[1].result.stdout == "2\n", "state persists across the trajectory's turns"


def test_greedy_rows_are_the_same_alone_and_in_a_padded_batch(tokenizer, memorised):
    """A row's greedy rollout does not depend on the other rows of its batch or their padding."""
    together, _, _ = run(memorised, tokenizer, list(SCRIPTS), temperature=0)
    for problem, batched in zip(SCRIPTS, together):
        alone, _, _ = run(memorised, tokenizer, [problem], temperature=0)
        assert alone[0].input_ids == batched.input_ids


def test_reusing_the_kv_cache_across_turns_changes_nothing(tokenizer, memorised):
    """Greedy rollouts continuing from the previous turn's KV cache (observations appended after
    masked padding) equal rollouts that re-encode the whole history every turn."""
    problems = list(SCRIPTS) + ["Count up."]  # rows finish at different turns
    reused, calls, cfg = run(memorised, tokenizer, problems, temperature=0, kv_reuse=True)
    check_record(tokenizer, reused, calls, cfg)
    fresh, _, _ = run(memorised, tokenizer, problems, temperature=0, kv_reuse=False)
    assert [t.input_ids for t in reused] == [t.input_ids for t in fresh]
    assert sum(len(t.turns) for t in reused) > len(problems), "some rows continued from the cache"


@pytest.mark.parametrize("kv_reuse", [True, False])
@pytest.mark.parametrize("which", ["random", "memorised"])
def test_recomputed_logprobs_match_the_samplers_own(tokenizer, memorised, which, kv_reuse):
    """log-probs of the sampled tokens from token_logprobs after the rollout equal those from the
    sampler's raw logits at the same temperature, to 1e-4 in fp32, in a padded batch, over
    every turn (with and without the KV cache carried across turns)."""
    policy = memorised if which == "memorised" else model.tiny_model(tokenizer)
    torch.manual_seed(1)
    problems = list(SCRIPTS) if which == "memorised" else ["Add 2 and 3.", "What is 9 squared?"]
    trajs, _, _ = run(policy, tokenizer, problems, temperature=0.7, record_logprobs=True, kv_reuse=kv_reuse)
    ids, attention, loss_mask = padded(trajs, tokenizer.pad_token_id)
    with torch.no_grad():
        logp = model.token_logprobs(policy, ids, attention, temperature=0.7)
    sampler = torch.tensor([t.sample_logp + [0.0] * (ids.shape[1] - len(t.sample_logp)) for t in trajs])
    assert loss_mask.any()
    if which == "memorised":
        assert max(len(t.turns) for t in trajs) > 1
    torch.testing.assert_close(logp[loss_mask], sampler[loss_mask], atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunk_tokens", [3, 100_000])
def test_logprobs_of_the_needed_positions_only_are_those_of_all_positions(tokenizer, chunk_tokens):
    """token_logprobs with `needed` gives, at the needed positions, the values and gradients it
    gives without it, and 0 elsewhere; with no position needed it computes them all."""
    policy = model.tiny_model(tokenizer)
    ids = torch.randint(0, len(tokenizer), (3, 40))
    attention = torch.ones_like(ids)
    attention[0, :5] = 0  # a left-padded row
    needed = torch.zeros_like(ids, dtype=torch.bool)
    needed[0, 20:30], needed[2, 35:] = True, True  # row 1 needs nothing
    every = model.token_logprobs(policy, ids, attention, temperature=0.9, chunk_tokens=chunk_tokens)
    some = model.token_logprobs(policy, ids, attention, temperature=0.9, chunk_tokens=chunk_tokens, needed=needed)
    torch.testing.assert_close(some[needed], every[needed], atol=1e-6, rtol=0)
    assert torch.equal(some[~needed], torch.zeros(int((~needed).sum())))
    weight = policy.get_output_embeddings().weight
    (g1,) = torch.autograd.grad(some[needed].sum(), weight)
    (g2,) = torch.autograd.grad(every[needed].sum(), weight)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)
    none = torch.zeros_like(needed)
    assert torch.equal(
        model.token_logprobs(policy, ids, attention, temperature=0.9, needed=none),
        model.token_logprobs(policy, ids, attention, temperature=0.9),
    )


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, 100_000])
def test_chunked_logprobs_equal_unchunked_ones(tokenizer, chunk_tokens):
    """token_logprobs gives the same values and gradients for any chunk size as a plain
    log-softmax over the full logits."""
    policy = model.tiny_model(tokenizer)
    ids = torch.randint(0, len(tokenizer), (3, 40))
    attention = torch.ones_like(ids)
    attention[0, :5] = 0  # a left-padded row
    logp = model.token_logprobs(policy, ids, attention, temperature=0.9, chunk_tokens=chunk_tokens)
    logits = policy(ids, attention_mask=attention, position_ids=model.position_ids_of(attention)).logits
    full = (logits.float() / 0.9).log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logp[:, 1:], full, atol=1e-5, rtol=0)
    assert torch.equal(logp[:, 0], torch.zeros(3))
    (g1,) = torch.autograd.grad(logp[:, 1:].sum(), policy.model.embed_tokens.weight)
    (g2,) = torch.autograd.grad(full.sum(), policy.model.embed_tokens.weight)
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


def test_saving_and_loading_round_trips_model_and_tokenizer(tokenizer, tmp_path):
    """A saved policy reloads through load_policy (AutoModel/AutoTokenizer) with identical logits
    and identical encodings, chat template included."""
    policy = model.tiny_model(tokenizer)
    model.save_policy(policy, tokenizer, str(tmp_path / "ckpt"))
    reloaded, retokenizer = model.load_policy(str(tmp_path / "ckpt"))
    text = "Compute 12345 * 6789.\n```python\nprint(12345 * 6789)\n```\n```output\n83810205\n```\nπ \\boxed{1}"
    assert retokenizer.encode(text) == tokenizer.encode(text)
    prompt = model.chat_prompt_ids(tokenizer, "What is 2 + 2?")
    assert model.chat_prompt_ids(retokenizer, "What is 2 + 2?") == prompt
    ids = torch.tensor([prompt])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, policy(ids).logits, atol=0, rtol=0)


def test_a_missing_model_path_is_a_clear_error(tmp_path):
    """Loading from a directory without a checkpoint names the path and what was looked for."""
    with pytest.raises(FileNotFoundError, match="config.json"):
        model.load_policy(str(tmp_path / "nothing-here"))


def test_the_record_counts_trained_and_masked_tokens_per_turn(tokenizer, memorised):
    """trajectory_record's per-turn token counts add up to the trajectory's trained and masked
    tokens (the prompt aside), the trained tokens decode to the turns' texts, the observations
    are those fed back, and the turn values are kept; the record is JSON-able."""
    trajs, _, _ = run(memorised, tokenizer, ["Divide one by zero."], temperature=0)
    traj = trajs[0]
    record = rollout.trajectory_record(traj, turn_rewards=[0.0, 1.0], returns=[0.9, 1.0], advantages=[0.5, 0.7])
    assert json.loads(json.dumps(record)) == record
    assert sum(t["tokens"] for t in record["turns"]) == sum(traj.loss_mask)
    masked_after_prompt = len(traj.loss_mask) - traj.prompt_len - sum(traj.loss_mask)
    assert sum(t["observation_tokens"] for t in record["turns"]) == masked_after_prompt
    trained = [i for i, m in zip(traj.input_ids, traj.loss_mask) if m]
    assert tokenizer.decode(trained) == "".join(t["text"] for t in record["turns"])
    masked = [i for i, m in zip(traj.input_ids[traj.prompt_len :], traj.loss_mask[traj.prompt_len :]) if not m]
    assert tokenizer.decode(masked) == "".join(t["observation"] for t in record["turns"])
    assert [(t["reward"], t["return"], t["advantage"]) for t in record["turns"]] == [(0.0, 0.9, 0.5), (1.0, 1.0, 0.7)]


def test_activation_checkpointing_gives_the_same_gradients(tokenizer):
    """load_policy(..., activation_checkpointing=True) trains with identical gradients."""
    grads = []
    for checkpointing in (False, True):
        policy, tok = model.load_policy("demo", activation_checkpointing=checkpointing)
        assert policy.is_activation_checkpointing == checkpointing
        policy.train()
        ids = torch.tensor([model.chat_prompt_ids(tok, "What is 2 + 2?")])
        sft.nll(
            model.token_logprobs(policy, ids, torch.ones_like(ids)), torch.ones_like(ids, dtype=torch.bool)
        ).backward()
        grads.append(policy.model.embed_tokens.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


code_lines = st.lists(st.text(alphabet=st.characters(blacklist_characters="\n"), max_size=20), max_size=4)


@given(code_lines, st.text(alphabet="ab \n", max_size=10), st.sampled_from(["python", "py", "Python", "python3"]))
def test_a_closed_code_block_gives_back_its_code_and_validity(lines, prose, language):
    """parse_turn returns the code of a closed ```python block exactly, backticks inside the code
    included (only ``` at the start of a line closes); the call is valid iff the code is non-blank
    and parses; an unclosed block is an invalid call; no block, no call."""
    code = "".join(line + "\n" for line in lines if not line.startswith("```"))
    text = f"{prose}```{language}\n{code}```"
    got, valid = rollout.parse_turn(text, closed_by_fence=True)
    assert got == code
    try:
        ast.parse(code)
        parses = True
    except (SyntaxError, ValueError):
        parses = False
    assert valid == (bool(code.strip()) and parses)
    assert rollout.parse_turn(f"{prose}```{language}\n{code}", closed_by_fence=False)[1] is False
    assert rollout.parse_turn(prose + code.replace("`", ""), closed_by_fence=False) == (None, None)


@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_sampling_applies_temperature_and_nothing_else(tokenizer, temperature):
    """The scores generate takes the argmax of are exactly the raw logits / temperature plus the
    row's Gumbel noise (seeded by its seed and position; none when greedy): no top-k,
    repetition penalty or other setting leaks in from the model's generation_config."""
    policy = model.tiny_model(tokenizer)
    settings = dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    for name, value in settings.items():  # as Qwen2.5-Instruct checkpoints ship
        setattr(policy.generation_config, name, value)
    original, seen = policy.generate, []

    def generate(*args, **kwargs):
        kwargs["generation_config"].output_scores = True
        kwargs["generation_config"].output_logits = True
        out = original(*args, **kwargs)
        seen.append(out)
        return out

    policy.generate = generate
    with sandbox.Pool(max_workers=2, timeout=5) as pool:
        cfg = rollout.RolloutConfig(max_turns=1, max_turn_tokens=16, max_total_tokens=400, temperature=temperature)
        prompt = model.chat_prompt_ids(tokenizer, "Hi")
        rollout.rollout(policy, tokenizer, [prompt], pool, cfg, seeds=[123])
    out = seen[0]
    for step, (scores, logits) in enumerate(zip(out.scores, out.logits)):
        noise = torch.zeros_like(logits)
        if temperature:
            g = torch.Generator().manual_seed(rollout.row_seed(123, len(prompt) + step))
            noise = -torch.log(-torch.log(torch.rand(logits.shape[1], generator=g)))
        torch.testing.assert_close(scores, logits / (temperature or 1.0) + noise)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_seeded_sampling_draws_from_the_tempered_nucleus_distribution(temperature, top_p):
    """Gumbel-max over SeededSampler's scores samples softmax(logits / temperature) cut to the
    top_p nucleus and renormalised: 40,000 rows with distinct seeds match it within 0.01 per
    token (the standard error is at most 0.0025), and tokens outside the nucleus never come."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    rows = 40_000
    sampler = rollout.SeededSampler(
        list(range(rows)), real_lengths=[7] * rows, prompt_width=3, temperature=temperature, top_p=top_p
    )
    picks = sampler(torch.zeros(rows, 3, dtype=torch.long), logits.expand(rows, -1)).argmax(dim=1)
    probs = (logits[0] / temperature).softmax(-1)
    ordered, order = probs.sort(descending=True)
    outside = order[(ordered.cumsum(0) - ordered) >= top_p]  # tokens past the nucleus
    probs[outside] = 0
    probs /= probs.sum()
    frequency = torch.bincount(picks, minlength=len(probs)).float() / rows
    assert (frequency - probs).abs().max() < 0.01
    assert frequency[outside].sum() == 0


def test_rollouts_do_not_depend_on_the_batch_size(tokenizer, memorised):
    """Generating 6 trajectories at once, 4 then 2, or one at a time gives the same tokens, turns
    and stop reasons for the same seeds, sampled (each row has its own stream) and greedy."""
    prompts = [model.chat_prompt_ids(tokenizer, p) for p in list(SCRIPTS)[:3] for _ in range(2)]
    for temperature in (1.5, 0.0):
        results = []
        for batch_size in (0, 4, 1):
            cfg = rollout.RolloutConfig(
                max_turns=MAX_TURNS,
                max_turn_tokens=48,
                max_total_tokens=400,
                temperature=temperature,
                batch_size=batch_size,
            )
            with sandbox.Pool(max_workers=4, timeout=5) as pool:
                trajs = rollout.rollout(memorised, tokenizer, prompts, pool, cfg, seeds=[11, 12, 13, 14, 15, 16])
            results.append([(t.input_ids, t.loss_mask, [u.text for u in t.turns], t.stop_reason) for t in trajs])
        assert results[0] == results[1] == results[2], f"temperature {temperature}"
        if temperature:  # the two rows of a prompt sampled differently somewhere: the seeds matter
            assert any(results[0][k][0] != results[0][k + 1][0] for k in (0, 2, 4))
        assert max(len(r[2]) for r in results[0]) > 1, "multi-turn rows"


def test_a_prompt_longer_than_the_length_limit_is_a_clear_error(tokenizer):
    """A prompt that does not fit in max_total_tokens is refused up front, naming it."""
    policy = model.tiny_model(tokenizer)
    with sandbox.Pool(max_workers=1) as pool, pytest.raises(ValueError, match="prompt 0 has"):
        cfg = rollout.RolloutConfig(max_total_tokens=10)
        rollout.rollout(policy, tokenizer, [model.chat_prompt_ids(tokenizer, "Hi")], pool, cfg)
