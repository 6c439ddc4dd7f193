"""Properties of gtpo.py: returns, advantages, token advantages and the policy loss.

The reference_* functions are slow loops written straight from the equations (float64); the
vectorised functions must agree with them, and with the algebraic properties the paper implies.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import gtpo

ATOL = 1e-6

# Rewards the project actually produces (0, 1, -0.1, shaped partial credit) plus a spread of
# exact binary fractions, so statistics stay well conditioned.
reward_values = st.one_of(st.sampled_from([0.0, 1.0, -0.1, 0.45, 0.9]), st.integers(-40, 40).map(lambda k: k / 8))
# 0 exactly, or at least 1e-6: a gamma within rounding of 0 (2e-16, or a subnormal 2e-313) makes
# returns that differ only in their last bits or underflow, where scaling rounds them equal and a
# reference's std divides by 0: float rounding of the inputs, not a property of the code.
# Not within rounding of 0 or 1: a gamma of 1 - 1e-16 makes returns that differ from gamma 1's by
# one ulp, and normalising values that differ by rounding divides rounding error by rounding error.
gammas = st.one_of(st.sampled_from([0.0, 0.5, 0.9, 1.0]), st.floats(1e-6, 1.0 - 1e-6))
modes = st.sampled_from(gtpo.MODES)


@st.composite
def turn_batches(draw, min_turns=0, max_turns=5):
    """(rewards (N, K) float64, turn_mask (N, K) prefix bool, group_index (N,) long) with
    groups of uneven size, arbitrary problem ids and rows of a group scattered in the batch."""
    num_groups = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(1, 5), min_size=num_groups, max_size=num_groups))
    ids = draw(st.lists(st.integers(-1000, 1000), min_size=num_groups, max_size=num_groups, unique=True))
    K = draw(st.integers(max(1, min_turns), max_turns))
    labels = [ids[g] for g in range(num_groups) for _ in range(sizes[g])]
    labels = [labels[p] for p in draw(st.permutations(range(len(labels))))]
    N = len(labels)
    lengths = draw(st.lists(st.integers(min_turns, K), min_size=N, max_size=N))
    rewards = draw(st.lists(reward_values, min_size=N * K, max_size=N * K))
    rewards = torch.tensor(rewards, dtype=torch.float64).view(N, K)
    turn_mask = torch.arange(K)[None, :] < torch.tensor(lengths)[:, None]
    return rewards, turn_mask, torch.tensor(labels, dtype=torch.long)


# ---------------------------------------------------------------- reference loops (the equations)


def reference_returns(rewards, turn_mask, gamma):
    N, K = rewards.shape
    returns = torch.zeros(N, K, dtype=torch.float64)
    for i in range(N):
        T = int(turn_mask[i].sum())
        for j in range(T):
            returns[i, j] = sum(gamma ** (m - j) * float(rewards[i, m]) for m in range(j, T))
    return returns


def reference_sets(mask, group_index, mode):
    """{set key: [(i, j), ...]} for the turns that take part."""
    sets = {}
    N, K = mask.shape
    for i in range(N):
        for j in range(K):
            if mask[i, j]:
                key = {"group": int(group_index[i]), "turn": (int(group_index[i]), j), "batch": 0}[mode]
                sets.setdefault(key, []).append((i, j))
    return sets


def reference_normalize(values, mask, group_index, mode, eps):
    out = torch.zeros(values.shape, dtype=torch.float64)
    for members in reference_sets(mask, group_index, mode).values():
        xs = [float(values[i, j]) for i, j in members]
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
        for (i, j), x in zip(members, xs):
            out[i, j] = 0.0 if len(set(xs)) == 1 else (x - mean) / (std + eps)
    return out


def reference_policy_loss(logp, old, adv, mask, cl, ch, agg, ref=None, kl_coef=0.0):
    N, L = logp.shape
    token_loss = [[0.0] * L for _ in range(N)]
    for i in range(N):
        for t in range(L):
            if mask[i, t]:
                r = math.exp(float(logp[i, t]) - float(old[i, t]))
                a = float(adv[i, t])
                token_loss[i][t] = -min(r * a, min(max(r, 1 - cl), 1 + ch) * a)
    count = int(mask.sum())
    rows = [i for i in range(N) if mask[i].any()]
    if agg == "token-mean":
        loss = sum(map(sum, token_loss)) / max(count, 1)
    elif agg == "seq-mean-token-mean":
        loss = sum(sum(token_loss[i]) / int(mask[i].sum()) for i in rows) / max(len(rows), 1)
    else:
        loss = sum(sum(token_loss[i]) / L for i in rows) / max(len(rows), 1)
    if ref is not None:
        k3 = 0.0
        for i in range(N):
            for t in range(L):
                if mask[i, t]:
                    d = float(ref[i, t]) - float(logp[i, t])
                    k3 += math.exp(d) - d - 1
        loss += kl_coef * k3 / max(count, 1)
    return loss


# ---------------------------------------------------------------- returns


@given(turn_batches())
def test_returns_with_gamma_zero_equal_rewards(batch):
    """gamma = 0: every existing turn's return is its own reward."""
    rewards, turn_mask, _ = batch
    returns = gtpo.discounted_returns(rewards, turn_mask, 0.0)
    assert torch.equal(returns, torch.where(turn_mask, rewards, 0.0))


@given(turn_batches(), reward_values)
def test_returns_with_gamma_one_and_last_reward_only_are_that_reward(batch, final):
    """gamma = 1 and a reward only on the last turn: every turn's return equals that reward."""
    _, turn_mask, _ = batch
    last = turn_mask & ~torch.cat([turn_mask[:, 1:], torch.zeros_like(turn_mask[:, :1])], dim=1)
    rewards = torch.where(last, final, 0.0).double()
    returns = gtpo.discounted_returns(rewards, turn_mask, 1.0)
    assert torch.equal(returns, torch.where(turn_mask, final, 0.0).double())


@given(turn_batches(), gammas)
def test_returns_satisfy_the_bellman_recursion(batch, gamma):
    """R_j = r_j + gamma * R_{j+1} on existing turns, with R = 0 after the last turn."""
    rewards, turn_mask, _ = batch
    returns = gtpo.discounted_returns(rewards, turn_mask, gamma)
    next_returns = torch.cat([returns[:, 1:], torch.zeros_like(returns[:, :1])], dim=1)
    expected = torch.where(turn_mask, rewards + gamma * next_returns, 0.0)
    torch.testing.assert_close(returns, expected, atol=ATOL, rtol=0)


@given(turn_batches(), gammas)
def test_returns_match_the_reference_loop(batch, gamma):
    """The vectorised returns equal the loop over sum_{m=j..T} gamma^(m-j) r_m to 1e-6."""
    rewards, turn_mask, _ = batch
    expected = reference_returns(rewards, turn_mask, gamma)
    torch.testing.assert_close(gtpo.discounted_returns(rewards, turn_mask, gamma), expected, atol=ATOL, rtol=0)


def test_a_turn_mask_that_is_not_a_prefix_is_rejected_naming_the_row():
    """A mask with a gap (a turn after a missing one) is an error that names the row."""
    turn_mask = torch.tensor([[True, True, False], [True, False, True]])
    with pytest.raises(ValueError, match="row 1"):
        gtpo.discounted_returns(torch.zeros(2, 3), turn_mask, 0.9)


# ---------------------------------------------------------------- advantages


@given(turn_batches(), gammas, modes, st.lists(st.sampled_from([math.nan, math.inf, -1e9, 7.0]), min_size=1))
def test_masked_turns_never_influence_any_advantage(batch, gamma, mode, junk):
    """Whatever sits in turns beyond T_i (NaN and inf included), in the rewards given to
    discounted_returns or in the values given to normalize, returns and advantages do not change."""
    rewards, turn_mask, group_index = batch
    fill = torch.tensor(junk, dtype=torch.float64).repeat(rewards.numel())[: rewards.numel()].view_as(rewards)
    returns = gtpo.discounted_returns(rewards, turn_mask, gamma)
    advantages = gtpo.normalize(returns, turn_mask, group_index, mode)
    assert torch.equal(gtpo.discounted_returns(torch.where(turn_mask, rewards, fill), turn_mask, gamma), returns)
    assert torch.equal(gtpo.normalize(torch.where(turn_mask, returns, fill), turn_mask, group_index, mode), advantages)
    assert torch.isfinite(advantages).all()


@given(turn_batches(), gammas, modes)
def test_every_normalisation_set_has_mean_zero_and_unit_std(batch, gamma, mode):
    """Per set: advantages average 0, and have std 1 where the set holds more than one distinct value."""
    rewards, turn_mask, group_index = batch
    returns = gtpo.discounted_returns(rewards, turn_mask, gamma)
    advantages = gtpo.normalize(returns, turn_mask, group_index, mode, eps=0.0)
    for members in reference_sets(turn_mask, group_index, mode).values():
        a = torch.stack([advantages[i, j] for i, j in members])
        assert abs(float(a.mean())) < ATOL
        if len({float(returns[i, j]) for i, j in members}) > 1:
            assert abs(float(a.std()) - 1.0) < ATOL
        else:
            assert torch.equal(a, torch.zeros_like(a))


@given(turn_batches(), modes, st.sampled_from([0.0, 1e-6]), st.sampled_from([0.1, 0.3, 1 / 3, 0.9, 1.0]))
def test_a_set_of_equal_values_gets_exact_zeros(batch, mode, eps, level):
    """A set whose values are all equal gives exactly 0, never NaN or inf, eps = 0 included."""
    _, turn_mask, group_index = batch
    N, K = turn_mask.shape
    # One value per set: a function of the set's key only (values like 0.1 do not average exactly).
    _, gid = torch.unique(group_index, return_inverse=True)
    key = {
        "group": gid[:, None].expand(N, K),
        "turn": gid[:, None] * K + torch.arange(K),
        "batch": torch.zeros(N, K, dtype=torch.long),
    }[mode]
    values = level * (1 + key.double())
    advantages = gtpo.normalize(values, turn_mask, group_index, mode, eps=eps)
    assert torch.equal(advantages, torch.zeros_like(advantages))


@given(turn_batches(), gammas, modes, st.sampled_from([0.0, 1e-6]))
def test_normalize_matches_the_reference_loop(batch, gamma, mode, eps):
    """The vectorised normalisation equals the loop over sets to 1e-6 in float64, for every mode."""
    rewards, turn_mask, group_index = batch
    returns = gtpo.discounted_returns(rewards, turn_mask, gamma)
    expected = reference_normalize(returns, turn_mask, group_index, mode, eps)
    torch.testing.assert_close(gtpo.normalize(returns, turn_mask, group_index, mode, eps), expected, atol=ATOL, rtol=0)


@given(turn_batches(), modes, st.floats(0.01, 100.0), st.floats(-100.0, 100.0))
def test_normalize_is_invariant_to_positive_affine_transforms(batch, mode, a, b):
    """normalize(a * v + b) == normalize(v) for a > 0 (eps = 0; eps only bends near-constant sets)."""
    values, turn_mask, group_index = batch
    before = gtpo.normalize(values, turn_mask, group_index, mode, eps=0.0)
    after = gtpo.normalize(a * values + b, turn_mask, group_index, mode, eps=0.0)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


@given(turn_batches(), gammas, modes, st.floats(0.01, 100.0))
def test_gtpo_advantages_are_invariant_to_scaling_rewards(batch, gamma, mode, a):
    """Returns are linear in rewards, so GTPO advantages do not change when rewards are scaled by a > 0.

    (A shift b is not preserved by returns: it adds b * sum_m gamma^(m-j), which depends on j.)"""
    rewards, turn_mask, group_index = batch

    def advantages(r):
        return gtpo.normalize(gtpo.discounted_returns(r, turn_mask, gamma), turn_mask, group_index, mode, 0.0)

    torch.testing.assert_close(advantages(a * rewards), advantages(rewards), atol=1e-6, rtol=0)


@given(turn_batches(), gammas, modes, st.randoms(use_true_random=False))
def test_advantages_are_equivariant_to_permuting_trajectories(batch, gamma, mode, rng):
    """Shuffling the trajectories of the batch shuffles returns and advantages the same way."""
    rewards, turn_mask, group_index = batch
    perm = list(range(len(group_index)))
    rng.shuffle(perm)
    perm = torch.tensor(perm)

    def advantages(r, m, g):
        return gtpo.normalize(gtpo.discounted_returns(r, m, gamma), m, g, mode)

    expected = advantages(rewards, turn_mask, group_index)[perm]
    torch.testing.assert_close(
        advantages(rewards[perm], turn_mask[perm], group_index[perm]), expected, atol=1e-12, rtol=0
    )


@given(turn_batches(min_turns=1), gammas, st.floats(0.0, 1e-3))
def test_single_turn_gtpo_reduces_to_grpo(batch, gamma, eps):
    """With one turn per trajectory, GTPO's advantages equal grpo_advantages in modes group and
    turn, and in mode batch equal grpo_advantages with the whole batch as one group."""
    rewards, turn_mask, group_index = batch
    single = torch.zeros_like(turn_mask)
    single[:, 0] = True
    returns = gtpo.discounted_returns(rewards, single, gamma)  # = rewards on turn 1
    for mode, groups in (("group", group_index), ("turn", group_index), ("batch", torch.zeros_like(group_index))):
        gtpo_adv = gtpo.normalize(returns, single, group_index, mode, eps)[:, 0]
        torch.testing.assert_close(gtpo_adv, gtpo.grpo_advantages(rewards[:, 0], groups, eps), atol=1e-12, rtol=0)


@given(turn_batches(min_turns=1))
def test_grpo_advantages_match_the_reference_and_are_affine_invariant(batch):
    """grpo_advantages is the group z-score of the reward, unchanged by r -> 3r - 2."""
    rewards, _, group_index = batch
    r = rewards[:, 0]
    everything = torch.ones(len(r), 1, dtype=torch.bool)
    expected = reference_normalize(r[:, None], everything, group_index, "group", 0.0)[:, 0]
    torch.testing.assert_close(gtpo.grpo_advantages(r, group_index, 0.0), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(gtpo.grpo_advantages(3 * r - 2, group_index, 0.0), expected, atol=ATOL, rtol=0)


@given(turn_batches(min_turns=1), st.data())
def test_grpo_trajectories_left_out_get_zero_and_do_not_move_the_others(batch, data):
    """With mask False for some trajectories, those get 0 and the rest equal GRPO on the rest alone."""
    rewards, _, group_index = batch
    r = rewards[:, 0]
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(r), max_size=len(r))))
    adv = gtpo.grpo_advantages(r, group_index, 0.0, mask=mask)
    assert torch.equal(adv[~mask], torch.zeros_like(adv[~mask]))
    torch.testing.assert_close(adv[mask], gtpo.grpo_advantages(r[mask], group_index[mask], 0.0), atol=1e-12, rtol=0)


def test_flat_sets_give_finite_gradients_to_the_values():
    """Backpropagating through normalize on a set of equal values gives finite gradients (no NaN)."""
    values = torch.tensor([[1.0, 1.0], [1.0, 1.0]], requires_grad=True)
    gtpo.normalize(values, torch.ones(2, 2, dtype=torch.bool), torch.tensor([0, 0]), eps=0.0).sum().backward()
    assert torch.isfinite(values.grad).all()


def test_integer_rewards_are_rejected_rather_than_truncated():
    """Integer rewards would be cast back and truncated; they are an error instead."""
    with pytest.raises(AssertionError, match="float"):
        gtpo.grpo_advantages(torch.tensor([0, 1, 1, 0]), torch.zeros(4, dtype=torch.long))
    with pytest.raises(AssertionError, match="float"):
        gtpo.discounted_returns(torch.tensor([[0, 0, 1]]), torch.ones(1, 3, dtype=torch.bool), 0.9)


# ---------------------------------------------------------------- token advantages


@st.composite
def token_turns(draw, N, K):
    """token_turn (N, L): per row, prompt (-1), then turns 0..T-1 each followed by tool output (-1)."""
    rows = []
    for _ in range(N):
        row = [-1] * draw(st.integers(0, 3))
        for j in range(draw(st.integers(0, K))):
            row += [j] * draw(st.integers(1, 4)) + [-1] * draw(st.integers(0, 3))
        rows.append(row)
    L = max(1, max(map(len, rows)))
    return torch.tensor([row + [-1] * (L - len(row)) for row in rows], dtype=torch.long)


@given(st.data(), st.integers(1, 5), st.integers(1, 5))
def test_every_token_of_turn_j_gets_a_j_and_untrained_tokens_get_zero(data, N, K):
    """token_advantages[i, t] = A[i, token_turn[i, t]] where token_turn >= 0, and 0 where it is -1."""
    token_turn = data.draw(token_turns(N, K))
    turn_adv = torch.randn(N, K, dtype=torch.float64)
    adv = gtpo.token_advantages(turn_adv, token_turn)
    for i in range(N):
        for t in range(token_turn.shape[1]):
            j = int(token_turn[i, t])
            assert float(adv[i, t]) == (0.0 if j < 0 else float(turn_adv[i, j]))


def test_token_turn_outside_the_turn_range_is_rejected():
    """A token_turn outside [-1, K) is an error, not a silent wrong gather."""
    for bad in (2, -2):
        with pytest.raises(RuntimeError, match="out of bounds"):
            gtpo.token_advantages(torch.zeros(1, 2), torch.tensor([[0, 1, bad]]))


# ---------------------------------------------------------------- policy loss

aggregations = st.sampled_from(gtpo.AGGREGATIONS)
clips = st.floats(0.05, 0.5)


@st.composite
def loss_inputs(draw, max_n=5, max_l=7):
    """(logp, old_logp, advantages, loss_mask) float64 (N, L) with ratios around 1."""
    N, L = draw(st.integers(1, max_n)), draw(st.integers(1, max_l))

    def tensor(elements):
        return torch.tensor(draw(st.lists(elements, min_size=N * L, max_size=N * L)), dtype=torch.float64).view(N, L)

    old_logp = tensor(st.floats(-6.0, 0.0))
    logp = old_logp + tensor(st.floats(-0.7, 0.7))
    advantages = tensor(st.floats(-3.0, 3.0))
    loss_mask = tensor(st.booleans()).bool()
    return logp, old_logp, advantages, loss_mask


@given(loss_inputs(), clips, clips, aggregations, st.booleans(), st.floats(0.0, 0.5))
def test_policy_loss_matches_the_reference_loop(inputs, cl, ch, agg, with_ref, kl_coef):
    """policy_loss equals the per-token loop over -min(rA, clip(r)A) plus the k3 KL, to 1e-6,
    for every aggregation."""
    logp, old_logp, advantages, loss_mask = inputs
    ref = old_logp - 0.3 if with_ref else None
    kl_coef = kl_coef if with_ref else 0.0
    loss, _ = gtpo.policy_loss(logp, old_logp, advantages, loss_mask, cl, ch, agg, ref_logp=ref, kl_coef=kl_coef)
    expected = reference_policy_loss(logp, old_logp, advantages, loss_mask, cl, ch, agg, ref, kl_coef)
    assert abs(float(loss) - expected) < ATOL


@given(loss_inputs(), clips, clips)
def test_stats_match_their_definitions_over_trained_tokens(inputs, cl, ch):
    """clip_frac, approx_kl = mean((r - 1) - log r), ratio_mean and kl_ref = mean k3 are means over
    the trained tokens only, as a loop over those tokens computes them."""
    logp, old_logp, advantages, loss_mask = inputs
    ref = old_logp - 0.3
    _, stats = gtpo.policy_loss(logp, old_logp, advantages, loss_mask, cl, ch, ref_logp=ref, kl_coef=0.1)
    tokens = [(i, t) for i in range(logp.shape[0]) for t in range(logp.shape[1]) if loss_mask[i, t]]
    n = max(len(tokens), 1)
    log_r = [float(logp[i, t] - old_logp[i, t]) for i, t in tokens]
    d = [float(ref[i, t] - logp[i, t]) for i, t in tokens]
    a = [float(advantages[i, t]) for i, t in tokens]
    expected = {
        "clip_frac": sum(
            (x > 0 and math.exp(lr) > 1 + ch) or (x < 0 and math.exp(lr) < 1 - cl) for x, lr in zip(a, log_r)
        )
        / n,
        "approx_kl": sum(math.exp(lr) - 1 - lr for lr in log_r) / n,
        "ratio_mean": sum(math.exp(lr) for lr in log_r) / n,
        "kl_ref": sum(math.exp(x) - x - 1 for x in d) / n,
    }
    for name, value in expected.items():
        assert abs(float(stats[name]) - value) < 1e-9, name


def test_kl_coef_without_a_reference_is_an_error():
    """Asking for a KL penalty without reference log-probs fails loudly instead of being ignored."""
    with pytest.raises(AssertionError, match="ref_logp"):
        gtpo.policy_loss(
            torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), kl_coef=0.1
        )


@given(loss_inputs(), aggregations)
def test_gradient_at_ratio_one_is_minus_advantage_over_count(inputs, agg):
    """At ratio 1, d loss / d logp = -A / count on trained tokens and 0 elsewhere; count is the
    token count (token-mean), n_i * rows (seq-mean-token-mean) or L * rows (seq-mean-token-sum-norm)."""
    _, old_logp, advantages, loss_mask = inputs
    logp = old_logp.clone().requires_grad_(True)
    loss, _ = gtpo.policy_loss(logp, old_logp, advantages, loss_mask, agg=agg)
    loss.backward()
    N, L = loss_mask.shape
    rows = max(int(loss_mask.any(dim=1).sum()), 1)
    count = {
        "token-mean": torch.full((N, 1), float(max(int(loss_mask.sum()), 1)), dtype=torch.float64),
        "seq-mean-token-mean": loss_mask.sum(dim=1, keepdim=True).clamp(min=1).double() * rows,
        "seq-mean-token-sum-norm": torch.full((N, 1), float(L * rows), dtype=torch.float64),
    }[agg]
    expected = torch.where(loss_mask, -advantages / count, 0.0)
    torch.testing.assert_close(logp.grad, expected, atol=1e-12, rtol=0)


@given(loss_inputs(), clips, clips)
def test_clipping_stops_the_gradient_exactly_where_ppo_says(inputs, cl, ch):
    """The gradient is 0 where A > 0 and ratio > 1 + clip_high or A < 0 and ratio < 1 - clip_low,
    and -ratio * A / count on every other trained token; clip_frac counts the clipped tokens."""
    logp, old_logp, advantages, loss_mask = inputs
    logp = logp.clone().requires_grad_(True)
    loss, stats = gtpo.policy_loss(logp, old_logp, advantages, loss_mask, cl, ch)
    loss.backward()
    ratio = torch.exp(logp.detach() - old_logp)
    clipped = ((advantages > 0) & (ratio > 1 + ch)) | ((advantages < 0) & (ratio < 1 - cl))
    count = max(int(loss_mask.sum()), 1)
    expected = torch.where(loss_mask & ~clipped, -ratio * advantages / count, 0.0)
    torch.testing.assert_close(logp.grad, expected, atol=1e-12, rtol=0)
    assert abs(float(stats["clip_frac"]) - int((clipped & loss_mask).sum()) / count) < 1e-12


@given(loss_inputs(max_n=8), aggregations, st.floats(0.0, 0.5), st.lists(st.integers(1, 7), min_size=1, max_size=8))
def test_micro_batches_with_global_counts_sum_to_the_full_batch(inputs, agg, kl_coef, cuts):
    """Splitting the rows into micro-batches and passing the global num_tokens and num_seqs makes
    the losses and the gradients sum to the full batch's: accumulation and data parallelism are exact."""
    logp, old_logp, advantages, loss_mask = inputs
    ref = old_logp + 0.2
    N = logp.shape[0]
    bounds = sorted({0, N, *[c for c in cuts if c < N]})
    full_logp = logp.clone().requires_grad_(True)
    full, _ = gtpo.policy_loss(full_logp, old_logp, advantages, loss_mask, agg=agg, ref_logp=ref, kl_coef=kl_coef)
    full.backward()
    num_tokens, num_seqs = loss_mask.sum(), loss_mask.any(dim=1).sum()
    micro_logp = logp.clone().requires_grad_(True)
    total = 0.0
    for a, b in zip(bounds[:-1], bounds[1:]):
        part, _ = gtpo.policy_loss(
            micro_logp[a:b],
            old_logp[a:b],
            advantages[a:b],
            loss_mask[a:b],
            agg=agg,
            num_tokens=num_tokens,
            ref_logp=ref[a:b],
            kl_coef=kl_coef,
            num_seqs=num_seqs,
        )
        part.backward()
        total += float(part.detach())
    assert abs(total - float(full.detach())) < 1e-9
    torch.testing.assert_close(micro_logp.grad, full_logp.grad, atol=1e-12, rtol=0)


@given(loss_inputs(), clips, clips)
def test_the_three_aggregations_agree_when_every_token_is_trained(inputs, cl, ch):
    """With every token of every sequence trained, the three aggregations give the same loss."""
    logp, old_logp, advantages, _ = inputs
    everything = torch.ones_like(logp, dtype=torch.bool)
    losses = [
        float(gtpo.policy_loss(logp, old_logp, advantages, everything, cl, ch, agg)[0]) for agg in gtpo.AGGREGATIONS
    ]
    assert max(losses) - min(losses) < 1e-12


@given(loss_inputs(), st.floats(0.01, 1.0))
def test_kl_to_the_reference_is_non_negative_and_zero_at_the_reference(inputs, kl_coef):
    """The k3 term is >= 0, and exactly 0 when the policy equals the reference."""
    logp, old_logp, advantages, loss_mask = inputs
    base, _ = gtpo.policy_loss(logp, old_logp, advantages, loss_mask)
    at_ref, stats = gtpo.policy_loss(logp, old_logp, advantages, loss_mask, ref_logp=logp, kl_coef=kl_coef)
    assert float(at_ref) == float(base) and float(stats["kl_ref"]) == 0.0
    away, stats = gtpo.policy_loss(logp, old_logp, advantages, loss_mask, ref_logp=old_logp, kl_coef=kl_coef)
    assert float(away) >= float(base) - 1e-12 and float(stats["kl_ref"]) >= 0.0


def test_untrained_positions_holding_inf_or_nan_give_finite_loss_and_gradients():
    """Padding may hold -inf or NaN log-probs; they never reach the loss or its gradient."""
    logp = torch.tensor([[-1.0, -math.inf, math.nan]], requires_grad=True)
    old_logp = torch.tensor([[-1.1, math.nan, -2.0]])
    loss_mask = torch.tensor([[True, False, False]])
    advantages = torch.tensor([[1.0, math.inf, 2.0]])
    for agg in gtpo.AGGREGATIONS:
        logp.grad = None
        loss, stats = gtpo.policy_loss(logp, old_logp, advantages, loss_mask, agg=agg, ref_logp=old_logp, kl_coef=0.1)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
        assert all(torch.isfinite(v) for v in stats.values())
        assert logp.grad[0, 1] == 0 and logp.grad[0, 2] == 0


def test_nothing_trained_gives_zero_loss():
    """An all-False loss_mask gives loss 0 (not NaN) for every aggregation."""
    logp = torch.zeros(2, 3, requires_grad=True)
    for agg in gtpo.AGGREGATIONS:
        loss, _ = gtpo.policy_loss(
            logp, torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool), agg=agg
        )
        assert float(loss.detach()) == 0.0


# ---------------------------------------------------------------- dtypes and devices

devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_every_function_runs_in_any_float_dtype_and_agrees_with_float64(device, dtype):
    """Each function accepts any float dtype on any device, returns that dtype, and matches float64
    to the dtype's precision."""
    g = torch.Generator().manual_seed(0)
    N, K, L = 12, 4, 32
    rewards = torch.randint(0, 2, (N, K), generator=g).double()
    turn_mask = torch.arange(K)[None, :] < torch.randint(1, K + 1, (N, 1), generator=g)
    group_index = torch.arange(N) % 3
    token_turn = torch.randint(-1, K, (N, L), generator=g)
    token_turn = torch.where(turn_mask.gather(1, token_turn.clamp(min=0)), token_turn, -1)  # existing turns
    logp = -torch.rand(N, L, generator=g, dtype=torch.float64)
    old_logp = logp + 0.1 * torch.randn(N, L, generator=g, dtype=torch.float64)

    def pipeline(dt, dev):
        to = dict(dtype=dt, device=dev)
        returns = gtpo.discounted_returns(rewards.to(**to), turn_mask.to(dev), 0.9)
        turn_adv = gtpo.normalize(returns, turn_mask.to(dev), group_index.to(dev))
        adv = gtpo.token_advantages(turn_adv, token_turn.to(dev))
        grpo = gtpo.grpo_advantages(rewards[:, 0].to(**to), group_index.to(dev))
        loss, _ = gtpo.policy_loss(logp.to(**to), old_logp.to(**to), adv, token_turn.to(dev) >= 0)
        return returns, turn_adv, adv, grpo, loss

    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    for got, want in zip(pipeline(dtype, device), pipeline(torch.float64, "cpu")):
        # Returns and advantages come back in the input dtype; the loss in at least float32.
        assert got.dtype == (dtype if got.dim() else torch.promote_types(dtype, torch.float32))
        assert got.device.type == device
        torch.testing.assert_close(got.cpu().double(), want, atol=tol * (1 + want.abs().max().item()), rtol=0)
