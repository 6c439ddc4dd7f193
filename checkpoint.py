"""Checkpoints of a train.py run, its config.json, and resuming from them.

    out_dir/checkpoints/step_N/
        config.json, model.safetensors, tokenizer files, ...   the policy in Hugging Face format,
                                                               for use (eval.py, model.py export)
        trainer.json       step, data position, LR scheduler, evaluations so far, ranks
        optimizer/         AdamW's state, torch.distributed.checkpoint: each rank writes its own
                           shard (FSDP2), so no rank gathers the whole state (about 90 GB for 7B)
        rng_rank{r}.pt     each rank's RNG states

    save(step, run, cfg=cfg, world=world); load(step, run, cfg=cfg, world=world); steps(out_dir) -> [0, 10]
    check_resume(cfg, world)       refuses to resume a run made with other settings or ranks
    write_config(cfg, derived)     out_dir/config.json, which check_resume compares with

A checkpoint is written to step_N.tmp and renamed, so a crash mid-save leaves the previous ones
intact; step_0 (the RL start, the KL reference) is never pruned. Resuming is bit-exact (tested):
it restores the weights, the optimizer, the scheduler, the position in the problem stream and
every rank's RNG. It needs the same number of ranks, since every rank's RNG and FSDP2 shard are
its own; resuming on another number is refused with that reason.
"""

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from config import ConfigError
from parallel import barrier

# Settings that may change when a run resumes: they change neither its samples nor its updates
# (micro- and rollout batch sizes only up to float rounding). Any other difference is refused.
RESUMABLE = (
    "out_dir",
    "max_steps",
    "save_every",
    "keep_checkpoints",
    "sample_every",
    "sandbox_workers",
    "micro_batch_size",
    "rollout_batch_size",
    "activation_checkpointing",
    "device",
    "report_to",
    "dist_timeout",
)


def steps(out_dir):
    """RL steps that have a complete checkpoint (a directory is complete once renamed)."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for d in os.listdir(root) if (m := re.fullmatch(r"step_(\d+)", d)))


def rng_states():
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@contextlib.contextmanager
def single_process_ok():
    """torch.distributed.checkpoint warns at every save and load without a process group, which
    is how a single process runs: not news."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save(step, run, *, cfg, world):
    """checkpoints/step_N from the run's policy, wrapped model, tokenizer, optimizer, scheduler,
    data_position and evaluation; every rank takes part."""
    root = os.path.join(cfg.out_dir, "checkpoints")
    final, tmp = os.path.join(root, f"step_{step}"), os.path.join(root, f"step_{step}.tmp")
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 only
    weights = get_model_state_dict(run.wrapped, options=full)
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        run.policy.save_pretrained(tmp, state_dict={k.removeprefix("policy."): v for k, v in weights.items()})
        run.tokenizer.save_pretrained(tmp)
        trainer = {
            "step": step,
            "data_position": run.data_position,
            "scheduler": run.scheduler.state_dict(),
            "evaluation": run.evaluation,
            "ranks": world.size,
            "optimizer": bool(run.optimizer.state),
        }
        with open(os.path.join(tmp, "trainer.json"), "w") as f:
            json.dump(trainer, f, indent=1)
    barrier(world)
    if run.optimizer.state:  # a fresh optimizer has nothing to save
        state = get_optimizer_state_dict(run.wrapped, run.optimizer)  # this rank's shards under FSDP2
        with single_process_ok():
            dcp.save({"optimizer": state}, checkpoint_id=os.path.join(tmp, "optimizer"), no_dist=world.size == 1)
    torch.save(rng_states(), os.path.join(tmp, f"rng_rank{world.rank}.pt"))
    barrier(world)
    if world.main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in steps(cfg.out_dir)[1 : -cfg.keep_checkpoints]:  # step_0 is kept: the RL start
            shutil.rmtree(os.path.join(root, f"step_{old}"), ignore_errors=True)
    barrier(world)


def load(step, run, *, cfg, world):
    """Restore into the run what save() wrote, including this rank's RNG states. Rank 0 alone
    reads the weights; every rank gets them (its shard under FSDP2) by broadcast."""
    path = os.path.join(cfg.out_dir, "checkpoints", f"step_{step}")
    weights = {}
    for name in sorted(os.listdir(path)) if world.main else []:  # read once: rank 0 broadcasts it
        if name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(path, name)))
    if world.main and getattr(run.policy.config, "tie_word_embeddings", False):
        weights.setdefault("lm_head.weight", weights.get("model.embed_tokens.weight"))
    full = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world.size > 1)
    set_model_state_dict(run.wrapped, {f"policy.{k}": v for k, v in weights.items()}, options=full)
    with open(os.path.join(path, "trainer.json")) as f:
        trainer = json.load(f)
    if trainer["optimizer"]:
        state = {"optimizer": get_optimizer_state_dict(run.wrapped, run.optimizer)}  # the shapes to fill
        with single_process_ok():
            dcp.load(state, checkpoint_id=os.path.join(path, "optimizer"), no_dist=world.size == 1)
        set_optimizer_state_dict(run.wrapped, run.optimizer, state["optimizer"])
    run.scheduler.load_state_dict(trainer["scheduler"])
    run.data_position, run.evaluation = trainer["data_position"], trainer["evaluation"]
    set_rng_states(torch.load(os.path.join(path, f"rng_rank{world.rank}.pt"), weights_only=False))


def check_resume(cfg, world):
    """Refuse to resume a run made with other settings (one error listing every difference) or
    on another number of ranks."""
    done = steps(cfg.out_dir)
    path = os.path.join(cfg.out_dir, "config.json")
    if not done or not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            saved = json.load(f)["config"]
    except (json.JSONDecodeError, KeyError) as e:
        raise ConfigError(f"{path}: not a train.py config.json ({e}); give another --out_dir or delete it") from None
    now = dataclasses.asdict(cfg)
    differ = [
        f"--{k} {saved.get(k)!r} there, {now[k]!r} here" for k in now if k not in RESUMABLE and saved.get(k) != now[k]
    ]
    if differ:
        raise ConfigError(
            f"{cfg.out_dir} holds a run with other settings ({'; '.join(differ)}): "
            "give another --out_dir, the same flags, or delete it"
        )
    trainer = os.path.join(cfg.out_dir, "checkpoints", f"step_{done[-1]}", "trainer.json")
    with open(trainer) as f:
        ranks = json.load(f)["ranks"]
    if ranks != world.size:
        raise ConfigError(
            f"{os.path.dirname(trainer)} was written by {ranks} rank(s), this run has {world.size}: "
            f"resume with {ranks} (torchrun --nproc_per_node {ranks}), since each rank's RNG and "
            "FSDP2 shard are its own, or start a new --out_dir"
        )


def write_config(cfg, derived):
    """out_dir/config.json: every flag and the derived values, replaced atomically (a run killed
    mid-write keeps the old one). Returns its text."""
    text = json.dumps({"config": dataclasses.asdict(cfg), "derived": dataclasses.asdict(derived)}, indent=1)
    path = os.path.join(cfg.out_dir, "config.json")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return text


def trim_metrics(out_dir, step):
    """Drop metrics.jsonl's records after `step`: a resumed run redoes those steps."""
    path = os.path.join(out_dir, "metrics.jsonl")
    records = []
    if os.path.exists(path):
        with open(path) as f:
            records = [json.loads(line) for line in f]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records if r["step"] <= step)
