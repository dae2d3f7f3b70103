"""Checkpoint layout, validation and the cross-world-size (universal) conversion.

A checkpoint is one folder, `step_XXXXXXXX/`:

    ds/                      DeepSpeed's sharded state: each rank's ZeRO partition of weights + optimizer
    latest, zero_to_fp32.py  written by DeepSpeed on rank 0
    rng_rank{r}.pt           each rank's torch / numpy / python RNG state
    trainer_state.json       step, data position, world size, seed, metric history (rank 0, written last)

Under Ray Train every rank writes its files to a local folder and reports it; Ray merges the ranks'
folders into one in storage_path and registers the checkpoint only after all ranks reported, so a
checkpoint counts once every rank's shards are written. Under torchrun (and in-process) the ranks write
into the same folder under storage_dir, so rank 0 writes trainer_state.json only after a barrier: a
folder with that file is complete. Which folder a checkpoint goes to is the runtime's choice
(training/runtime.py); what goes in it, and how it is read back, is this module's.

Resuming on a different number of workers (e.g. 2 -> 1) goes through DeepSpeed's universal checkpoint:
each rank converts `ds/` with deepspeed.checkpoint.ds_to_universal into a local folder and loads it with
`checkpoint.load_universal`; the global batch stays the same and accumulation absorbs the change.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import tempfile
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raylm.core.errors import ConfigError

STATE = "trainer_state.json"
DS_TAG = "ds"


class CheckpointReadError(ConfigError):
    """A checkpoint that was asked for is missing or cannot be read."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass
class TrainState:
    """trainer_state.json: where the run is (step, data position) and how it got there (history)."""

    step: int
    world_size: int
    seed: int
    attempt: int
    zero_stage: int
    data_position: dict[str, int]
    global_batch_size: int
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_json(cls, state: dict[str, Any], default_batch: int) -> TrainState:
        """Checkpoints written before a field existed read with the value they were trained with."""
        return cls(
            step=int(state["step"]),
            world_size=int(state["world_size"]),
            seed=int(state["seed"]),
            attempt=int(state.get("attempt", 0)),
            zero_stage=int(state.get("zero_stage", 0)),
            data_position=state.get("data_position", {}),
            global_batch_size=int(state.get("global_batch_size", default_batch)),
            history=list(state.get("history", [])),
        )


@dataclass(frozen=True)
class Resume:
    """A checkpoint to start from, read and checked before the engine is built (DeepSpeed's config
    depends on it: a checkpoint saved by another number of ZeRO >= 1 workers loads as universal)."""

    folder: str
    state: TrainState
    universal: bool


def open_resume(folder: str, world_size: int, global_batch_size: int) -> Resume:
    state = TrainState.from_json(read_state(folder), global_batch_size)
    if state.global_batch_size != global_batch_size:
        raise CheckpointReadError(
            f"checkpoint {folder} was trained with global_batch_size {state.global_batch_size}; "
            f"train.global_batch_size is {global_batch_size} (the data position is counted in global batches)"
        )
    # ZeRO-0 keeps full, unpartitioned state, which loads on any number of workers as it is.
    universal = state.world_size != world_size and state.zero_stage > 0
    return Resume(folder, state, universal)


def local_folder(resume_from: str | None) -> AbstractContextManager[str | None]:
    """An explicit resume_from as a context giving a local folder (remote URIs are downloaded)."""
    if resume_from and "://" in resume_from:
        import ray.train

        return ray.train.Checkpoint(resume_from).as_directory()
    return nullcontext(resume_from)


def latest_complete(root: str | None) -> str | None:
    """The newest step_* folder under root that holds trainer_state.json (written last, so complete)."""
    if not root or not os.path.isdir(root):
        return None
    done = sorted(
        d for d in os.listdir(root) if d.startswith("step_") and os.path.exists(os.path.join(root, d, STATE))
    )
    return os.path.join(root, done[-1]) if done else None


def keep_last(root: str, count: int) -> None:
    """Delete all but the newest `count` step_* folders under root."""
    done = sorted(d for d in os.listdir(root) if d.startswith("step_"))
    for old in done[:-count]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def save(engine, folder: str, state: TrainState, rank: int) -> None:
    """Every rank writes its DeepSpeed shard and RNG state into `folder`; rank 0 then writes
    trainer_state.json, after a barrier, so a folder holding it has every rank's files."""
    os.makedirs(folder, exist_ok=True)
    engine.save_checkpoint(folder, tag=DS_TAG, save_latest=True)
    save_rng(folder, rank)
    dist.barrier()
    if rank == 0:
        write_state(folder, asdict(state))


def load(engine, resume: Resume, rank: int, weight_decay: float) -> None:
    """Load weights, optimizer state and this rank's RNG into an initialized engine."""
    try:
        path = _load_shards(engine, resume)
    except Exception as exc:
        raise CheckpointReadError(
            f"checkpoint {resume.folder} cannot be read: {type(exc).__name__}: {exc}"
        ) from exc
    if path is None:
        raise CheckpointReadError(
            f"checkpoint {resume.folder} cannot be read: DeepSpeed found no state under {DS_TAG}/"
        )
    if resume.universal:
        _repair_universal_optimizer(engine, weight_decay)
    if not load_rng(resume.folder, rank):
        torch.manual_seed(resume.state.seed + 1000 * rank + resume.state.step)


def _load_shards(engine, resume: Resume) -> str | None:
    # The lr schedule is not loaded: the loop sets it from the step (see loop.setup).
    if not resume.universal:
        path, _ = engine.load_checkpoint(
            resume.folder, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        return path
    with tempfile.TemporaryDirectory(prefix="raylm-universal-") as tmp:
        path, _ = engine.load_checkpoint(
            to_universal(resume.folder, tmp),
            tag=DS_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        return path


def _repair_universal_optimizer(engine, weight_decay: float) -> None:
    # A universal checkpoint stores one set of optimizer hyperparameters for all groups; put back the
    # per-group weight decay of model.param_groups (decayed matrices, then undecayed vectors).
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for group, decay in zip(inner.param_groups, (weight_decay, 0.0), strict=False):
        group["weight_decay"] = decay
    # DeepSpeed 0.19.8's universal load gives every param group the *same* `step` tensor, so torch's
    # AdamW bumps it once per group per step and bias correction drifts (found by the 2 -> 1 test).
    for st in inner.state.values():
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].clone()


def read_state(folder: str) -> dict[str, Any]:
    """trainer_state.json of a checkpoint folder, checked for the shard files it promises."""
    path = os.path.join(folder, STATE)
    if not os.path.isdir(folder):
        raise CheckpointReadError(f"checkpoint {folder} does not exist")
    try:
        with open(path) as f:
            state = json.load(f)
        step, world = int(state["step"]), int(state["world_size"])
    except FileNotFoundError:
        raise CheckpointReadError(f"checkpoint {folder} is incomplete: {STATE} is missing") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointReadError(f"checkpoint {folder} cannot be read: {path} is corrupt ({exc})") from None
    # ZeRO >= 1 writes one optimizer shard per rank; ZeRO-0 keeps the optimizer in the model states file.
    pattern = "*optim_states.pt" if state.get("zero_stage", 0) > 0 else "*model_states.pt"
    shards = glob.glob(os.path.join(folder, DS_TAG, pattern))
    if not shards:
        raise CheckpointReadError(
            f"checkpoint {folder} (step {step}) has no DeepSpeed shards under {DS_TAG}/"
        )
    if state.get("zero_stage", 0) > 0 and len(shards) != world:
        raise CheckpointReadError(
            f"checkpoint {folder} (step {step}) has {len(shards)} optimizer shards, "
            f"expected {world} (one per rank)"
        )
    return state


def remote_resume_exists(uri: str) -> None:
    """Pre-flight for a resume_from on an object store: the folder and its trainer_state.json exist."""
    from raylm.core import storage

    if not storage.exists(f"{uri.rstrip('/')}/{STATE}"):
        raise CheckpointReadError(f"checkpoint {uri} does not exist or has no {STATE}")


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rng(folder: str, rank: int) -> None:
    torch.save(rng_state(), os.path.join(folder, f"rng_rank{rank}.pt"))


def load_rng(folder: str, rank: int) -> bool:
    """Restore this rank's RNG; False when the checkpoint came from fewer ranks (then seeds are re-derived)."""
    path = os.path.join(folder, f"rng_rank{rank}.pt")
    if not os.path.exists(path):
        return False
    # weights_only=False: numpy / python RNG states are tuples of arrays; the file is our own.
    set_rng_state(torch.load(path, weights_only=False))
    return True


def write_state(folder: str, state: dict[str, Any]) -> None:
    tmp = os.path.join(folder, STATE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, os.path.join(folder, STATE))


def to_universal(folder: str, out_dir: str) -> str:
    """Convert `folder/ds` to a DeepSpeed universal checkpoint under out_dir; returns the load dir."""
    from deepspeed.checkpoint import ds_to_universal

    target = os.path.join(out_dir, "universal")
    args = SimpleNamespace(
        input_folder=os.path.join(folder, DS_TAG),
        output_folder=os.path.join(target, DS_TAG),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    ds_to_universal.main(args)
    with open(os.path.join(target, "latest_universal"), "w") as f:
        f.write(DS_TAG)
    return target
