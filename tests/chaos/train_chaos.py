"""Faults injected into a real training run on a multi-node ray.cluster_utils.Cluster, in a process of its own.

    python tests/chaos/train_chaos.py OUT.json [--faults node_kill,ckpt_kill,drain,gcs_restart]
        [--seed 0] [--max-steps 16] [--every-steps 2] [--delay-max 2.0]

The cluster: a head with no CPUs (the driver, Ray Train's controller) whose GCS keeps its metadata in
Ray's embedded RocksDB store (GCS fault tolerance), and two 2-CPU worker nodes. The run is
tests/training/train_helpers.tiny_run (2 workers of 1 CPU, ZeRO-3) with every checkpoint kept. First a
fault-free run (the reference), then the same run while a director thread injects, one after another:

  node_kill    a committed checkpoint, a seeded random delay, then the node hosting the training workers
               loses all its processes (SIGKILL); a fresh node replaces it;
  ckpt_kill    the node hosting the workers is killed while a checkpoint is being written (a rank's local
               checkpoint folder, or an uncommitted step folder in storage, exists);
  drain        `ray drain-node` with reason PREEMPTION and a deadline on the workers' node; the node is
               removed once the checkpoint taken after the drain is committed, or at the deadline;
  gcs_restart  the head's GCS is SIGKILLed and started again on the same port.

OUT.json: the faults (kind, times, hit, recovered, recovery seconds), the histories, every committed
checkpoint (when first seen, whether it still exists and reads back), bitwise comparisons with the
reference (losses, final weights), the resume points, and a summary.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chaos_common import (
    gcs_fault_tolerance,
    isolated_env,
    processes_under,
    raylet_pid,
    restart_gcs,
    start_cluster,
    wait_for,
)

KINDS = ("node_kill", "ckpt_kill", "drain", "gcs_restart")
DRAIN_DEADLINE_S = 30


class Director(threading.Thread):
    """Injects the planned faults while the run holds the main thread, and watches Ray Train's
    checkpoint snapshot (every committed step folder and when it was first seen)."""

    def __init__(self, cluster, nodes: list, run_dir: str, plan: list[str], rng: random.Random, delay_max):
        super().__init__(daemon=True)
        self.cluster, self.nodes, self.run_dir, self.plan = cluster, nodes, run_dir, plan
        self.rng, self.delay_max = rng, delay_max
        self.raylets = {raylet_pid(n): n for n in nodes}
        self.seen: dict[str, float] = {}  # committed step folder -> first seen
        self.faults: list[dict[str, Any]] = []
        self.error: str | None = None
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            for kind in self.plan:
                self.wait_new_commit()
                getattr(self, kind)()
        except Exception as exc:  # reported in the JSON; the run ends on its own
            self.error = f"{type(exc).__name__}: {exc}"
        while not self.finished.wait(0.05):
            self.watch()

    def watch(self) -> set[str]:
        from tests.cluster.spot_scenario import committed_steps

        now = time.time()
        for name in committed_steps(self.run_dir):
            self.seen.setdefault(name, now)
        return set(self.seen)

    def wait_new_commit(self) -> None:
        """A checkpoint committed after the previous fault (so the run is past its recovery), then a
        seeded random delay: the next fault lands at a random step."""
        before = self.watch()
        wait_for(lambda: self.watch() - before, 600, "a new committed checkpoint", poll=0.02)
        delay = self.rng.uniform(0, self.delay_max)
        time.sleep(delay)
        self.watch()

    def workers_node(self):
        for pid, node in self.raylets.items():
            if processes_under(pid, "RayTrainWorker"):
                return node
        return None

    def replace(self, node, fault: dict[str, Any]) -> None:
        """Remove the node without grace (its processes SIGKILLed), then bring up a fresh one."""
        fault["t_fault"] = fault.get("t_fault") or time.time()
        fault["committed_at_fault"] = sorted(self.watch())
        self.cluster.remove_node(node, allow_graceful=False)
        self.raylets = {pid: n for pid, n in self.raylets.items() if n is not node}
        fresh = self.cluster.add_node(num_cpus=2)
        self.raylets[raylet_pid(fresh)] = fresh
        self.faults.append(fault)

    def node_kill(self) -> None:
        node = wait_for(self.workers_node, 120, "the training workers' node", poll=0.02)
        self.replace(node, {"kind": "node_kill"})

    def ckpt_kill(self) -> None:
        """Kill as soon as a checkpoint write is seen: a rank's local folder (tempfile, under our TMPDIR)
        or a step folder in storage that Ray Train has not registered yet."""
        local = os.path.join(os.environ["TMPDIR"], "raylm-ckpt-*")

        def writing() -> str | None:
            if glob.glob(local):
                return "local"
            names = {d for d in os.listdir(self.run_dir) if d.startswith("step_")}
            return "storage" if names - self.watch() else None

        where = wait_for(writing, 600, "a checkpoint write", poll=0.005)
        node = self.workers_node()
        self.replace(node, {"kind": "ckpt_kill", "t_fault": time.time(), "during_write": where})

    def drain(self) -> None:
        node = wait_for(self.workers_node, 120, "the training workers' node", poll=0.02)
        fault: dict[str, Any] = {"kind": "drain", "t_fault": time.time(), "deadline_s": DRAIN_DEADLINE_S}
        before = self.watch()
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "drain-node", "--address", self.cluster.address]
        cmd += ["--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "chaos: preemption"]
        cmd += ["--deadline-remaining-seconds", str(DRAIN_DEADLINE_S), "--node-id", node.node_id]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        fault["drain_accepted"] = done.returncode == 0
        fault["drain_output"] = (done.stdout + done.stderr)[-500:]
        deadline = fault["t_fault"] + DRAIN_DEADLINE_S
        while time.time() < deadline and not self.watch() - before:
            time.sleep(0.02)
        fault["checkpoint_before_reclaim"] = sorted(self.watch() - before)
        fault["t_reclaim"] = time.time()
        self.replace(node, fault)

    def gcs_restart(self) -> None:
        fault = {"kind": "gcs_restart", **restart_gcs(self.cluster)}
        fault["committed_at_fault"] = sorted(self.watch())
        self.faults.append(fault)


def train_config(data: str, out: Path, max_steps: int, every: int, max_failures: int):
    from tests.training.train_helpers import tiny_run

    out.mkdir()
    return tiny_run(
        data,
        out,
        max_steps=max_steps,
        checkpoint={
            "every_steps": every,
            "keep_last": max_steps,  # keep every checkpoint: a lost one is then visible
            "max_failures": max_failures,
            "preemption_check_every": 1,
        },
        report_every=every,
    )


def timed_run(cfg) -> dict[str, Any]:
    from raylm.training.run import run

    t0 = time.time()
    try:
        run(cfg)
        return {"wall_s": time.time() - t0, "error": None}
    except Exception as exc:
        return {"wall_s": time.time() - t0, "error": f"{type(exc).__name__}: {exc}"[-2000:]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--faults", default="node_kill,ckpt_kill,drain,gcs_restart")
    p.add_argument("--seed", type=int, default=0, help="seeds the fault delays (the run's own seed is 0)")
    p.add_argument("--max-steps", type=int, default=16)
    p.add_argument("--every-steps", type=int, default=2)
    p.add_argument("--delay-max", type=float, default=2.0, help="most seconds between trigger and fault")
    args = p.parse_args()
    plan = [f for f in args.faults.split(",") if f]
    if unknown := set(plan) - set(KINDS):
        p.error(f"unknown faults {sorted(unknown)}; known: {', '.join(KINDS)}")
    tmp = tempfile.mkdtemp(prefix="rlchaos-", dir="/tmp")  # short: Ray's socket paths live under it
    isolated_env(tmp)
    gcs_fault_tolerance(os.path.join(tmp, "gcs"))
    try:
        result = scenario(Path(tmp) / "work", plan, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def scenario(work: Path, plan: list[str], args) -> dict[str, Any]:
    import ray

    from raylm.training.run import storage_path
    from tests.cluster.spot_scenario import build_data

    work.mkdir()
    data = build_data(work / "data")
    restarts = sum(k != "gcs_restart" for k in plan)
    ref = train_config(data, work / "ref", args.max_steps, args.every_steps, 0)
    cfg = train_config(data, work / "chaos", args.max_steps, args.every_steps, restarts + 2)
    run_dir = os.path.join(storage_path(cfg.train), "run")
    cluster = start_cluster(fixed_gcs_port=True)
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    director = Director(cluster, nodes, run_dir, plan, random.Random(args.seed), args.delay_max)
    try:
        reference = timed_run(ref)
        director.start()
        chaos = timed_run(cfg)
    finally:
        director.finished.set()
        director.join(30)
        ray.shutdown()
        cluster.shutdown()
    from check_train import analyse

    return analyse(ref, cfg, run_dir, reference, chaos, director, plan, args)


if __name__ == "__main__":
    sys.exit(main())
