"""GTPO on a page: turn-level returns, normalised advantages, and the clipped policy loss.

Group Turn Policy Optimization (Ding et al., arXiv 2511.14846) trains a language model on
multi-turn tool-integrated reasoning. For one problem, G trajectories are sampled; trajectory i
has turns j = 1..T_i, each turn being generated text (ending in a Python tool call, or the final
answer) followed by the sandbox's output. The method, in the paper's numbering (the one
numbering of the project), with the function of each step:

    1. turn-level rewards   r_ij = r_acc_ij + r_fmt_ij, an (N, K) matrix    rewards.turn_reward_matrix
                            r_fmt_ij, the format penalties of each turn     rewards.turn_format_penalties
    2. return-based advantages
                            R_ij = sum_{m=j..T_i} gamma^(m-j) r_im          discounted_returns
                            A_ij = (R_ij - mean(S)) / (std(S) + eps)        normalize
                            S = the normalisation set of (i, j), see MODES below
                            every token sampled in turn j gets A_ij         token_advantages
    3. self-supervised shaping
                            a failed trajectory in a group with a correct one gets alpha * the
                            mean cosine similarity of its code to the correct ones' code as its
                            outcome reward                                  rewards.shape_outcomes
                            It is computed before step 1's matrix is built, since it sets r_acc
                            on the last turn.
    4. the objective        PPO-clip surrogate per sampled token, tool-output
                            tokens masked, optional k3 KL to a reference    policy_loss

GRPO, the baseline, is one reward per trajectory (rewards.grpo_rewards) normalised within its
group (grpo_advantages) and broadcast to every sampled token.

Shape legend (used in every docstring and shape comment of the project):
    N trajectories in the batch, G trajectories per problem (group size), K max turns,
    L tokens per padded sequence, V vocabulary size.

Normalisation MODES (the set S over which mean and std are taken for the turn (i, j)):
    "group": every existing turn of every trajectory of the same problem as i (default).
    "turn":  the turns with the same index j of the trajectories of the same problem as i.
    "batch": every existing turn in the batch.

Choices the paper leaves open, and deviations from it (each listed once, here; "step n" is the
step above it concerns):
    1. Step 1, format errors. An invalid tool call is an unterminated fence, empty code or code
       that does not parse; code that raises when run is feedback, not a format error (unless
       rewards.turn_format_penalties' runtime_errors). The paper's rule that a first turn
       without a tool call is a format error is kept, and can be turned off
       (--first_turn_tool_call false) where the tool is optional.
    2. Step 2, the normalisation set. The available text does not settle it; "group" is the
       default and "turn" and "batch" are offered (MODES above). Evidence: in the miniature none
       is ahead of GRPO over 8 paired seeds; "turn" is 1.0 points over "group" (95% [-0.3, +2.3]).
    3. Step 2, statistics: std uses Bessel's correction (torch's default); eps is added to the
       std, not the variance. A set with one element has std 0; a set whose values are all equal
       gets advantage exactly 0 (never NaN or inf, eps = 0 included).
    4. Step 2, turns left out. Turns masked out (beyond T_i, or whole trajectories whose sandbox
       itself failed, an infrastructure error rather than the code's) take no part in any
       statistic and get advantage 0, under GTPO and GRPO alike. Their tokens must also be
       False in policy_loss's loss_mask; train.py leaves sandbox failures out of num_tokens too.
    5. Step 2, within a turn every sampled token gets the turn's advantage; there is no discount
       between tokens, and tool-output tokens are never trained.
    6. Step 3, the embeddings. The paper embeds code with a hosted embedding model (Titan);
       here the embedders are local (rewards.make_embedder): token-count vectors from the
       policy's tokenizer (the default: no second model), the policy's mean-pooled hidden
       states, or a local Hugging Face encoder. Cosines are clipped at 0, a trajectory without
       code gets no credit, and shaping may compare whole turn texts instead of code, or be off
       (--shaping text / none).
    7. Step 3 with a reward plug-in (--reward_fn): the outcome score may be any value in [0, 1]
       instead of the paper's 1 or 0; a trajectory counts as correct only at 1, and a failed one
       keeps max(its score, its shaped credit). With the built-in grader a failed trajectory
       scores 0, so this is the paper's rule.
    8. Step 4, loss aggregation: "token-mean" (sum over trained tokens / their global count) is
       the default; "seq-mean-token-mean" and "seq-mean-token-sum-norm" are offered. For exact
       gradient accumulation and data parallelism the caller passes the global counts
       (num_tokens, num_seqs); "seq-mean-token-sum-norm" divides by L, the padded width, so
       micro-batches must share it (they do when they are row slices of one batch). The count
       is every sampled token of the (mini-)batch, groups whose advantages are all zero
       included (as TRL and verl count). Counting only the tokens of groups with signal,
       train.py's --loss_denominator signal, scales each step by 1 / (1 - their share): a
       larger step the more groups stagnate, which differs between GTPO and GRPO.
    9. Step 4, groups whose advantages are all zero get no forward pass: their surrogate is
       exactly 0, so they add exactly 0 to the loss and its gradient, and train.py skips their
       forward and backward passes (their tokens still count, see 8). With kl_coef > 0 they are
       forwarded, since their KL term is not 0.
   10. Step 4, clipping may be asymmetric (clip_low, clip_high); both default to the paper-era
       PPO value 0.2. It acts only when a rollout batch takes more than one optimizer step
       (--mini_batch_size, --ppo_epochs); train.py's default is one, whose ratio is 1.
   11. Step 4, the KL to a reference is optional (kl_coef = 0 by default), uses the k3 estimator
       exp(ref - logp) - (ref - logp) - 1, and is added as kl_coef times its token-mean.
   12. Step 4, log-probabilities (old, trained and reference) are taken at the sampling
       temperature, as TRL and verl take them.

Every function is pure and vectorised (no Python loop over trajectories, turns or tokens) and
works on any device; rows of a group may sit anywhere in the batch. Arithmetic is done in at
least float32 whatever the input dtype; returns and advantages come back in the input dtype.
"""

import torch

MODES = ("group", "turn", "batch")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _compute_dtype(t):
    """The dtype to do arithmetic in: the input's, but never below float32."""
    return torch.promote_types(t.dtype, torch.float32)


def _check_turn_mask(turn_mask, shape):
    assert turn_mask.dtype == torch.bool, f"turn_mask must be bool, got {turn_mask.dtype}"
    assert turn_mask.shape == shape, f"turn_mask {tuple(turn_mask.shape)} != {tuple(shape)}"
    gaps = turn_mask[:, 1:] & ~turn_mask[:, :-1]  # (N, K-1) a turn after a missing one
    if gaps.any():
        row = int(gaps.any(dim=1).nonzero()[0])
        raise ValueError(f"turn_mask row {row} is not a prefix: {turn_mask[row].tolist()}")


def discounted_returns(turn_rewards, turn_mask, gamma):
    """Discounted return of every turn: R_ij = sum_{m=j..T_i} gamma^(m-j) r_im.

    Equivalently R_ij = r_ij + gamma * R_i(j+1), with R beyond the last turn T_i equal to 0.

    turn_rewards (N, K) float; turn_mask (N, K) bool, True for turns that exist (each row a
    prefix: turns 1..T_i); gamma a float in [0, 1]. Returns (N, K), 0 where turn_mask is False.
    Rewards under a False mask are ignored whatever they hold (NaN included).
    """
    assert turn_rewards.dim() == 2, f"turn_rewards must be (N, K), got {tuple(turn_rewards.shape)}"
    assert turn_rewards.is_floating_point(), f"turn_rewards must be float, got {turn_rewards.dtype}"
    _check_turn_mask(turn_mask, turn_rewards.shape)
    assert 0.0 <= gamma <= 1.0, f"gamma must be in [0, 1], got {gamma}"
    K = turn_rewards.shape[1]
    dtype = _compute_dtype(turn_rewards)
    rewards = torch.where(turn_mask, turn_rewards.to(dtype), 0.0)  # (N, K)
    j = torch.arange(K, device=turn_rewards.device)
    steps = j[None, :] - j[:, None]  # (K, K) m - j
    later = steps >= 0  # (K, K) True where turn m counts towards the return of turn j
    # 0 ** 0 == 1, so gamma = 0 gives R = r.
    discount = torch.where(later, gamma ** steps.clamp(min=0).to(dtype), 0.0)
    returns = (rewards[:, None, :] * discount).sum(dim=-1)  # (N, K) R[:, j] = sum_m D[j, m] r[:, m]
    return torch.where(turn_mask, returns, 0.0).to(turn_rewards.dtype)


def _set_ids(group_index, K, mode):
    """(N, K) id of the normalisation set of every turn, and the number of sets."""
    N = group_index.shape[0]
    device = group_index.device
    groups, group_id = torch.unique(group_index, return_inverse=True)  # (G',), (N,)
    if mode == "group":
        return group_id[:, None].expand(N, K), len(groups)
    if mode == "turn":
        return group_id[:, None] * K + torch.arange(K, device=device)[None, :], len(groups) * K
    return torch.zeros(N, K, dtype=torch.long, device=device), 1  # "batch"


def normalize(values, mask, group_index, mode="group", eps=1e-6):
    """Standardise values within their normalisation set: A = (v - mean(S)) / (std(S) + eps).

    values (N, K) float (returns for GTPO); mask (N, K) bool, True for entries that take part;
    group_index (N,) long, the problem id of each trajectory (rows of a group need not be
    contiguous, ids need not be 0..G-1); mode in MODES (see the module docstring). std is
    Bessel-corrected; a one-element set has std 0. A set whose values are all equal gets exactly
    0, checked directly: floating point does not cancel (mean(0.1, 0.1, 0.1) != 0.1). Returns
    advantages (N, K), 0 where mask is False; masked values never influence anything.
    """
    assert values.dim() == 2, f"values must be (N, K), got {tuple(values.shape)}"
    assert values.is_floating_point(), f"values must be float, got {values.dtype}"
    assert mask.dtype == torch.bool and mask.shape == values.shape, "mask must be bool (N, K)"
    assert group_index.shape == values.shape[:1], "group_index must be (N,)"
    assert mode in MODES, f"mode must be one of {MODES}, got {mode!r}"
    assert eps >= 0, f"eps must be >= 0, got {eps}"
    dtype = _compute_dtype(values)
    set_id, num_sets = _set_ids(group_index, values.shape[1], mode)
    ids = set_id[mask]  # (M,) one entry per turn that takes part
    v = values[mask].to(dtype)  # (M,)
    zeros = torch.zeros(num_sets, dtype=dtype, device=values.device)  # (S,)
    count = zeros.index_add(0, ids, torch.ones_like(v))
    mean = zeros.index_add(0, ids, v) / count.clamp(min=1)
    deviation = v - mean[ids]  # (M,)
    var = zeros.index_add(0, ids, deviation**2) / (count - 1).clamp(min=1)
    lo = zeros.scatter_reduce(0, ids, v, "amin", include_self=False)
    hi = zeros.scatter_reduce(0, ids, v, "amax", include_self=False)
    std = torch.where(var > 0, torch.where(var > 0, var, 1.0).sqrt(), 0.0)  # no NaN gradient at 0
    denom = (std + eps)[ids]  # (M,)
    # Equal values carry no signal; an underflowed std must not divide by zero either.
    flat = (lo == hi)[ids] | (denom == 0)
    adv = torch.where(flat, 0.0, deviation / torch.where(flat, 1.0, denom))  # (M,)
    advantages = torch.zeros_like(values)  # (N, K)
    advantages[mask] = adv.to(values.dtype)
    return advantages


def grpo_advantages(rewards, group_index, eps=1e-6, mask=None):
    """GRPO's advantage: A_i = (r_i - mean(group)) / (std(group) + eps), same statistics as normalize.

    rewards (N,) float, one per trajectory; group_index (N,) long; mask (N,) bool, the
    trajectories that take part (default all; e.g. False after a sandbox infrastructure failure).
    Returns (N,), 0 where mask is False.
    """
    assert rewards.dim() == 1, f"rewards must be (N,), got {tuple(rewards.shape)}"
    assert rewards.is_floating_point(), f"rewards must be float, got {rewards.dtype}"
    if mask is None:
        mask = torch.ones_like(rewards, dtype=torch.bool)
    return normalize(rewards[:, None], mask[:, None], group_index, "group", eps)[:, 0]


def token_advantages(turn_advantages, token_turn):
    """Give every sampled token its turn's advantage: A_it = A_i,token_turn[i,t].

    turn_advantages (N, K) float; token_turn (N, L) long, the 0-based turn of each sampled token
    and -1 for every token not trained (prompt, tool output, padding). Returns (N, L), 0 at -1.
    """
    assert turn_advantages.dim() == 2 and token_turn.dim() == 2, "expected (N, K) and (N, L)"
    assert token_turn.shape[0] == turn_advantages.shape[0], "N differs"
    assert token_turn.dtype == torch.long, f"token_turn must be long, got {token_turn.dtype}"
    # Column 0 of the padded table is the 0 that untrained tokens (turn -1) pick up. gather
    # checks the bounds itself: a turn outside [-1, K) raises on the CPU (a device-side assert
    # on CUDA) rather than reading a wrong value.
    padded = torch.cat([turn_advantages.new_zeros(turn_advantages.shape[0], 1), turn_advantages], dim=1)
    return padded.gather(1, token_turn + 1)  # (N, L)


def _per_count(total, count):
    """total / count, with a count of 0 (nothing trained) giving 0 instead of NaN."""
    count = torch.as_tensor(count, dtype=total.dtype, device=total.device)
    return total / count.clamp(min=1)


def policy_loss(
    logp,
    old_logp,
    advantages,
    loss_mask,
    clip_low=0.2,
    clip_high=0.2,
    agg="token-mean",
    num_tokens=None,
    ref_logp=None,
    kl_coef=0.0,
    num_seqs=None,
):
    """The PPO-clip surrogate per trained token, aggregated, plus an optional KL to a reference.

        ratio_it = exp(logp_it - old_logp_it)
        l_it     = -min(ratio_it * A_it, clip(ratio_it, 1 - clip_low, 1 + clip_high) * A_it)
        "token-mean":              loss = sum_{it trained} l_it / num_tokens
        "seq-mean-token-mean":     loss = sum_i (sum_t l_it / n_i) / num_seqs
        "seq-mean-token-sum-norm": loss = sum_i (sum_t l_it / L) / num_seqs
        with KL:                   loss += kl_coef * sum_{it trained} k3_it / num_tokens,
                                   k3_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1

    logp, old_logp, advantages, ref_logp: (N, L) float; loss_mask (N, L) bool, True exactly for
    tokens the policy sampled in turns that take part (False for trajectories left out of the
    statistics); n_i = trained tokens of row i. num_tokens defaults to the mask's count and
    num_seqs to the rows with a trained token; pass the global counts under gradient
    accumulation or data parallelism so the micro-batch losses sum to the full-batch loss.
    The min is written as an explicit choice of the clipped branch (where PPO clips: A > 0 and
    ratio > 1 + clip_high, or A < 0 and ratio < 1 - clip_low), which has the same value and a
    well-defined gradient on the boundary. Returns (loss, stats): loss a scalar in at least
    float32; stats a dict of detached scalars over this call's trained tokens: clip_frac,
    approx_kl (k3 of old vs new), ratio_mean, and kl_ref when ref_logp is given.
    """
    assert logp.dim() == 2, f"logp must be (N, L), got {tuple(logp.shape)}"
    for name, t in (("old_logp", old_logp), ("advantages", advantages), ("loss_mask", loss_mask)):
        assert t.shape == logp.shape, f"{name} {tuple(t.shape)} != logp {tuple(logp.shape)}"
    assert loss_mask.dtype == torch.bool, f"loss_mask must be bool, got {loss_mask.dtype}"
    assert agg in AGGREGATIONS, f"agg must be one of {AGGREGATIONS}, got {agg!r}"
    assert 0 <= clip_low < 1 and clip_high >= 0, f"bad clip range ({clip_low}, {clip_high})"
    assert kl_coef == 0 or ref_logp is not None, "kl_coef > 0 needs ref_logp"
    dtype = _compute_dtype(logp)
    # Untrained positions may hold anything (-inf log-probs of padding): keep them out of exp.
    log_ratio = torch.where(loss_mask, logp.to(dtype) - old_logp.to(dtype), 0.0)  # (N, L)
    ratio = torch.exp(log_ratio)
    adv = torch.where(loss_mask, advantages.to(dtype), 0.0)
    clipped = ((adv > 0) & (ratio > 1 + clip_high)) | ((adv < 0) & (ratio < 1 - clip_low))
    surrogate = torch.where(clipped, ratio.clamp(1 - clip_low, 1 + clip_high) * adv, ratio * adv)
    token_loss = torch.where(loss_mask, -surrogate, 0.0)  # (N, L)

    if num_tokens is None:
        num_tokens = loss_mask.sum()
    if agg == "token-mean":
        loss = _per_count(token_loss.sum(), num_tokens)
    else:
        tokens_per_seq = loss_mask.sum(dim=1)  # (N,)
        if num_seqs is None:
            num_seqs = (tokens_per_seq > 0).sum()
        if agg == "seq-mean-token-mean":
            seq_loss = token_loss.sum(dim=1) / tokens_per_seq.clamp(min=1)  # (N,)
        else:
            seq_loss = token_loss.sum(dim=1) / logp.shape[1]  # (N,)
        loss = _per_count(seq_loss.sum(), num_seqs)

    n_local = loss_mask.sum().clamp(min=1).to(dtype)
    stats = {
        "clip_frac": (clipped & loss_mask).sum().to(dtype) / n_local,
        "approx_kl": ((ratio - 1) - log_ratio).sum() / n_local,
        "ratio_mean": torch.where(loss_mask, ratio, 0.0).sum() / n_local,
    }
    if ref_logp is not None:
        assert ref_logp.shape == logp.shape, f"ref_logp {tuple(ref_logp.shape)} != logp"
        ref_log_ratio = torch.where(loss_mask, ref_logp.to(dtype) - logp.to(dtype), 0.0)
        k3 = torch.exp(ref_log_ratio) - ref_log_ratio - 1  # (N, L), 0 where untrained
        loss = loss + kl_coef * _per_count(k3.sum(), num_tokens)
        stats["kl_ref"] = k3.sum() / n_local
    return loss, {k: v.detach() for k, v in stats.items()}
