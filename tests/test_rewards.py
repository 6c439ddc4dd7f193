"""Properties of rewards.py: format penalties, turn rewards, GRPO's reward, shaping and its embedders."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import model
import rewards
import sandbox
from rollout import Trajectory, Turn

# ---------------------------------------------------------------- format and turn rewards


def turn(code=None, valid=None, ok=True, text=""):
    result = sandbox.Result(ok, "", "" if ok else "Error") if code is not None else None
    return Turn(text=text, code=code, valid_call=valid, result=result)


def traj(*turns):
    return Trajectory(0, [], [], [], turns=list(turns), stop_reason="answer")


def test_format_penalties_follow_the_rules():
    """-0.1 for an invalid call on any turn and for no call on turn 1; runtime errors are feedback
    unless configured otherwise."""
    assert rewards.turn_format_penalties([turn(), turn()]) == [-0.1, 0.0]
    assert rewards.turn_format_penalties([turn("x", True), turn("(", False)]) == [0.0, -0.1]
    assert rewards.turn_format_penalties([turn("1/0", True, ok=False)]) == [0.0]
    assert rewards.turn_format_penalties([turn("1/0", True, ok=False)], runtime_errors=True) == [-0.1]
    assert rewards.turn_format_penalties([turn("(", False), turn()], penalty=-0.5) == [-0.5, 0.0]


def test_turn_reward_matrix_puts_the_outcome_on_the_last_turn():
    """r_ij = r_fmt_ij everywhere plus the outcome on turn T_i; turns beyond T_i are masked."""
    trajs = [traj(turn("x", True), turn(text="\\boxed{1}")), traj(turn(text="\\boxed{2}"))]
    r, mask = rewards.turn_reward_matrix(trajs, torch.tensor([1.0, 0.3]), max_turns=3)
    torch.testing.assert_close(r, torch.tensor([[0.0, 1.0, 0.0], [0.3 - 0.1, 0.0, 0.0]]))
    assert mask.tolist() == [[True, True, False], [True, False, False]]


def test_grpo_reward_is_one_only_when_correct_and_clean():
    """GRPO's reward: 1 iff correct and no format error."""
    trajs = [traj(turn("x", True)), traj(turn()), traj(turn("x", True)), traj(turn("(", False))]
    got = rewards.grpo_rewards(trajs, torch.tensor([True, True, False, True]))
    assert got.tolist() == [1.0, 0.0, 0.0, 0.0]


# ---------------------------------------------------------------- shaping


@st.composite
def shaping_batches(draw):
    """(correct (N,), embeddings (N, D) with some zero rows, group_index (N,) scattered)."""
    N = draw(st.integers(1, 12))
    D = draw(st.integers(1, 6))
    groups = torch.tensor(draw(st.lists(st.integers(0, 3), min_size=N, max_size=N)))
    correct = torch.tensor(draw(st.lists(st.booleans(), min_size=N, max_size=N)))
    values = draw(st.lists(st.integers(-3, 5), min_size=N * D, max_size=N * D))
    return correct, torch.tensor(values, dtype=torch.float64).view(N, D), groups


@given(shaping_batches(), st.floats(0.05, 0.95))
def test_shaped_rewards_of_failures_lie_in_zero_alpha_below_any_correct(batch, alpha):
    """Correct trajectories get 1; failed ones get a value in [0, alpha], so always below 1, and
    0 when their group has no correct trajectory or they have no code."""
    correct, emb, groups = batch
    out = rewards.shape_outcomes(correct, emb, groups, alpha)
    assert torch.all(out[correct] == 1.0)
    failed = out[~correct]
    assert torch.all((failed >= 0) & (failed <= alpha + 1e-7))
    for i in range(len(correct)):
        if not correct[i] and (not correct[groups == groups[i]].any() or not emb[i].any()):
            assert out[i] == 0.0


@given(shaping_batches(), st.floats(0.05, 0.95))
def test_code_identical_to_the_correct_code_gets_exactly_alpha(batch, alpha):
    """A failed trajectory whose code equals the code of every correct one in its group gets alpha."""
    correct, emb, groups = batch
    correct = correct.clone()
    correct[0] = True
    emb = emb.clone()
    emb[0] = torch.arange(1, emb.shape[1] + 1)
    same = groups == groups[0]
    emb[same] = emb[0].clone()  # every trajectory of group 0 writes the same code
    out = rewards.shape_outcomes(correct, emb, groups, alpha)
    assert torch.all(out[same & ~correct] == torch.tensor(alpha, dtype=torch.float32))


@given(shaping_batches(), st.randoms(use_true_random=False))
def test_shaping_is_equivariant_to_permuting_trajectories(batch, rng):
    """Shuffling the batch shuffles the shaped rewards the same way."""
    correct, emb, groups = batch
    perm = list(range(len(correct)))
    rng.shuffle(perm)
    perm = torch.tensor(perm)
    out = rewards.shape_outcomes(correct, emb, groups)
    torch.testing.assert_close(rewards.shape_outcomes(correct[perm], emb[perm], groups[perm]), out[perm])


def test_shaping_clips_each_cosine_and_averages_over_the_groups_correct_trajectories():
    """A hand-computed case: cosines 0.6 and -0.4 to the two correct trajectories of the group
    give alpha * (0.6 + 0) / 2; a correct trajectory of another group does not count."""
    e = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-0.4, 0.9165151389911680], [1.0, 0.0]], dtype=torch.float64)
    correct = torch.tensor([False, True, True, True])
    groups = torch.tensor([0, 0, 0, 1])
    out = rewards.shape_outcomes(correct, e, groups, alpha=0.5)
    assert out[0].item() == pytest.approx(0.5 * 0.3, abs=1e-7)


def test_token_embedder_cosine_is_exact_for_identical_code():
    """Identical code gives cosine exactly 1 (integer counts), unrelated code less, no code a zero row."""
    tokenizer = model.tiny_tokenizer()
    e = rewards.make_embedder("tokens", tokenizer)(["print(1)", "print(1)", "while True: pass", ""])
    assert e.shape[0] == 4 and not e[3].any()
    shaped = rewards.shape_outcomes(torch.tensor([True, False, False, False]), e, torch.zeros(4, dtype=torch.long))
    assert shaped[1] == 0.5 and 0 <= shaped[2] < 0.5 and shaped[3] == 0


@pytest.mark.parametrize("spec", ["policy", "hf"])
def test_the_embedder_cache_does_not_change_results(tmp_path, spec):
    """Mean-pooled embeddings are the same from the cache, after new_step(), and batched or alone."""
    tokenizer = model.tiny_tokenizer()
    policy = model.tiny_model(tokenizer)
    if spec == "hf":
        model.save_policy(policy, tokenizer, str(tmp_path / "encoder"))
        embedder = rewards.make_embedder(f"hf:{tmp_path / 'encoder'}")
    else:
        embedder = rewards.make_embedder("policy", tokenizer, policy)
    texts = ["x = 1\nprint(x)", "print(2 ** 10)", "", "x = 1\nprint(x)"]
    first = embedder(texts)
    again = embedder(texts)
    embedder.new_step()
    fresh = embedder(texts)
    alone = torch.stack([embedder([t])[0] for t in texts])
    for other in (again, fresh, alone):
        torch.testing.assert_close(other, first, atol=1e-6, rtol=1e-6)
    assert torch.equal(first[0], first[3]) and not first[2].any()
