"""Autoscaling on one machine: Ray's fake multi-node provider, driven by cluster/launcher/local-fake.yaml.

    python tests/cluster/autoscale_scenario.py OUT.json [--config cluster/launcher/local-fake.yaml]

Starts a head the way local-fake.yaml says (RAY_FAKE_CLUSTER=1, `ray start --head --num-cpus=0
--autoscaling-config=...`, token auth), on a free port and under a RAY_TMPDIR of its own so that it
touches no other Ray on the machine. Then a job that is pending for lack of CPUs: a placement group of two
1-CPU bundles (what Ray Train reserves for 2 workers) and a task in each. The autoscaler launches
workers (each a raylet process of 1 CPU); once the tasks have run the group is removed, and the idle
workers are terminated after idle_timeout_minutes. OUT.json gets the worker count over time, the nodes the tasks ran
on, and the times of: demand, 2 workers up, release, 0 workers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "cluster" / "launcher" / "local-fake.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    import ray._private.services

    return ray._private.services.get_node_ip_address()


def write_config(src: Path, dst: Path, gcs_address: str) -> dict[str, Any]:
    """The launcher file as it is, but for the GCS address: the fake provider assumes port 6379
    unless provider.gcs_address names another, and 6379 may be taken on a shared machine."""
    config = yaml.safe_load(src.read_text())
    config["provider"]["gcs_address"] = gcs_address
    dst.write_text(yaml.safe_dump(config))
    return config


def start_head(config_path: Path, port: int, log: Path) -> subprocess.Popen:
    """`ray start --head --block`: the command local-fake.yaml documents, kept in the foreground so
    that ending this one process stops the head's services."""
    head = yaml.safe_load(config_path.read_text())["available_node_types"]["ray.head.default"]
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}"]
    cmd += [f"--num-cpus={head['resources'].get('CPU', 0)}", "--object-store-memory=200000000"]
    cmd += [f"--autoscaling-config={config_path}", "--include-dashboard=false"]
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def connect(address: str, timeout: float = 120):
    import ray

    deadline = time.time() + timeout
    while True:
        try:
            return ray.init(address=address, log_to_driver=False)
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def workers_alive() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"] and "node:__internal_head__" not in n["Resources"])


class Timeline:
    """The worker count, sampled every `every` seconds while waiting for a condition."""

    def __init__(self, every: float = 0.25):
        self.every, self.samples = every, []

    def wait(self, done, timeout: float, what: str) -> float:
        deadline = time.time() + timeout
        while time.time() < deadline:
            count = workers_alive()
            if not self.samples or self.samples[-1][1] != count:
                self.samples.append((time.time(), count))
            if done(count):
                return time.time()
            time.sleep(self.every)
        raise TimeoutError(f"{what}: still {self.samples[-1][1]} workers after {timeout:.0f} s")


def pending_job(timeline: Timeline, max_workers: int) -> dict[str, Any]:
    """A placement group of two 1-CPU bundles, as Ray Train reserves its workers (PACK), then a task in
    each bundle. The head has no CPU and a worker one, so it needs two workers. Returns the events'
    times and the nodes the tasks ran on."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote(num_cpus=1)
    def where() -> str:
        return ray.get_runtime_context().get_node_id()

    t = {"zero_at_start": timeline.wait(lambda n: n == 0, 60, "no worker at the start")}
    t["demand"] = time.time()
    group = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")
    t["scaled_up"] = timeline.wait(lambda n: n >= 2, 180, "scale-up to 2 workers")
    ray.get(group.ready(), timeout=180)
    t["job_running"] = time.time()
    nodes = ray.get(
        [
            where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, i)).remote()
            for i in range(2)
        ],
        timeout=180,
    )
    remove_placement_group(group)
    t["released"] = time.time()
    t["scaled_down"] = timeline.wait(lambda n: n == 0, 180, "scale-down to 0 workers")
    t["max_workers_seen"] = max(n for _, n in timeline.samples)
    return {"times": t, "task_nodes": nodes, "max_workers": max_workers}


def kill_leftovers(tmp: str) -> list[int]:
    """Processes of this cluster still alive (every Ray process names its session folder under tmp)."""
    import psutil

    killed = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and any(tmp in arg for arg in p.info["cmdline"] or []):
                p.kill()
                killed.append(p.pid)
        except psutil.Error:
            continue
    return killed


def scenario(config: Path, tmp: str) -> dict[str, Any]:
    import ray

    port = free_port()
    cfg_path = Path(tmp) / "autoscaler.yaml"
    cfg = write_config(config, cfg_path, f"{node_ip()}:{port}")
    head = start_head(cfg_path, port, Path(tmp) / "head.log")
    timeline = Timeline()
    try:
        t0 = time.time()
        connect(f"{node_ip()}:{port}")
        head_up_s = time.time() - t0
        result = pending_job(timeline, cfg["max_workers"])
    finally:
        ray.shutdown()
        head.terminate()
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
        leftovers = kill_leftovers(tmp)
    result["times"]["head_up_s"] = head_up_s
    result["timeline"] = timeline.samples
    result["idle_timeout_minutes"] = cfg["idle_timeout_minutes"]
    result["leftover_processes_killed"] = len(leftovers)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--config", type=Path, default=CONFIG)
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="rlauto-", dir="/tmp")  # short: Ray's socket paths live under it
    os.environ.update(RAY_TMPDIR=tmp, RAY_AUTH_MODE="token")
    try:
        result = scenario(args.config, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
