"""Checkpoint layout, validation and the cross-world-size (universal) conversion.

A checkpoint is one folder, `step_XXXXXXXX/`:

    ds/                      DeepSpeed's sharded state: each rank's ZeRO partition of weights + optimizer
    latest, zero_to_fp32.py  written by DeepSpeed on rank 0
    rng_rank{r}.pt           each rank's torch / numpy / python RNG state
    trainer_state.json       step, data position, world size, seed, metric history (rank 0, written last)

Under Ray Train every rank writes its files to a local folder and reports it; Ray merges the ranks'
folders into one in storage_path and registers the checkpoint only after all ranks reported, so a
checkpoint counts once every rank's shards are written. Under torchrun the ranks write into the same
folder and rank 0 writes trainer_state.json after a barrier.

Resuming on a different number of workers (e.g. 2 -> 1) goes through DeepSpeed's universal checkpoint:
each rank converts `ds/` with deepspeed.checkpoint.ds_to_universal into a local folder and loads it with
`checkpoint.load_universal`; the global batch stays the same and accumulation absorbs the change.
"""

from __future__ import annotations

import glob
import json
import os
import random
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from core.errors import ConfigError

STATE = "trainer_state.json"
DS_TAG = "ds"


class CheckpointReadError(ConfigError):
    """A checkpoint that was asked for is missing or cannot be read."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


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
    from core import storage

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
