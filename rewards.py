"""Rewards: GTPO's turn rewards and their shaping, and GRPO's trajectory reward.

The steps of the method this file implements, in the paper's numbering (the one numbering of
the project, as in gtpo.py's module docstring; steps 2, the advantages, and 4, the objective,
are gtpo.py's):

    1. turn-level rewards   r_ij = r_acc_ij + r_fmt_ij, an (N, K) matrix    turn_reward_matrix
                            r_fmt_ij: FORMAT_PENALTY on a turn with an      turn_format_penalties
                            invalid tool call, and (the paper's rule) on a
                            first turn without one; r_acc_ij: the outcome
                            reward on the last turn, 0 on every other
    3. self-supervised shaping
                            a failed trajectory in a group with a correct   shape_outcomes
                            one gets alpha * the mean cosine similarity of  trajectory_code
                            its code to the correct ones' code as its       the embedders:
                            outcome reward; computed before step 1's        make_embedder
                            matrix is built, since it sets r_acc on the
                            last turn
    GRPO, the baseline      one reward per trajectory: its outcome score    grpo_rewards
                            when no turn has a format error, else 0         (gtpo.grpo_advantages)

The outcome score (r_acc before shaping) is 1 or 0 from the built-in grader (grading.py), or a
score in [0, 1] from a reward plug-in (--reward_fn): outcome_scores, load_reward_fn. A training
step calls score: outcome_scores, then shape_outcomes, then turn_reward_matrix, then step 2's
advantages (gtpo.py) over every rank's rows, then the masks of the rows the loss takes.

Shapes: N trajectories, K max turns, D embedding width.
"""

import contextlib
import importlib
import importlib.util
import numbers
import os
from dataclasses import dataclass

import torch

import grading
import gtpo
import parallel
import rollout

FORMAT_PENALTY = -0.1


# ---------------------------------------------------------------- step 1: turn-level rewards


def turn_format_penalties(turns, penalty=FORMAT_PENALTY, runtime_errors=False, first_call=True):
    """Per turn: `penalty` for an invalid tool call (unterminated fence, empty code, code that does
    not parse), and with first_call (the paper's rule) on turn 1 also for making no tool call at
    all. A call whose code raises when run is feedback, not a format error, unless runtime_errors."""
    penalties = []
    for j, turn in enumerate(turns):
        invalid = turn.valid_call is False
        if runtime_errors and turn.result is not None and not turn.result.ok:
            invalid = True
        no_call_first = first_call and j == 0 and turn.code is None
        penalties.append(penalty if invalid or no_call_first else 0.0)
    return penalties


def void_turn(turn):
    """SimpleTIR's void turn: one that neither calls the tool (a closed ```python block, run) nor
    gives a final answer (\\boxed): the mark of a multi-turn policy that has stopped using both."""
    return turn.result is None and "\\boxed" not in turn.text


def turn_reward_matrix(trajs, outcomes, max_turns, penalty=FORMAT_PENALTY, first_call=True):
    """GTPO's turn rewards r_ij = r_acc_ij + r_fmt_ij: (rewards (N, K), turn_mask (N, K)).

    outcomes (N,) float: r_acc of each trajectory's last turn (1 if correct, the shaped partial
    credit or 0 otherwise); every other turn's r_acc is 0. turn_mask is True for turns that exist.
    """
    N = len(trajs)
    rewards = torch.zeros(N, max_turns)  # (N, K)
    turn_mask = torch.zeros(N, max_turns, dtype=torch.bool)  # (N, K)
    for i, traj in enumerate(trajs):
        T = len(traj.turns)
        assert 1 <= T <= max_turns, f"trajectory {i} has {T} turns, max_turns is {max_turns}"
        turn_mask[i, :T] = True
        rewards[i, :T] = torch.tensor(turn_format_penalties(traj.turns, penalty, first_call=first_call))
        rewards[i, T - 1] += float(outcomes[i])
    return rewards, turn_mask


# ---------------------------------------------------------------- GRPO's trajectory reward


def grpo_rewards(trajs, scores, first_call=True):
    """GRPO's trajectory reward: the outcome score (1 iff correct with the built-in grader) when no
    turn has a format error, else 0. (N,)"""
    clean = [not any(turn_format_penalties(t.turns, -1.0, first_call=first_call)) for t in trajs]
    return scores.float() * torch.tensor(clean)


# ---------------------------------------------------------------- step 3: self-supervised shaping


def shape_outcomes(correct, code_embeddings, group_index, alpha=0.5):
    """GTPO's self-supervised shaping of the outcome reward. (N,)

        correct trajectory i:                    1
        failed i, its group has correct ones,
        and i has code (a non-zero embedding):   alpha * mean_{p correct in group} max(cos(e_i, e_p), 0)
        otherwise:                               0

    correct (N,) bool; code_embeddings (N, D) float, a zero row for a trajectory without code;
    group_index (N,) long. Cosines are computed in float64 and clipped to [0, 1].
    """
    assert correct.dtype == torch.bool and correct.dim() == 1, "correct must be (N,) bool"
    assert code_embeddings.dim() == 2 and code_embeddings.shape[0] == correct.shape[0], "embeddings must be (N, D)"
    e = code_embeddings.double()
    norms2 = (e * e).sum(dim=1)  # (N,)
    has_code = norms2 > 0
    dots = e @ e.T  # (N, N)
    cos = (dots / (norms2[:, None] * norms2[None, :]).sqrt().clamp(min=1e-300)).clamp(0.0, 1.0)  # (N, N)
    reference = (group_index[:, None] == group_index[None, :]) & correct[None, :]  # (N, N) p correct, same group
    count = reference.sum(dim=1)  # (N,)
    mean_cos = (cos * reference).sum(dim=1) / count.clamp(min=1)
    shaped = torch.where(~correct & (count > 0) & has_code, alpha * mean_cos, 0.0)
    return torch.where(correct, 1.0, shaped).float()


def trajectory_code(traj):
    """The concatenated code of all turns (what shaping compares)."""
    return "\n".join(t.code for t in traj.turns if t.code)


class TokenCountEmbedder:
    """Cosine of token-count vectors from the policy's tokenizer: no extra model. Vectors are
    counts over the distinct token ids of the batch, so D stays small."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts):
        ids = [self.tokenizer.encode(t, add_special_tokens=False) if t else [] for t in texts]
        vocab = {tok: k for k, tok in enumerate(sorted({tok for row in ids for tok in row}))}
        counts = torch.zeros(len(texts), max(len(vocab), 1), dtype=torch.float64)  # (N, D)
        for i, row in enumerate(ids):
            for tok in row:
                counts[i, vocab[tok]] += 1
        return counts


class MeanPooledEmbedder:
    """Mean-pooled last hidden states of a Hugging Face encoder (or of the policy itself),
    batched, with a cache by text that new_step() clears."""

    def __init__(self, encoder, tokenizer, batch_size=32, max_length=512, gathered=contextlib.nullcontext):
        self.encoder, self.tokenizer, self.gathered = encoder, tokenizer, gathered  # gathered(): a context
        self.batch_size, self.max_length = batch_size, max_length
        self.cache = {}

    def new_step(self):
        self.cache.clear()

    @torch.no_grad()
    def _embed(self, texts):
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(self.encoder.device) for k, v in batch.items()}
        base = getattr(self.encoder, "model", self.encoder)  # a causal LM's body, or the encoder
        hidden = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return ((hidden * weights).sum(1) / weights.sum(1).clamp(min=1)).double().cpu()  # (B, H)

    def __call__(self, texts):
        todo = sorted({t for t in texts if t and t not in self.cache})
        # Entered once per call on every rank, whatever its texts: under FSDP2 gathering is a
        # collective, and ranks with different numbers of chunks would wait on each other.
        with self.gathered():  # the policy's parameters whole, where FSDP2 shards them
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                for text, vector in zip(chunk, self._embed(chunk)):
                    self.cache[text] = vector
        width = next(iter(self.cache.values())).shape[0] if self.cache else 1
        zero = torch.zeros(width, dtype=torch.float64)
        return torch.stack([self.cache[t] if t else zero for t in texts])  # (N, H)


def make_embedder(spec, tokenizer=None, policy=None, gathered=contextlib.nullcontext):
    """'tokens' (the default: free, and it measures what the paper's shaping rewards — shared
    code — without a second model), 'hf:<path>' (a local Hugging Face encoder), or 'policy'
    (run inside gathered(), which makes its parameters whole)."""
    if spec == "tokens":
        return TokenCountEmbedder(tokenizer)
    if spec == "policy":
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return MeanPooledEmbedder(policy, tokenizer, gathered=gathered)
    if spec.startswith("hf:"):
        from transformers import AutoModel, AutoTokenizer

        path = spec[3:]
        return MeanPooledEmbedder(AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path))
    raise ValueError(f"unknown embedder {spec!r}: use 'tokens', 'policy' or 'hf:<path>'")


# ---------------------------------------------------------------- the outcome: grader or plug-in


def answer_record(traj, **per_turn):
    """rollout.trajectory_record(traj, **per_turn) plus the "answer" extract_answer finds: one
    record for the reward plug-in, eval.py's reports and train.py's sample dumps alike."""
    return {**rollout.trajectory_record(traj, **per_turn), "answer": grading.extract_answer(traj.final_text)}


def outcome_scores(trajs, rows, grader=None, reward_fn=None):
    """(N,) float in [0, 1]: 1 or 0 from the built-in grader against row["answer"], or
    reward_fn(record, row) with record = rollout.trajectory_record(traj) plus its "answer" (what
    extract_answer finds) and "final_text"; True/False count as 1/0."""
    if reward_fn is None:
        return grading.grade(trajs, [row["answer"] for row in rows], grader).float()
    scores = []
    for traj, row in zip(trajs, rows, strict=True):
        record = {**answer_record(traj), "final_text": traj.final_text}
        value = reward_fn(record, row)
        if isinstance(value, numbers.Real) and 0 <= value <= 1:  # bool is a Real; NaN fails the test
            scores.append(float(value))
        else:
            name = getattr(reward_fn, "__name__", reward_fn)
            raise RewardFnError(
                f"--reward_fn {name} returned {value!r} for problem {row.get('id', row['problem'][:40])!r}: "
                "expected True/False or a number in [0, 1]"
            )
    return torch.tensor(scores)


class RewardFnError(ValueError):
    """A --reward_fn that cannot be loaded, or that returned something other than a score."""


def load_reward_fn(spec):
    """The function named by "path/to/file.py:function" or "package.module:function"; None for
    "none" or "" (the built-in grader)."""
    if spec in ("", "none"):
        return None
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise RewardFnError(f"--reward_fn {spec!r}: expected 'file.py:function' or 'module:function'")
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise RewardFnError(f"--reward_fn {spec!r}: no such file {where}")
            loader = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(where))[0], where)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except RewardFnError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's module failed to import: say which and why
        raise RewardFnError(f"--reward_fn {spec!r}: importing {where} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardFnError(f"--reward_fn {spec!r}: {where} has no function {name!r}")
    return fn


# ---------------------------------------------------------------- steps 1-3 on a batch, and the rows the loss takes


@dataclass
class Scored:
    """Rewards and advantages of this rank's N trajectories."""

    scores: torch.Tensor  # (N,) in [0, 1]: the grader's 0/1, or --reward_fn's score
    correct: torch.Tensor  # (N,) bool: score 1
    outcomes: torch.Tensor  # (N,) r_acc of the last turn: the score, or step 3's credit if higher
    infra: torch.Tensor  # (N,) bool: a sandbox failure, left out of statistics and loss
    format_errors: torch.Tensor  # (N,) bool
    turn_rewards: torch.Tensor  # (N, K) r_ij, step 1
    returns: torch.Tensor  # (N, K) R_ij, step 2 (GRPO: its one reward on every turn)
    turn_advantages: torch.Tensor  # (N, K) A_ij, step 2
    total_reward: torch.Tensor  # (N,)
    truncated: torch.Tensor  # (N,) bool: stopped at a token limit
    void: torch.Tensor  # (N,) bool: has a turn that neither calls the tool nor answers (void_turn)
    masked: torch.Tensor  # (N,) bool: left out of the loss by --mask_truncated or --mask_void_turns
    trained: torch.Tensor  # (N,) bool: in a group with a non-zero advantage, not masked, no sandbox failure
    counted: torch.Tensor  # (N,) bool: rows whose sampled tokens the loss divides by


def score(trajs, rows, group_index, *, cfg, derived, world, grader, embedder=None, reward_fn=None, scores=None):
    """Steps 1-3 on this rank's trajectories (rows: each one's problem row, graded by the grader
    or by reward_fn unless their scores are given; embedder: step 3's), then which rows the loss
    takes (loss_rows)."""
    if scores is None:
        scores = outcome_scores(trajs, rows, grader=grader, reward_fn=reward_fn)  # (N,) in [0, 1]
    correct = scores >= 1  # (N,)
    infra = torch.tensor([any(t.result is not None and t.result.infra_error for t in tr.turns) for tr in trajs])
    outcomes = scores  # (N,)
    if derived.shaped:  # step 3
        code = lambda t: trajectory_code(t) if cfg.shaping == "code" else "".join(u.text for u in t.turns)
        shaped = shape_outcomes(correct, embedder([code(t) for t in trajs]), group_index, alpha=cfg.alpha)
        outcomes = torch.maximum(scores, shaped)  # a partial score from reward_fn is kept if higher
    first_call = cfg.first_turn_tool_call
    turn_rewards, turn_mask = turn_reward_matrix(
        trajs, outcomes, cfg.max_turns, penalty=cfg.format_penalty, first_call=first_call
    )  # (N, K), step 1
    returns, turn_advantages, total_reward = advantages(
        trajs, scores, turn_rewards, turn_mask=turn_mask, infra=infra, group_index=group_index, cfg=cfg, world=world
    )
    truncated, void, masked, trained, counted = loss_rows(trajs, turn_advantages, group_index, infra=infra, cfg=cfg)
    format_errors = torch.tensor([any(turn_format_penalties(t.turns, first_call=first_call)) for t in trajs])
    return Scored(
        scores=scores,
        correct=correct,
        outcomes=outcomes,
        infra=infra,
        format_errors=format_errors,
        turn_rewards=turn_rewards,
        returns=returns,
        turn_advantages=turn_advantages,
        total_reward=total_reward,
        truncated=truncated,
        void=void,
        masked=masked,
        trained=trained,
        counted=counted,
    )


def advantages(trajs, scores, turn_rewards, *, turn_mask, infra, group_index, cfg, world):
    """Step 2: (returns (N, K), turn advantages (N, K), total reward (N,)). GTPO: discounted
    returns normalised over cfg.adv_norm's set; GRPO: one reward per trajectory normalised in its
    group, on every turn. Normalisation sees every rank's rows (so "batch" is exact); sandbox
    failures stay out of the statistics."""
    mine = slice(world.rank * len(trajs), (world.rank + 1) * len(trajs))  # this rank's rows of everyone's
    if cfg.algo == "gtpo":
        returns = gtpo.discounted_returns(turn_rewards, turn_mask, cfg.gamma)  # (N, K)
        take_part = turn_mask & ~infra[:, None]  # (N, K)
        everyone = [parallel.all_gather_rows(t, world) for t in (returns, take_part, group_index)]
        return returns, gtpo.normalize(*everyone, mode=cfg.adv_norm)[mine], turn_rewards.sum(dim=1)
    total_reward = grpo_rewards(trajs, scores, first_call=cfg.first_turn_tool_call)  # (N,)
    returns = total_reward[:, None] * turn_mask  # (N, K) one reward, on every turn (for display)
    reward, kept, groups = [parallel.all_gather_rows(t, world) for t in (total_reward, ~infra, group_index)]
    turn_advantages = gtpo.grpo_advantages(reward, groups, mask=kept)[mine][:, None] * turn_mask  # (N, K)
    return returns, turn_advantages, total_reward


def loss_rows(trajs, turn_advantages, group_index, *, infra, cfg):
    """The masks of which rows the loss takes, all (N,) bool: (truncated: stopped at a token
    limit; void: a turn that neither calls the tool nor answers; masked: left out of the loss by
    --mask_truncated or --mask_void_turns, still in the statistics; trained: in a group with a
    non-zero advantage, not masked, no sandbox failure; counted: the rows whose sampled tokens
    the loss divides by, every row but sandbox failures and masked ones, or the trained rows with
    --loss_denominator signal)."""
    signal = (turn_advantages != 0).any(dim=1)  # (N,)
    groups = int(group_index.max()) + 1
    live_group = torch.zeros(groups, dtype=torch.bool).index_put_((group_index,), signal, accumulate=True)
    truncated = torch.tensor([t.stop_reason == "max_length" for t in trajs])
    void = torch.tensor([any(map(void_turn, t.turns)) for t in trajs])
    masked = (truncated & cfg.mask_truncated) | (void & cfg.mask_void_turns)
    trained = live_group[group_index] & ~infra & ~masked
    counted = trained if cfg.loss_denominator == "signal" else ~infra & ~masked
    return truncated, void, masked, trained, counted
