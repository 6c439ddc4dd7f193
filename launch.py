"""What the entry scripts (train.py, eval.py) share: flags read from a config dataclass, and
torch.distributed set up, used and ended the same way under `python` and `torchrun`.

    @dataclass
    class Config:
        lr: float = arg(3e-4, "peak learning rate")
    cfg = parse_config(Config, "train.py", __doc__)
    world = setup_distributed(cfg.device)   # World(rank 0, size 1) without torchrun
    ...
    finish(world)                           # barrier, then destroy the process group
    run_command(main, cfg, "train.py", INPUT_ERRORS)   # errors as one line; no hang under torchrun
    tracker = open_tracker("tensorboard", out_dir, config)   # or "wandb", or "none" (a no-op)
    tracker.log(record, step); tracker.close()
"""

import argparse
import dataclasses
import json
import numbers
import os
import sys
import traceback
import typing
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def arg(default, meaning, **per_model):
    """A config field with its one-line meaning (the flag's --help text). per_model (demo=...,
    model=...): a default that depends on the model; the field defaults to None ("auto") and
    the entry script fills in the value for its --model (see train.Config.default_of)."""
    metadata = {"help": meaning, **per_model}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def default_text(f, default):
    """How --help shows a field's default: its value, or its value per model."""
    if "demo" in f.metadata:
        return f"demo: {f.metadata['demo']}; other models: {f.metadata['model']}"
    return "auto" if default is None else str(default)


class ConfigError(ValueError):
    """A flag value that cannot work, named."""


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
    return config_cls(**vars(parser.parse_args(argv)))


@dataclass
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def main(self):
        return self.rank == 0


def setup_distributed(device_flag):
    """The same file under python (one process) and torchrun (RANK set): nccl on CUDA, gloo on CPU."""
    cuda = torch.cuda.is_available() and device_flag != "cpu"
    if device_flag == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "RANK" not in os.environ:
        return World(0, 1, device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device)


def all_reduce(values, world, op=None):
    """Element-wise sum (or op) over ranks of a list of floats (float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=world.device)
    if world.size > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_rows(t, world):
    """Concatenate every rank's equally shaped tensor along dim 0, in rank order."""
    if world.size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world.size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


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
    traceback; any other keeps its traceback. Under torchrun a rank that fails leaves at once,
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
        if rank is not None:
            exit_now(1)
        sys.exit(1)
    except BaseException:
        if rank is None:
            raise
        print(f"[rank {rank}] {prog} failed:", file=sys.stderr)
        traceback.print_exc()
        exit_now(1)
    if rank is not None:
        exit_now()


# ---------------------------------------------------------------- experiment tracking (optional)

TRACKERS = ("none", "tensorboard", "wandb")


def numeric_fields(record):
    """The fields of a metrics record that a tracker logs: ints and floats (numpy's too; not
    bools, strings, lists or dicts), as floats, under their metrics.jsonl names. "step" is the
    x-axis of every series, not a series of its own."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, numbers.Real) and not isinstance(v, bool)
    }


class NoTracker:
    """kind "none": logs nothing, writes nothing."""

    def log(self, record, step):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TensorBoardTracker(NoTracker):
    """Scalars into OUT/tensorboard (torch.utils.tensorboard), one tag per metrics.jsonl field;
    the config as a text summary. `tensorboard --logdir OUT/tensorboard` shows them."""

    def __init__(self, out_dir, config, run_name=None, start_step=0):
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(f"tracker 'tensorboard' needs the package: pip install tensorboard ({e})")
        # purge_step: a resumed run redoes the steps after its checkpoint; events of an earlier
        # attempt at those steps are hidden, as train.py drops their metrics.jsonl records.
        purge = start_step + 1 if start_step else None
        self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=purge)
        text = json.dumps({"run_name": run_name, **config}, indent=1, default=str)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), start_step)  # indented: as code
        self.writer.flush()

    def log(self, record, step):
        for name, value in numeric_fields(record).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # one write per step: a live tensorboard, nothing lost if the run dies

    def close(self):
        self.writer.close()


class WandbTracker(NoTracker):
    """A Weights & Biases run: project from WANDB_PROJECT (else "gtpo"), name run_name, the config
    as its config, its files under OUT/wandb. WANDB_MODE=offline logs to those files only (`wandb
    sync` uploads them later); other WANDB_* variables apply as wandb documents them."""

    def __init__(self, out_dir, config, run_name=None, start_step=0):
        try:
            import wandb
        except ImportError as e:
            raise ConfigError(f"tracker 'wandb' needs the wandb package: pip install wandb ({e})")
        os.makedirs(out_dir, exist_ok=True)
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or "gtpo", name=run_name, config=config, dir=out_dir
            )
        except wandb.errors.Error as e:  # no API key, no connection, a bad setting
            offline = f"WANDB_MODE=offline logs to {os.path.join(out_dir, 'wandb')} without an account"
            raise ConfigError(f"tracker 'wandb': {e} ({offline})") from e

    def log(self, record, step):
        self.run.log(numeric_fields(record), step=step)

    def close(self):
        """Finish the run, then wait until wandb's service process has written it: finish() alone
        can return first (wandb 0.31, WANDB_MODE=offline, a loaded machine: the run file held its
        header only, the history came seconds later). teardown() ends wandb in this process; a
        later wandb.init starts it again."""
        import wandb

        self.run.finish()
        wandb.teardown()


def open_tracker(kind, out_dir, config, run_name=None, start_step=0):
    """An experiment tracker with .log(record, step) and .close() (also a context manager):
    kind "none" (a no-op), "tensorboard" (OUT/tensorboard; needs `pip install tensorboard`) or
    "wandb" (needs `pip install wandb`; see WandbTracker). The package is imported only when its
    kind is asked for; a missing one is a ConfigError naming the pip command. Each log writes the
    record's numeric fields (numeric_fields) at step. start_step: the step a run resumes from
    (tensorboard hides the events an earlier attempt wrote after it). Open it on the main rank only.
    """
    if kind == "none":
        return NoTracker()
    if kind == "tensorboard":
        return TensorBoardTracker(out_dir, config, run_name, start_step)
    if kind == "wandb":
        return WandbTracker(out_dir, config, run_name, start_step)
    raise ConfigError(f"tracker {kind!r}: expected one of {', '.join(TRACKERS)}")
