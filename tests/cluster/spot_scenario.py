"""A spot reclaim on a real multi-node Ray cluster (ray.cluster_utils.Cluster), in a process of its own.

    python tests/cluster/spot_scenario.py OUT.json [--mode notice|notice-late|loss] [--watch-interval S]
        [--train-poll S] [--max-steps N] [--every-steps N]

Nodes: a head with no CPUs (the driver, Ray Train's controller), a "spot" node with 2 CPUs, and, right
before the notice (or the loss), a "standby" node with 2 CPUs (what an autoscaler would bring up).
The run is tests/training/train_helpers.tiny_run (2 workers of 1 CPU, ZeRO-3), so it starts on the spot
node. Then:

  notice  a local IMDSv2 server starts serving an AWS instance-action; `python -m raylm.cluster.spot`
          (the node-side watcher) reads it and drains the spot node; the loop checkpoints at its next step
          boundary, the spot node is removed once that checkpoint is committed (the reclaim), and the run
          resumes on the standby node;
  notice-late  the same, but the notice comes once the first periodic checkpoint is committed (in
          steady training);
  loss    once the first periodic checkpoint is committed, the spot node is removed without notice
          (SIGKILL of its processes): Ray Train restarts the run from the latest committed checkpoint
          on the standby node.

OUT.json gets the run's history (steps, attempts, checkpoint flags, sample digests), the expected sample
digests, which node hosted the training workers of each attempt, and the event times. The cluster runs
under its own RAY_TMPDIR, so it never touches another Ray on the machine (a test session's, say).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
IMDS_TOKEN = "raylm-test-imds-token"


# ---- the metadata server ---------------------------------------------------------------------------


class Imds(ThreadingHTTPServer):
    """AWS's instance metadata service as far as the watcher uses it: IMDSv2 tokens and instance-action
    (404 until `action` is set)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ImdsHandler)
        self.action: dict[str, str] | None = None
        self.first_served: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ImdsHandler(BaseHTTPRequestHandler):
    server: Imds

    def do_PUT(self) -> None:
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self.answer(200, IMDS_TOKEN)
        else:
            self.answer(400, "bad token request")

    def do_GET(self) -> None:
        if self.headers.get("X-aws-ec2-metadata-token") != IMDS_TOKEN:
            self.answer(401, "")
        elif self.path != "/latest/meta-data/spot/instance-action" or self.server.action is None:
            self.answer(404, "Not Found")
        else:
            self.server.first_served = self.server.first_served or time.time()
            self.answer(200, json.dumps(self.server.action))

    def answer(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:  # quiet
        pass


# ---- where the training workers run ----------------------------------------------------------------


def raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def worker_nodes(raylets: dict[int, str]) -> list[str]:
    """Names of the nodes whose raylet (pid -> name) is an ancestor of a live RayTrainWorker process."""
    import psutil

    found = set()
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "RayTrainWorker" not in " ".join(p.info["cmdline"] or []) or p.status() == "zombie":
                continue
            found |= {raylets[a.pid] for a in p.parents() if a.pid in raylets}
        except psutil.Error:
            continue
    return sorted(found)


# ---- the scenario ----------------------------------------------------------------------------------


def committed_steps(run_dir: str) -> list[str]:
    """Checkpoint folders Ray Train has registered (its manager snapshot names them)."""
    try:
        with open(os.path.join(run_dir, "checkpoint_manager_snapshot.json")) as f:
            text = f.read()
    except OSError:
        return []
    names = [d for d in os.listdir(run_dir) if d.startswith("step_")]
    return sorted(n for n in names if n in text)


def wait_for(predicate, timeout: float, what: str, each=None, poll: float = 0.05):
    """predicate()'s first truthy value, calling each() between polls."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if each is not None:
            each()
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def start_watcher(imds: Imds, cluster, node, interval: float, log_path: str) -> subprocess.Popen:
    """The node-side watcher, as worker_start_ray_commands starts it (plus the node it runs for: every
    node of this test cluster shares one machine, so "the node this runs on" would be ambiguous)."""
    cmd = [sys.executable, "-m", "raylm.cluster.spot", "--provider", "aws", "--endpoint", imds.url]
    cmd += ["--interval", str(interval), "--address", cluster.address, "--node-id", node.node_id]
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


class Director(threading.Thread):
    """The events, while the training run fits in the main thread: the standby node, then the notice (or
    nothing), then the reclaim of the spot node. It also samples, every half second,
    which nodes host the training workers."""

    def __init__(self, cluster, spot, run_dir: str, mode: str, imds: Imds, interval: float, work: Path):
        super().__init__(daemon=True)
        self.cluster, self.run_dir, self.mode, self.imds = cluster, run_dir, mode, imds
        self.interval, self.work = interval, work
        self.nodes = {"spot": spot}
        self.raylets = {raylet_pid(spot): "spot"}  # read now: a removed node forgets its processes
        self.events: dict[str, Any] = {}
        self.placement: list[dict[str, Any]] = []
        self.error: str | None = None
        self.watcher: subprocess.Popen | None = None
        self.finished = threading.Event()  # set by the main thread once the run has returned
        self._sampled = 0.0

    def run(self) -> None:
        try:
            self.direct()
            while not self.finished.wait(0.5):
                self.sample()
        except Exception as exc:  # reported in the JSON; the training run ends on its own
            self.error = f"{type(exc).__name__}: {exc}"

    def sample(self) -> None:
        if time.time() - self._sampled < 0.5:
            return
        self._sampled = time.time()
        nodes = worker_nodes(self.raylets)
        if nodes and (not self.placement or self.placement[-1]["nodes"] != nodes):
            self.placement.append({"t": time.time(), "nodes": nodes})

    def committed(self) -> set[str]:
        return set(committed_steps(self.run_dir))

    def direct(self) -> None:
        """notice: as soon as the training workers run on the spot node (the notice then lands during
        setup or the first steps, well before the run could end); notice-late and loss: once the
        first periodic checkpoint is committed, in steady training (the run must then be long enough to
        outlast the watcher's and Ray Train's polls)."""
        watcher = None
        if self.mode.startswith("notice"):
            log = str(self.work / "watcher.log")
            watcher = start_watcher(self.imds, self.cluster, self.nodes["spot"], self.interval, log)
            self.watcher = watcher
        if self.mode == "notice":
            wait_for(lambda: self.placement, 600, "training workers on the spot node", self.sample)
        else:
            wait_for(self.committed, 600, "the first checkpoint", self.sample)
        self.nodes["standby"] = self.cluster.add_node(num_cpus=2)
        self.raylets[raylet_pid(self.nodes["standby"])] = "standby"
        self.events["standby_up"] = time.time()
        if watcher is not None:
            self.notice(watcher, self.committed())
        self.events["node_lost"] = time.time()
        self.cluster.remove_node(self.nodes["spot"], allow_graceful=False)

    def notice(self, watcher: subprocess.Popen, before: set[str]) -> None:
        """Serve the instance-action, wait for the watcher's drain and the checkpoint that follows."""
        reclaim = time.time() + 120  # AWS's two minutes
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(reclaim))
        self.imds.action = {"action": "terminate", "time": when}
        self.events["notice"] = time.time()
        wait_for(lambda: watcher.poll() is not None, 120, "the drain", self.sample)
        self.events["drained"] = time.time()
        self.events["watcher_exit_code"] = watcher.returncode
        self.events["watcher_first_read"] = self.imds.first_served
        new = wait_for(lambda: self.committed() - before, 300, "the checkpoint after the notice", self.sample)
        self.events["checkpoint_committed"] = time.time()
        self.events["checkpoint"] = min(new)


def start_cluster():
    """Head, this driver (connected before any other node exists, so it is the head's: removing the
    spot node must not take the driver's raylet with it), then the spot node."""
    import ray
    from ray.cluster_utils import Cluster

    # shutdown_at_exit=False: nodes added later from the director's thread must not install signal
    # handlers (only the main thread may); scenario() shuts the cluster down itself.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False},
        shutdown_at_exit=False,
    )
    ray.init(address=cluster.address, log_to_driver=False)
    spot = cluster.add_node(num_cpus=2)
    return cluster, spot


def build_data(work: Path) -> str:
    """The training tests' tiny curated folder: a tokenizer trained on generated text, packed shards."""
    import random

    from raylm.pipelines.tokenize import train_tokenizer
    from tests.synthetic import sample_text
    from tests.training.conftest import build_curated

    work.mkdir()
    rng = random.Random(0)
    tok = train_tokenizer(iter([sample_text(rng, 60) for _ in range(400)]), vocab_size=512, min_frequency=2)
    tok.save_pretrained(work / "tokenizer")
    return build_curated(str(work / "tokenizer"), work / "curated")


def expected_digests(cfg) -> list[str]:
    """The sample digest of every step of an uninterrupted run (training/data.py's GlobalSampler)."""
    from raylm.training.data import GlobalSampler, TokenShards

    rows = len(TokenShards.open(cfg.train.data_dir, "train"))
    sampler = GlobalSampler(rows, cfg.train.global_batch_size, cfg.seed)
    return [sampler.digest(step) for step in range(cfg.train.max_steps)]


def scenario(work: Path, mode: str, interval: float, max_steps: int, every: int) -> dict[str, Any]:
    import ray

    from raylm.training.run import run, storage_path
    from tests.training.train_helpers import history, tiny_run

    (work / "run").mkdir()  # run_dir holds raylm's outputs only
    # Ray Train reports (a barrier costing about a second each) every 4 steps, not every step as in the
    # SIGTERM test: a drain reaches the loop through get_preemption_info, checked every step.
    cfg = tiny_run(
        build_data(work / "data"),
        work / "run",
        max_steps=max_steps,
        checkpoint={"every_steps": every, "preemption_check_every": 1},
        report_every=4,
    )
    run_dir = os.path.join(storage_path(cfg.train), "run")
    cluster, spot = start_cluster()
    imds = Imds()
    threading.Thread(target=imds.serve_forever, daemon=True).start()
    director = Director(cluster, spot, run_dir, mode, imds, interval, work)
    try:
        director.start()
        t0 = time.time()
        run(cfg)
        wall = time.time() - t0
    finally:
        director.finished.set()
        director.join(10)
        if director.watcher is not None and director.watcher.poll() is None:  # no drain happened
            director.watcher.kill()
        ray.shutdown()
        cluster.shutdown()
        imds.shutdown()
    return {
        "mode": mode,
        "wall_s": wall,
        "history": history(cfg),
        "expected_digests": expected_digests(cfg),
        "events": director.events,
        "placement": director.placement,
        "error": director.error,
        "watcher_log": (work / "watcher.log").read_text()[-3000:] if mode != "loss" else "",
    }


def isolated_env(tmp: str, train_poll: float) -> None:
    """Before Ray is imported: a Ray temp dir of our own (sessions and the current-cluster file), token
    auth on, CPU DeepSpeed, and how often Ray Train polls Ray Core for drains."""
    os.environ["RAY_TMPDIR"] = tmp
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = str(train_poll)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--mode", choices=["notice", "notice-late", "loss"], default="notice")
    p.add_argument("--watch-interval", type=float, default=0.5, help="the watcher's poll interval")
    p.add_argument("--train-poll", type=float, default=1.0, help="RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S")
    p.add_argument("--max-steps", type=int, default=16)
    p.add_argument("--every-steps", type=int, default=4, help="periodic checkpoint interval")
    args = p.parse_args()
    # Short: Ray's unix socket paths live under it and must stay below ~107 characters.
    tmp = tempfile.mkdtemp(prefix="rlspot-", dir="/tmp")
    isolated_env(tmp, args.train_poll)
    work = Path(tmp) / "work"
    work.mkdir()
    try:
        result = scenario(work, args.mode, args.watch_interval, args.max_steps, args.every_steps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["settings"] = {"watch_interval_s": args.watch_interval, "train_poll_s": args.train_poll}
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
