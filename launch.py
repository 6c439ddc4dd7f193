"""What the entry scripts (train.py, eval.py) share: flags read from a config dataclass;
torch.distributed set up, used and ended the same way under `python` and `torchrun`; the policy
wrapped for data parallelism (DDP or FSDP2), its gradient-sync helpers, and the split of a
batch into mini- and micro-batches that keeps every rank in step.

    @dataclass
    class Config:
        lr: float = arg(3e-4, "peak learning rate")
    cfg = parse_config(Config, "train.py", __doc__)
    world = setup_distributed(cfg.device)   # World(rank 0, size 1) without torchrun
    ...
    finish(world)                           # barrier, then destroy the process group
    run_command(main, cfg, "train.py", INPUT_ERRORS)   # errors as one line; no hang under torchrun
    wrapped = wrap(policy, world, parallel="fsdp")   # LogProbs(policy); forward -> (B, L) log-probs
    with full_parameters(wrapped): ...               # generation (FSDP2 gathers once per phase)
    environment(world)     # versions, threads, CPU kernels, device: recorded beside every figure
"""

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import math
import os
import platform
import re
import sys
import traceback
import typing
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

import model as policies
import rollout


def arg(default, meaning, valid=None, **per_model):
    """A config field with its one-line meaning (the flag's --help text) and its valid values:
    a range (">= 1", "> 0", "<= 0", "[0, 1]", "(0, 1]", "[0, 1)"; floats must also be finite) or a
    tuple of choices. None ("auto") always passes: the entry script resolves it. per_model
    (demo=..., model=...): a default that depends on the model; the field defaults to None and
    the entry script fills in the value for its --model (see train.Config.default_of)."""
    metadata = {"help": meaning, "valid": valid, **per_model}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def default_text(f, default):
    """How --help shows a field's default and valid values."""
    valid = valid_text(f)
    return f"{shown_default(f, default)}; {valid}" if valid else shown_default(f, default)


def shown_default(f, default, show=str):
    """A field's default as its value, its value per model, or auto."""
    if "demo" in f.metadata:
        return f"demo: {show(f.metadata['demo'])}; other models: {show(f.metadata['model'])}"
    return "auto" if default is None else show(default)


def valid_text(f):
    """A field's valid values as words ("" when any value goes)."""
    valid = f.metadata.get("valid")
    if valid is None:
        return ""
    return f"one of {', '.join(valid)}" if isinstance(valid, tuple) else range_text(valid)


def flag_table(config_cls):
    """Every flag of config_cls as a markdown table: default, valid values, meaning (docs/usage.md
    holds train.py's and eval.py's; a test keeps them in step with the code)."""
    code = lambda v: f"`{v!r}`" if v in ("", []) else f"`{v}`"
    rows = ["| flag | default | valid | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(config_cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        cells = [f"`--{f.name}`", shown_default(f, default, code), valid_text(f), f.metadata["help"]]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def range_text(valid):
    return f"in {valid}" if valid[0] in "[(" else valid


def range_bounds(valid):
    """(low, low included, high, high included) of a range text (see arg)."""
    if m := re.fullmatch(r"(>=|>|<=|<) (\S+)", valid):
        op, bound = m.group(1), float(m.group(2))
        return (bound, op == ">=", math.inf, False) if op[0] == ">" else (-math.inf, False, bound, op == "<=")
    m = re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", valid)
    assert m, f"not a range: {valid!r}"
    return float(m.group(2)), m.group(1) == "[", float(m.group(3)), m.group(4) == "]"


def in_range(value, valid):
    """Whether a number lies in a range text (see arg); NaN and infinities never do."""
    if isinstance(value, float) and not math.isfinite(value):
        return False
    low, low_in, high, high_in = range_bounds(valid)
    return (low <= value if low_in else low < value) and (value <= high if high_in else value < high)


def check_fields(cfg):
    """A ConfigError naming every field of cfg outside its valid values (flag, value, range), in
    one line."""
    bad = []
    for f in dataclasses.fields(cfg):
        value, valid = getattr(cfg, f.name), f.metadata.get("valid")
        if value is None or valid is None:
            continue
        if isinstance(valid, tuple) and value not in valid:
            bad.append(f"--{f.name} {value!r}: must be one of {', '.join(valid)}")
        elif isinstance(valid, str) and not in_range(value, valid):
            finite = isinstance(value, float) and not math.isfinite(value)
            bad.append(f"--{f.name} {value!r}: must be {range_text(valid)}" + (", a finite number" if finite else ""))
    if bad:
        raise ConfigError("; ".join(bad))


class ConfigError(ValueError):
    """A flag value that cannot work, named."""


def parse_demo_size(text):
    """(hidden size, layers) of a --demo_size HIDDENxLAYERS, or a ConfigError naming it."""
    if not re.fullmatch(r"[1-9]\d*x[1-9]\d*", text):
        raise ConfigError(f"--demo_size {text!r}: expected HIDDENxLAYERS, e.g. 128x3")
    return tuple(map(int, text.split("x")))


def _flag_bool(text):
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def parse_config(config_cls, prog, description, argv=None):
    """config_cls from the command line: one --flag per field, with its meaning and default in
    --help; list fields take several values. A bad flag is one error line and exit code 2."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in dataclasses.fields(config_cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kind, nargs = f.type, None
        if typing.get_origin(f.type) is list:
            kind, nargs = typing.get_args(f.type)[0], "*"
        extra = {}
        if kind is bool:  # --flag alone means true; --flag false also works
            kind, nargs, extra = _flag_bool, "?", {"const": True}
        meaning = f"{f.metadata['help']} ({default_text(f, default)})".replace("%", "%%")
        parser.add_argument(f"--{f.name}", type=kind, nargs=nargs, default=default, help=meaning, **extra)

    def one_line_error(message):
        print(f"{prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

    parser.error = one_line_error
    cfg = config_cls(**vars(parser.parse_args(argv)))
    try:
        check_fields(cfg)
    except ConfigError as e:
        one_line_error(str(e))
    return cfg


@dataclass
class World:
    """This process's place in the run: its rank, the number of ranks, the device it computes on
    (every tensor handed to torch.distributed is moved there first: NCCL takes CUDA tensors only)
    and the compute dtype of its forward passes (weights stay fp32)."""

    rank: int
    size: int
    device: torch.device
    dtype: torch.dtype = torch.float32

    @property
    def main(self):
        return self.rank == 0


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
COMPUTE_DTYPES = ("auto", *DTYPES)
TIMEOUT_MINUTES = 60  # a collective's wait: long enough for rank 0 to write a 7B checkpoint


def resolve_dtype(flag, device):
    """--compute_dtype as a torch dtype: auto is model.default_dtype (bf16 on GPUs that compute it
    natively, fp32 on older GPUs and on the CPU)."""
    if flag == "auto":
        return policies.default_dtype(device)
    return DTYPES[flag]


def setup_distributed(device_flag, dtype_flag="auto", timeout_minutes=TIMEOUT_MINUTES):
    """The same file under python (one process) and torchrun (RANK set): nccl on CUDA, gloo on
    CPU, every collective waiting up to timeout_minutes."""
    cuda = torch.cuda.is_available() and device_flag != "cpu"
    if device_flag == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)  # before resolve_dtype, which asks the current device
    dtype = resolve_dtype(dtype_flag, device)
    if "RANK" not in os.environ:
        return World(0, 1, device, dtype)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    return World(dist.get_rank(), dist.get_world_size(), device, dtype)


VERSIONED = ("torch", "transformers", "tokenizers", "safetensors", "numpy")  # what a figure's floats go through


def environment(world):
    """What a measured figure depends on besides the code, the flags and the seed: the Python and
    library versions, torch's thread count (float sums split differently over threads), the CPU's
    vector instructions torch dispatches to, the device and the number of ranks. Written to
    summary.json and eval.py's reports; `repro.py --check_demo` compares it with the published one."""
    device = str(world.device)
    if world.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(world.device)}, CUDA {torch.version.cuda})"
    return {
        "python": platform.python_version(),
        **{name: importlib.import_module(name).__version__ for name in VERSIONED},  # torch's names its build
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": device,
        "ranks": world.size,
    }


def on_device(t, world):
    """t as torch.distributed may take it: on the run's device (NCCL refuses CPU tensors, gloo
    takes both, so CPU runs alone cannot show a miss), contiguous. Every collective's tensor
    comes from here."""
    return t.to(world.device).contiguous()


def peak_memory_gb(world):
    """This process's peak memory: CUDA memory allocated on its GPU, else its peak RSS."""
    if world.device.type == "cuda":
        return torch.cuda.max_memory_allocated(world.device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def all_reduce(values, world, op=None):
    """Element-wise sum (or op) over ranks of a list of floats (float64, so counts stay exact)."""
    t = on_device(torch.tensor(values, dtype=torch.float64), world)
    if world.size > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_rows(t, world):
    """Concatenate every rank's equally shaped tensor along dim 0, in rank order, on t's device."""
    if world.size == 1:
        return t
    mine = on_device(t, world)
    parts = [torch.empty_like(mine) for _ in range(world.size)]
    dist.all_gather(parts, mine)
    return torch.cat(parts).to(t.device)


def broadcast_tensors(tensors, world):
    """Rank 0's values copied into every rank's tensors of the same shapes, in place."""
    if world.size == 1:
        return
    for t in tensors:
        box = on_device(t.detach(), world)
        dist.broadcast(box, src=0)
        with torch.no_grad():
            t.copy_(box.to(t.device))


def gather_objects(obj, world):
    """Every rank's picklable obj, in rank order, on every rank."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, world):
    """Rank 0's picklable obj, on every rank."""
    if world.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world):
    if world.size > 1:
        dist.barrier()


def finish(world):
    """End torch.distributed: a barrier first (a bare destroy sometimes aborts a rank)."""
    barrier(world)
    if world.size > 1:
        dist.destroy_process_group()


def exit_now(code=0):
    """End a torchrun process without the interpreter's teardown. After destroy_process_group a
    gloo worker thread can still drop its last reference to a finished collective's tensor; if
    that happens while the interpreter finalises, taking the GIL ends the thread mid-unwind and
    std::terminate aborts a rank that had finished cleanly (seen in about 1 of 15 two-rank runs,
    gdb: ~AsyncAllgatherWork -> decref_pyobject -> take_gil -> pthread_exit). Everything is written
    and closed by then, so skipping the teardown loses nothing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_command(main, cfg, prog, input_errors, same_on_every_rank=False):
    """main(cfg) as a command. An error in input_errors (bad input) is one line on stderr, no
    traceback, exit code 2 for a ConfigError (a bad flag) and 1 otherwise; any other error keeps
    its traceback. Under torchrun a rank that fails leaves at once,
    without a barrier or the interpreter's teardown: the other ranks may be blocked in a
    collective that will never complete, and torchrun stops them as soon as one rank has exited
    with an error (a barrier would wait for gloo's 30-minute timeout). same_on_every_rank: input
    errors are raised alike by every rank, so rank 0 alone prints them; otherwise each failing
    rank prints its own, prefixed [rank r]."""
    rank = os.environ.get("RANK")  # None without torchrun
    try:
        main(cfg)
    except input_errors as e:
        if rank is None or not same_on_every_rank or rank == "0":
            prefix = f"[rank {rank}] " if rank is not None and not same_on_every_rank else ""
            print(f"{prefix}{prog}: error: {e}", file=sys.stderr)
        code = 2 if isinstance(e, ConfigError) else 1  # 2: a bad flag, as argparse's own errors
        if rank is not None:
            exit_now(code)
        sys.exit(code)
    except BaseException:
        if rank is None:
            raise
        print(f"[rank {rank}] {prog} failed:", file=sys.stderr)
        traceback.print_exc()
        exit_now(1)
    if rank is not None:
        exit_now()


# ---------------------------------------------------------------- data parallel: DDP or FSDP2


class LogProbs(nn.Module):
    """The policy as a module whose forward is model.token_logprobs in the compute dtype, so that
    DDP and FSDP2 wrap exactly the pass that is trained (and its gradient sync hooks see it)."""

    def __init__(self, policy, dtype=torch.float32, vocab_size=None):
        super().__init__()
        self.policy, self.dtype, self.vocab_size = policy, dtype, vocab_size

    def forward(self, input_ids, attention_mask, temperature=1.0, needed=None):
        with mixed_precision(self.policy, self.dtype):
            return policies.token_logprobs(self.policy, input_ids, attention_mask, temperature=temperature,
                                           needed=needed, vocab_size=self.vocab_size)  # (B, L) fmt: skip


@contextlib.contextmanager
def mixed_precision(policy, dtype):
    """Forward passes of policy in dtype over its fp32 weights (autocast; nothing for fp32): pure
    bf16 weights would round updates of lr 1e-6 away (bf16 keeps 8 bits of mantissa). RoPE's cos
    and sin are cast to dtype as well: they follow the fp32 hidden states, and would make the
    cached keys fp32 beside bf16 values (a KV cache 1.5x its size, every key cast at each step)."""
    if dtype == torch.float32:
        yield
        return
    rotary = getattr(getattr(policy, "model", None), "rotary_emb", None)
    cast = lambda module, args, out: tuple(t.to(dtype) for t in out)  # (cos, sin)
    hook = rotary.register_forward_hook(cast) if rotary is not None else None
    try:
        with torch.autocast(policy.device.type, dtype=dtype):
            yield
    finally:
        if hook:
            hook.remove()


def materialize(module, device):
    """Allocate (uninitialised) on device the parameters and buffers of a module built on the meta
    device, keeping tied parameters tied (nn.Module.to_empty unties them)."""
    made = {}
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            if id(p) not in made:
                made[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
            m._parameters[name] = made[id(p)]
        for name, b in m.named_buffers(recurse=False):
            m._buffers[name] = torch.empty_like(b, device=device)
    return module


def replicate(module, world):
    """Rank 0's parameters and buffers on every rank. Only rank 0 reads the weights from disk (8
    ranks reading a 7B checkpoint would hold 8 fp32 copies in host memory); the others build the
    module on the meta device, and it is allocated on their device here."""
    if world.size == 1:
        return module
    if any(t.is_meta for t in module.state_dict(keep_vars=True).values()):
        materialize(module, world.device)
    broadcast_tensors([*module.parameters(), *module.buffers()], world)
    return module


def wrap(policy, world, parallel="ddp", vocab_size=None):
    """LogProbs(policy) in world.dtype over vocab_size tokens, data parallel under torchrun: DDP,
    or FSDP2 with each decoder layer and the rest (embeddings, final norm, head) as shards; every
    rank starts from rank 0's weights (replicate). One process is left unwrapped, except FSDP2
    under torchrun, which shards over its one rank (as `bench.py gpu` checks it)."""
    module = replicate(LogProbs(policy, world.dtype, vocab_size), world)
    if world.size == 1 and not (parallel == "fsdp" and dist.is_initialized()):
        return module
    if parallel == "ddp":
        ids = [world.device.index] if world.device.type == "cuda" else None
        # No buffer sync in forward: the buffers (rotary frequencies) are constants, and a sync in
        # every forward would tie ranks to the same number of forwards.
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=world.dtype, reduce_dtype=torch.float32)  # gathered; shards stay fp32
    for layer in policy.model.layers:
        fully_shard(layer, mp_policy=mp)
    module = fully_shard(module, mp_policy=mp)
    with torch.no_grad():  # FSDP2 initialises at its first root forward; generation needs that done
        ids = torch.zeros(1, 2, dtype=torch.long, device=world.device)
        module(ids, torch.ones_like(ids))
    module.reshard()  # the root stays gathered after a forward: shard it again before AdamW sees it
    return module


def fsdp_modules(wrapped):
    from torch.distributed.fsdp import FSDPModule

    return [m for m in wrapped.modules() if isinstance(m, FSDPModule)]


def trainable_parameters(wrapped):
    """What the optimizer updates: under FSDP2 the shards. (After a forward FSDP2 leaves the root
    gathered, and parameters() would hand out the gathered copies, which get no gradient.)"""
    for m in fsdp_modules(wrapped):
        m.reshard()
    return [p for p in wrapped.parameters() if p.requires_grad]


@contextlib.contextmanager
def full_parameters(wrapped):
    """For generation: FSDP2 gathers every shard once for the whole phase (not once per decode
    step) and frees them after; DDP and single-process models already hold full parameters."""
    sharded = fsdp_modules(wrapped)
    for m in sharded:
        m.unshard()
        m.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()
            m.set_reshard_after_forward(True)


@contextlib.contextmanager
def gradient_sync(wrapped, enabled):
    """DDP: accumulate without communicating on all but the last micro-batch (no_sync). FSDP2
    reduce-scatters every micro-batch: without the sync it would hold unsharded fp32 gradients
    until the last one, 4 bytes per parameter more on every GPU."""
    if enabled or not hasattr(wrapped, "no_sync"):
        yield
    else:
        with wrapped.no_sync():
            yield


def check_in_sync(wrapped, world):
    """Whether every rank holds the same parameters (compared by per-tensor sums and sums of
    squares in float64); None under FSDP2, where each rank holds its own shard by design."""
    if fsdp_modules(wrapped):
        return None
    if world.size == 1:
        return True
    sums = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in wrapped.parameters()])
    everyone = all_gather_rows(sums[None], world)  # (ranks, P, 2)
    return bool((everyone == everyone[0]).all())


@dataclass
class MiniBatch:
    """The rows of one optimizer step on this rank, and the global counts its loss divides by."""

    rows: list  # local row indices forwarded, longest first (empty: a stand-in row that trains nothing)
    batch: dict  # rollout.collate of those rows (or of the stand-in), on the device
    num_tokens: float  # the denominator: sampled tokens of its counted rows, over all ranks
    num_seqs: float  # counted rows with a sampled token, over all ranks
    forwarded_tokens: float  # sampled tokens of its forwarded rows, over all ranks (0: nothing to do)
    micro_batches: int  # the same on every rank


def plan_minibatches(trajs, *, forwarded, counted, mini_batch_size, micro_batch_size, world, pad):
    """This rank's rows in the step's mini-batches: row i goes to mini-batch i mod M (M = the global
    batch / mini_batch_size, 1 when 0). A rank holds a multiple of M rows, so global row r * N + i
    lands in the same mini-batch as local row i: the mini-batches are the same sets of
    trajectories whatever the number of ranks, and a group's G rows spread over min(G, M) of
    them. Forwarded rows get forward passes; counted rows (forwarded or not) make up the
    denominator."""
    N = len(trajs)
    M = N * world.size // mini_batch_size if mini_batch_size else 1
    assert N % M == 0, f"{N} rows per rank do not split into {M} mini-batches"
    sampled = [sum(t.loss_mask) for t in trajs]
    members = [range(k, N, M) for k in range(M)]
    rows = [sorted((i for i in m if forwarded[i]), key=lambda i: -len(trajs[i].input_ids)) for m in members]
    local_counts = []  # per mini-batch: denominator tokens, denominator rows, forwarded tokens
    for m, r in zip(members, rows):
        local_counts += [sum(sampled[i] for i in m if counted[i]), sum(1 for i in m if counted[i] and sampled[i]),
                         sum(sampled[i] for i in r)]  # fmt: skip
    counts = all_reduce(local_counts, world)
    micro_counts = all_reduce([math.ceil(len(r) / micro_batch_size) for r in rows], world, dist.ReduceOp.MAX)
    shortest = min(range(N), key=lambda i: len(trajs[i].input_ids))
    plan = []
    for k, r in enumerate(rows):
        batch = {key: v.to(world.device) for key, v in rollout.collate([trajs[i] for i in r or [shortest]], pad).items()}
        if not r:  # a stand-in row that keeps this rank in the collectives and trains nothing
            batch["loss_mask"][:] = False
        num_tokens, num_seqs, forwarded_tokens = counts[3 * k : 3 * k + 3]
        plan.append(MiniBatch(rows=r, batch=batch, num_tokens=num_tokens, num_seqs=num_seqs,
                              forwarded_tokens=forwarded_tokens, micro_batches=int(micro_counts[k])))  # fmt: skip
    return plan


def micro_batches(batch, *, size, trim, count):
    """`count` row slices of a right-padded batch, each cut to its own longest row when trim (rows
    are sorted by length, so little padding is computed). Every rank runs the same count (FSDP2
    gathers parameters in each forward): past the last row come copies of the shortest row that
    train nothing. Yields (first row or None, the slice)."""
    for k in range(count):
        s = k * size
        if s < len(batch["input_ids"]):
            width = int(batch["attention_mask"][s : s + size].sum(1).max()) if trim else None
            yield s, {key: v[s : s + size, :width] for key, v in batch.items()}
        else:
            width = int(batch["attention_mask"][-1].sum()) if trim else None
            micro = {key: v[-1:, :width].clone() for key, v in batch.items()}
            micro["loss_mask"][:] = False
            yield None, micro
