"""Data parallelism, the same under `python` (one process) and `torchrun`: the process group
and its collectives (every tensor put on the run's device first), the policy wrapped for DDP or
FSDP2 with its gradient-sync helpers, micro-batches that keep ranks in step, and exit handling
that leaves no rank waiting.

    world = setup_distributed(cfg.device)            # World(rank 0, size 1) without torchrun
    wrapped = wrap(policy, world, parallel="fsdp")   # LogProbs(policy); forward -> (B, L) log-probs
    with full_parameters(wrapped): ...               # generation (FSDP2 gathers once per phase)
    finish(world)                                    # barrier, then destroy the process group
    run_command(main, cfg, "train.py", INPUT_ERRORS) # errors as one line; no hang under torchrun
"""

import contextlib
import datetime
import importlib
import os
import platform
import sys
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import model as policies
from config import DTYPES as DTYPE_FLAGS
from config import TIMEOUT_MINUTES, ConfigError


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
assert tuple(DTYPES) == DTYPE_FLAGS, "config.DTYPES names --compute_dtype's values"


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
    summary.json and eval.py's reports; `tools.repro --check_demo` compares it with the published one."""
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


def all_reduce(values, world, op="sum"):
    """Element-wise sum (or max) over ranks of a list of floats (float64, so counts stay exact)."""
    t = on_device(torch.tensor(values, dtype=torch.float64), world)
    if world.size > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
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
    std::terminate aborts a rank that had finished cleanly. Everything is written and closed by
    then, so skipping the teardown loses nothing."""
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
            return policies.token_logprobs(
                self.policy,
                input_ids,
                attention_mask,
                temperature=temperature,
                needed=needed,
                vocab_size=self.vocab_size,
            )  # (B, L)


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
