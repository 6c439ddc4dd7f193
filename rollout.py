"""Multi-turn tool-use rollouts built on model.generate: token in, token out.

A trajectory is prompt + turn 1 + observation 1 + turn 2 + ... . Each turn is sampled with
`model.generate` until the code block it opened is closed (``` after ```python), or EOS, or a
length limit; the code runs in the trajectory's sandbox session, and the sandbox's output goes
back inline as an ```output block, tokenised once. Sampled token ids are kept exactly as
sampled and never re-tokenised, so `loss_mask` (True exactly for sampled tokens) and
`token_turn` (the 0-based turn of each sampled token, -1 elsewhere) are the generator's own record.

All unfinished rows of a batch (RolloutConfig.batch_size prompts) sample their next turn in one
generate call (left-padded); each row samples from its own seeded stream (SeededSampler), so
the batch size changes memory and speed, not the trajectories. With kv_reuse (the
default), a turn continues from the previous turn's KV cache: only the observation tokens are
encoded, appended after the cached rows with masked padding between (positions follow the
attention mask, so the gaps do not shift them); without it, each turn re-encodes every row's
whole history. `bench.py rollout` measures both. Sandbox calls of a turn run concurrently; a
trajectory's session is a prewarmed spare of the pool if there is one, else it starts (in a few
milliseconds) at its first call, so a trajectory that never calls the tool costs no sandbox.

Shapes: B rows in a generation batch, W their padded width, V vocabulary size.
"""

import ast
import hashlib
import math
import re
from dataclasses import dataclass, field

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TopPLogitsWarper,
)

import sandbox

# A call opens with ```python (or ```py, ```python3, any case) and closes with ``` at the start of
# a line, so a ``` inside the code (print("```")) does not end it.
CODE_BLOCK = re.compile(r"```(?:python3?|py)[ \t]*\n((?:.*?\n)?)```", re.DOTALL | re.IGNORECASE)
OPENING = re.compile(r"```(?:python3?|py)[ \t]*\n", re.IGNORECASE)
STOP_REASONS = ("answer", "no_answer", "max_turns", "max_length")


@dataclass
class RolloutConfig:
    max_turns: int = 4  # turns (model messages) per trajectory
    max_turn_tokens: int = 512  # tokens sampled per turn at most
    max_total_tokens: int = 2048  # prompt + turns + observations, per trajectory
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling; 1.0 samples from the full distribution
    record_logprobs: bool = False  # keep the sampler's own log-probs (memory: a (B, V) per step)
    batch_size: int = 0  # trajectories generated at once (0: all); bounds the KV cache
    kv_reuse: bool = True  # continue each turn from the previous turn's KV cache (see bench.py rollout)
    prewarm_next: bool = False  # at the end, start as many sandboxes as this rollout used, for the next one

    @classmethod
    def of(cls, flags, *, temperature, prewarm_next=False):
        """The settings of train.py's or eval.py's flags (config.py), sampling at temperature."""
        return cls(
            prewarm_next=prewarm_next,
            max_turns=flags.max_turns,
            max_turn_tokens=flags.max_turn_tokens,
            max_total_tokens=flags.max_total_tokens,
            temperature=temperature,
            top_p=flags.top_p,
            batch_size=flags.rollout_batch_size,
        )


@dataclass
class Turn:
    text: str  # the sampled text of the turn
    code: str | None = None  # the code of its tool call; None when the turn made no call
    valid_call: bool | None = None  # None: no call; False: unterminated, empty or unparsable
    result: sandbox.Result | None = None  # what the sandbox returned
    observation: str = ""  # the text appended after the turn (the ```output block)


@dataclass
class Trajectory:
    prompt_len: int
    input_ids: list[int]  # prompt + sampled + observation + ...
    loss_mask: list[bool]  # True exactly for tokens the policy sampled
    token_turn: list[int]  # 0-based turn of each sampled token, -1 elsewhere
    sample_logp: list[float] = field(default_factory=list)  # sampler's log-probs (if recorded)
    turns: list[Turn] = field(default_factory=list)
    stop_reason: str | None = None  # one of STOP_REASONS once finished

    @property
    def final_text(self):
        """The last turn's text (where a final answer is looked for)."""
        return self.turns[-1].text if self.turns else ""

    @classmethod
    def start(cls, prompt_ids):
        """A trajectory holding only its prompt (never trained)."""
        n = len(prompt_ids)
        return cls(n, list(prompt_ids), [False] * n, [-1] * n, [0.0] * n)

    def extend(self, ids, sampled, turn, logps=None):
        self.input_ids += ids
        self.loss_mask += [sampled] * len(ids)
        self.token_turn += [turn if sampled else -1] * len(ids)
        self.sample_logp += logps if logps is not None else [0.0] * len(ids)


def parse_turn(text, closed_by_fence):
    """The turn's tool call: (code, valid). A call is the first ```python block; it is invalid
    when unterminated, empty, or not valid Python syntax."""
    match = CODE_BLOCK.search(text)
    if closed_by_fence and match:
        code = match.group(1)
        try:
            ast.parse(code)
            parses = True
        except (SyntaxError, ValueError):  # ValueError: a NUL byte in the code
            parses = False
        return code, bool(code.strip()) and parses
    if OPENING.search(text):
        return OPENING.split(text, maxsplit=1)[1], False  # opened, never closed
    return None, None


class CodeBlockStop(StoppingCriteria):
    """Stops a row once its new text closes a ```python block (a plain stop string cannot: the
    closing fence ``` is a prefix of the opening one). Records the length at which each row stopped."""

    def __init__(self, tokenizer, prompt_width, batch_size, device):
        self.tokenizer, self.prompt_width = tokenizer, prompt_width
        self.stopped_at = [None] * batch_size  # new tokens up to and including the closing fence
        self.has_backtick = _backtick_tokens(tokenizer).to(device)  # (V,) only these can close a block

    def __call__(self, input_ids, scores, **kwargs):
        new = input_ids[:, self.prompt_width :]  # (B, steps)
        candidates = self.has_backtick[new[:, -1]].nonzero().flatten().tolist()  # one sync per step
        for row in candidates:
            if self.stopped_at[row] is None and CODE_BLOCK.search(self.tokenizer.decode(new[row])):
                self.stopped_at[row] = new.shape[1]
        return torch.tensor([s is not None for s in self.stopped_at], device=input_ids.device)


_backtick_cache = {}


def _backtick_tokens(tokenizer):
    """(V,) bool: which token ids contain a backtick (byte-level tokens spell it as itself)."""
    key = (id(tokenizer), len(tokenizer))
    if key not in _backtick_cache:
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        _backtick_cache[key] = torch.tensor(["`" in (t or "") for t in tokens])
    return _backtick_cache[key]


def left_pad(segments, pad):
    """(ids, mask) (B, W): each list of token ids right-aligned, padding masked out."""
    B, W = len(segments), max(map(len, segments))
    ids = torch.full((B, W), pad, dtype=torch.long)
    mask = torch.zeros(B, W, dtype=torch.long)
    for row, segment in enumerate(segments):
        if segment:
            ids[row, W - len(segment) :] = torch.tensor(segment)
            mask[row, W - len(segment) :] = 1
    return ids, mask


def sampling_config(cfg, **settings):
    """A GenerationConfig that takes the argmax of the scores the logits processors leave, plus
    `settings`. Sampling is SeededSampler's (a processor), so every other setting is explicit and
    neutral: a None would be filled from the checkpoint's generation_config (Qwen2.5: top_k=20,
    repetition_penalty=1.05), and the tokens would come from another distribution than the one
    the loss assumes.
    """
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        temperature=1.0,
        top_p=1.0,
        top_k=None,
        min_p=None,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        **settings,
    )


def row_seed(seed, position):
    """The seed of a row's draw at a sequence position: a linear mix, below 2**63. (The CPU
    generator keeps its low 32 bits, so two draws of a step share their noise with probability
    about 2**-32: harmless for sampling, not a cryptographic stream.)"""
    return (seed * 6364136223846793005 + position * 1442695040888963407 + 1) % (2**63)


class SeededSampler(LogitsProcessor):
    """Samples each row from softmax(logits / temperature), cut to the top_p nucleus, with its own
    random stream, by the Gumbel-max trick: argmax(scores + g), g = -log(-log(u)), u ~ U(0, 1)
    per vocabulary entry, is a sample of softmax(scores). The u of a row at sequence position t
    come from a generator seeded with (the row's seed, t), so a row's tokens do not depend on
    which rows share its batch, how many there are, or how long the others run (rollouts are the
    same whatever RolloutConfig.batch_size or the number of ranks, up to float rounding of the
    batched forward)."""

    def __init__(self, seeds, *, real_lengths, prompt_width, temperature, top_p):
        assert len(seeds) == len(real_lengths), f"{len(seeds)} seeds for {len(real_lengths)} rows"
        self.seeds, self.real_lengths, self.prompt_width = seeds, real_lengths, prompt_width
        self.temperature, self.top_p = temperature, TopPLogitsWarper(top_p) if top_p < 1 else None

    def __call__(self, input_ids, scores):
        scores = scores.float() / self.temperature  # (B, V)
        if self.top_p is not None:
            scores = self.top_p(input_ids, scores)
        step = input_ids.shape[1] - self.prompt_width
        gumbel = torch.empty_like(scores)
        for row, (seed, length) in enumerate(zip(self.seeds, self.real_lengths, strict=True)):
            g = torch.Generator(scores.device).manual_seed(row_seed(seed, length + step))
            gumbel[row] = torch.rand(scores.shape[1], generator=g, device=scores.device)
        return scores - torch.log(-torch.log(gumbel))  # u = 0 gives -inf: never picked


class KnownTokens(LogitsProcessor):
    """No id the tokenizer lacks is ever chosen: Qwen2.5's head has more rows (151,936 or 152,064)
    than its tokenizer has entries (151,665), and a row beyond them, sampled or greedy, would be
    an id nothing can decode (token_logprobs leaves them out of the softmax alike)."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def __call__(self, input_ids, scores):
        if scores.shape[1] == self.vocab_size:
            return scores
        return scores.index_fill(1, torch.arange(self.vocab_size, scores.shape[1], device=scores.device), -math.inf)


def generate_turn(model, tokenizer, input_ids, attention_mask, budgets, cfg, cache=None, seeds=None):
    """Sample one turn for each row of a left-padded batch (B, W), continuing from `cache` (the
    KV cache of all but the last of those W positions) when given; seeds: one per row (ignored
    when greedy).

    Returns (rows, state): rows[b] = (ids, stop, logps) with stop in {"fence", "eos", "length"}
    and ids exactly the sampled tokens, padding removed; state = (sequences, mask, cache) to
    continue from, where mask is 0 on padding and on anything generated after a row's stop.
    """
    B, W = input_ids.shape
    pad = tokenizer.pad_token_id
    eos_ids = sorted({tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")} - {None})
    stop = CodeBlockStop(tokenizer, W, B, model.device)
    greedy = cfg.temperature == 0
    processors = [KnownTokens(len(tokenizer))]
    if not greedy:
        processors.append(
            SeededSampler(
                seeds,
                real_lengths=attention_mask.sum(dim=1).tolist(),
                prompt_width=W,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
            )
        )
    generation = sampling_config(
        cfg,
        max_new_tokens=max(budgets),
        eos_token_id=eos_ids,
        pad_token_id=pad,
        return_dict_in_generate=True,
        output_logits=cfg.record_logprobs,
    )
    # synced_gpus=False: ranks generate different numbers of turns and steps, so none may wait for
    # the others. (transformers turns the sync on for FSDP-managed models; ours have their
    # parameters gathered for the whole rollout, see train.full_parameters.)
    out = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        cache=cache,
        generation_config=generation,
        stopping_criteria=StoppingCriteriaList([stop]),
        logits_processor=LogitsProcessorList(processors),
        synced_gpus=False,
    )
    new = out.sequences[:, W:].tolist()  # (B, steps)
    mask = torch.cat([attention_mask, torch.ones(B, len(new[0]), dtype=torch.long)], dim=1)  # (B, W + steps)
    rows = []
    for row in range(B):
        ids = new[row]
        eos_at = next((k for k, t in enumerate(ids) if t in eos_ids), None)
        cuts = {"eos": eos_at + 1 if eos_at is not None else None, "fence": stop.stopped_at[row], "length": len(ids)}
        reason = min((k for k in cuts if cuts[k] is not None), key=lambda k: cuts[k])
        cut = cuts[reason]
        if cut > budgets[row]:
            cut, reason = budgets[row], "length"
        mask[row, W + cut :] = 0  # what generate produced after the stop is padding
        logps = None
        if cfg.record_logprobs:
            temperature = 1.0 if greedy else cfg.temperature
            logps = [
                float((out.logits[k][row, : len(tokenizer)].float() / temperature).log_softmax(-1)[ids[k]])
                for k in range(cut)
            ]
        rows.append((ids[:cut], reason, logps))
    return rows, (out.sequences.cpu(), mask, out.cache)


def observation_text(turn_text, result, max_chars=4096):
    """The ```output block appended after a tool call: stdout then stderr, head and tail kept."""
    out = (result.stdout + result.stderr).rstrip("\n")
    if len(out) > max_chars:
        out = out[: max_chars // 2] + "\n[...]\n" + out[-max_chars // 2 :]
    return ("" if turn_text.endswith("\n") else "\n") + f"```output\n{out}\n```\n"


def rollout_seeds(seed, step, first, count):
    """The sampling seeds of the trajectories at global positions [first, first + count) of a
    training run's data stream in RL step `step`: a trajectory's tokens depend on (seed, step,
    position), not on the rank or the generation batch it lands in."""

    def digest(i):
        return hashlib.blake2b(f"{seed}/{step}/{i}".encode(), digest_size=8).digest()

    return [int.from_bytes(digest(i), "little") >> 1 for i in range(first, first + count)]


def rollout(model, tokenizer, prompts, pool, cfg, seeds=None):
    """Run every prompt (a list of token ids) to the end: a final answer, no answer, max_turns or
    max_total_tokens, cfg.batch_size prompts at a time (all at once when 0). Each trajectory gets
    its own sandbox session from pool and, when sampling, its own random stream: seeds holds one
    int per prompt (drawn from torch's global RNG when None), so the result does not depend on
    the batch size (see SeededSampler). Returns trajectories in prompt order."""
    for k, p in enumerate(prompts):
        if len(p) >= cfg.max_total_tokens:
            raise ValueError(f"prompt {k} has {len(p)} tokens; max_total_tokens is {cfg.max_total_tokens}")
    if seeds is None:
        seeds = torch.randint(2**62, (len(prompts),)).tolist() if cfg.temperature > 0 else [0] * len(prompts)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    size = cfg.batch_size or max(len(prompts), 1)
    trajs = []
    for s in range(0, len(prompts), size):
        trajs += rollout_batch(model, tokenizer, prompts[s : s + size], pool=pool, cfg=cfg, seeds=seeds[s : s + size])
    if cfg.prewarm_next:
        pool.prewarm(sum(any(turn.result is not None for turn in t.turns) for t in trajs))
    return trajs


def rollout_batch(model, tokenizer, prompts, *, pool, cfg, seeds):
    """rollout() of prompts generated together, all unfinished rows in one generate call per turn."""
    trajs = [Trajectory.start(p) for p in prompts]
    sessions = [pool.session() for _ in prompts]  # started by their first call, unless prewarmed
    pending = {}  # trajectory -> observation tokens to feed before its next turn
    state, state_rows = None, []  # what the previous generate left, when reusing its KV cache
    try:
        for turn in range(cfg.max_turns):
            active = [i for i, t in enumerate(trajs) if t.stop_reason is None]
            if not active:
                break
            budgets = [min(cfg.max_turn_tokens, cfg.max_total_tokens - len(trajs[i].input_ids)) for i in active]
            if state is None:  # encode every row's whole history
                input_ids, attention_mask = left_pad([trajs[i].input_ids for i in active], tokenizer.pad_token_id)
                cache = None
            else:  # continue the cached rows: append only their observations
                sequences, mask, cache = state
                keep = torch.tensor([state_rows.index(i) for i in active])
                if len(keep) < len(state_rows):
                    cache.batch_select_indices(keep.to(model.device))
                new_ids, new_mask = left_pad([pending[i] for i in active], tokenizer.pad_token_id)
                input_ids = torch.cat([sequences[keep], new_ids], dim=1)
                attention_mask = torch.cat([mask[keep], new_mask], dim=1)
            sampled, state = generate_turn(
                model, tokenizer, input_ids, attention_mask, budgets, cfg, cache, seeds=[seeds[i] for i in active]
            )
            state, state_rows = (state, active) if cfg.kv_reuse else (None, [])
            calls = []
            for i, (ids, reason, logps) in zip(active, sampled):
                text = tokenizer.decode(ids)
                trajs[i].extend(ids, True, turn, logps)
                code, valid = parse_turn(text, reason == "fence")
                trajs[i].turns.append(Turn(text, code, valid))
                if reason == "fence":
                    calls.append(i)
                elif reason == "eos":
                    trajs[i].stop_reason = "answer" if "\\boxed" in text else "no_answer"
                else:
                    trajs[i].stop_reason = "max_length"
            results = pool.run([sessions[i] for i in calls], [trajs[i].turns[-1].code for i in calls])
            for i, result in zip(calls, results):
                last = trajs[i].turns[-1]
                last.result, last.observation = result, observation_text(last.text, result)
                pending[i] = tokenizer.encode(last.observation, add_special_tokens=False)
                if turn + 1 == cfg.max_turns:
                    trajs[i].stop_reason = "max_turns"
                elif len(trajs[i].input_ids) + len(pending[i]) >= cfg.max_total_tokens:
                    trajs[i].stop_reason = "max_length"
                else:
                    trajs[i].extend(pending[i], False, turn)
    finally:
        for s in sessions:
            s.close()
    return trajs


def collate(trajs, pad):
    """Right-padded batch tensors of trajectories: input_ids, attention_mask, loss_mask and
    token_turn, each (N, L); padding is masked and has turn -1."""
    L = max(len(t.input_ids) for t in trajs)
    fill = [L - len(t.input_ids) for t in trajs]
    return {
        "input_ids": torch.tensor([t.input_ids + [pad] * f for t, f in zip(trajs, fill)]),
        "attention_mask": torch.tensor([[1] * len(t.input_ids) + [0] * f for t, f in zip(trajs, fill)]),
        "loss_mask": torch.tensor([t.loss_mask + [False] * f for t, f in zip(trajs, fill)]),
        "token_turn": torch.tensor([t.token_turn + [-1] * f for t, f in zip(trajs, fill)]),
    }


def teacher_trajectory(tokenizer, prompt_ids, turn_texts, session, end="<|im_end|>"):
    """A trajectory whose turns are given as text (for SFT and tests): the same record and the
    same observations as a rollout, the code of each turn run in session. The last turn ends
    with `end` (the end-of-message token) unless it ends with a tool call."""
    traj = Trajectory.start(prompt_ids)
    for turn, text in enumerate(turn_texts):
        closed = CODE_BLOCK.search(text) is not None
        last = turn == len(turn_texts) - 1
        if last and not closed:
            text += end
        traj.extend(tokenizer.encode(text, add_special_tokens=False), True, turn)
        code, valid = parse_turn(text, closed)
        traj.turns.append(Turn(text, code, valid))
        if closed:
            result = session.run(code)
            traj.turns[-1].result, traj.turns[-1].observation = result, observation_text(text, result)
            if not last:
                traj.extend(tokenizer.encode(traj.turns[-1].observation, add_special_tokens=False), False, turn)
    traj.stop_reason = "answer" if "\\boxed" in traj.final_text else "max_turns" if closed else "no_answer"
    return traj


def trajectory_record(traj, turn_rewards=None, returns=None, advantages=None):
    """The trajectory as a JSON-able dict (eval reports, training sample dumps): why it stopped,
    and per turn its text, code and tool result, how many tokens were sampled (trained) and how
    many observation tokens followed (masked), and its reward r, return R and advantage A when
    given (each a (K,) sequence)."""
    sampled, masked = {}, {}  # turn -> token count
    last_turn = -1
    for in_loss, j in zip(traj.loss_mask[traj.prompt_len :], traj.token_turn[traj.prompt_len :]):
        if in_loss:
            last_turn = j
            sampled[j] = sampled.get(j, 0) + 1
        else:  # an observation belongs to the turn whose call produced it
            masked[last_turn] = masked.get(last_turn, 0) + 1
    turns = []
    for j, t in enumerate(traj.turns):
        result = None
        if t.result is not None:
            result = {k: getattr(t.result, k) for k in ("ok", "stdout", "stderr", "timed_out", "infra_error")}
        record = {
            "text": t.text,
            "tokens": sampled.get(j, 0),
            "code": t.code,
            "valid_call": t.valid_call,
            "result": result,
            "observation": t.observation if masked.get(j) else "",
            "observation_tokens": masked.get(j, 0),
        }
        for name, values in (("reward", turn_rewards), ("return", returns), ("advantage", advantages)):
            if values is not None:
                record[name] = float(values[j])
        turns.append(record)
    return {"stop": traj.stop_reason, "prompt_tokens": traj.prompt_len, "turns": turns}
