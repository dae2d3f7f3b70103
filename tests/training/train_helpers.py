"""Helpers shared by the training tests: a recipe for a tiny run, the run's history, the worker pids."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import psutil

from raylm.core.artifacts import TrainDir
from raylm.core.config import PlatformConfig, build_config, deep_merge


def tiny_run(data_dir: str, root, **train: Any) -> PlatformConfig:
    """A 2-worker ZeRO-3 from-scratch run on the tiny curated folder: 12 steps, checkpoints every 4."""
    base = {
        "data_dir": data_dir,
        "output": str(root / "train"),
        "model": {
            "from_scratch": {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_layers": 2,
                "num_heads": 4,
                "num_kv_heads": 2,
            }
        },
        "num_workers": 2,
        "micro_batch_size": 2,
        "global_batch_size": 8,
        "max_steps": 12,
        "eval_every": 6,
        "schedule": {"lr": 3e-3, "warmup_steps": 2},
        "deepspeed": {"zero_stage": 3},
        "checkpoint": {"every_steps": 4, "keep_last": 3, "max_failures": 2, "preemption_check_every": 2},
        "cpus_per_worker": 1,
        "log_every": 1,
        # A Ray Train report every step, as before train.report_every existed: each report wakes the
        # worker's main thread, so a SIGTERM is handled by the next step (otherwise within Ray's 2 s
        # health check, several of these tiny steps later) and the recovery test knows where it stops.
        "report_every": 1,
    }
    return build_config(
        {"name": "t", "run_dir": str(root), "seed": 0, "stages": ["train"], "train": deep_merge(base, train)}
    )


def history(cfg: PlatformConfig) -> list[dict[str, Any]]:
    with open(TrainDir(cfg.train.output).metrics_jsonl) as f:
        return [json.loads(line) for line in f]


def train_worker_pids() -> list[int]:
    """Pids of this test session's Ray Train workers (descendants of this process, by process title)."""
    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "RayTrainWorker" in " ".join(p.cmdline()):
                pids.append(p.pid)
        except psutil.Error:
            continue
    return sorted(pids)


def committed(checkpoint_dir: str) -> bool:
    """Ray Train has registered the checkpoint (its manager snapshot names it), not just begun writing it."""
    snapshot = os.path.join(os.path.dirname(checkpoint_dir), "checkpoint_manager_snapshot.json")
    try:
        with open(snapshot) as f:
            return os.path.basename(checkpoint_dir) in f.read()
    except OSError:
        return False


def signal_after_checkpoints(
    plan: list[tuple[str, int]], timeout: float = 300
) -> tuple[threading.Thread, list]:
    """Start a thread that, for each (checkpoint_dir, signal) in turn, waits until Ray Train has committed
    that checkpoint and the workers signalled before are gone, then sends the signal to one training
    worker. The list it returns gets {"pid", "sig", "t_kill"} per signal sent."""
    sent: list[dict[str, Any]] = []

    def watch():
        deadline = time.time() + timeout
        for checkpoint_dir, sig in plan:
            done = {s["pid"] for s in sent}
            while time.time() < deadline:
                pids = [p for p in train_worker_pids() if p not in done]
                if committed(checkpoint_dir) and len(pids) >= 1 and not done & set(train_worker_pids()):
                    try:
                        os.kill(pids[-1], sig)
                    except ProcessLookupError:  # it exited between the listing and the signal: list again
                        continue
                    sent.append({"pid": pids[-1], "sig": sig, "t_kill": time.time()})
                    break
                time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, sent


__all__ = ["history", "signal_after_checkpoints", "tiny_run", "train_worker_pids"]
