"""Faults injected into Ray Serve under load, on a multi-node ray.cluster_utils.Cluster, in a process of
its own.

    python tests/chaos/serve_chaos.py OUT.json [--replica-kills 1] [--gcs-restarts 1] [--clients 6]
        [--seed 0] [--settle-s 3]

The cluster: a head with no CPUs (driver, Serve controller, the one HTTP proxy) whose GCS keeps its
metadata in Ray's embedded RocksDB store, and one 4-CPU node for the replicas. raylm's Serve application
(serving/app.py, a tiny random-init Llama) runs with 2 replicas while `--clients` threads send
/v1/completions requests back to back. Faults, one after another with a seeded pause between them:

  replica_kill  SIGKILL of one replica's process; recovered once the deployment has 2 running replicas
                again (a new one in the dead one's place) and a request succeeds;
  gcs_restart   the head's GCS SIGKILLed and started again on the same port; recovered once it answers
                and a request succeeds.

OUT.json: every request (start, end, status, body head, replica pid if served), the faults (times,
the killed pid, recovery seconds), and a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chaos_common import (
    free_port,
    gcs_fault_tolerance,
    isolated_env,
    processes_under,
    raylet_pid,
    restart_gcs,
    start_cluster,
    wait_for,
)

APP = "chaos"
REQUEST_TIMEOUT_S = 60  # a request still open after this long counts as a hang


class Load(threading.Thread):
    """One client: completions back to back until stopped; every request is recorded."""

    def __init__(self, url: str, log: list, stop: threading.Event, index: int):
        super().__init__(daemon=True)
        self.url, self.log, self.stop, self.index = url, log, stop, index

    def run(self) -> None:
        import requests

        body = {"model": "tiny", "prompt": f"client {self.index} says", "max_tokens": 4}
        while not self.stop.is_set():
            row: dict[str, Any] = {"client": self.index, "t_start": time.time()}
            try:
                r = requests.post(self.url, json=body, timeout=REQUEST_TIMEOUT_S)
                row.update(status=r.status_code, body=r.text[:400])
            except requests.Timeout:
                row.update(status=None, body="timeout (hang)")
            except requests.RequestException as exc:
                row.update(status=None, body=f"{type(exc).__name__}: {exc}"[:400])
            row["t_end"] = time.time()
            self.log.append(row)


def replica_pids(raylet: int) -> list[int]:
    return processes_under(raylet, f"ServeReplica:{APP}:LLMServer")


def healthy(client, url: str, replicas: int, raylet: int, gone: int | None = None) -> bool:
    """The deployment reports `replicas` running, none of them the killed process, and a request works."""
    import requests

    pids = replica_pids(raylet)
    if len(pids) != replicas or gone in pids:
        return False
    try:
        status = client.get_serve_details()["applications"][APP]["deployments"]["LLMServer"]
        running = [r for r in status["replicas"] if r["state"] == "RUNNING"]
        if status["status"] != "HEALTHY" or len(running) != replicas:
            return False
        body = {"model": "tiny", "prompt": "probe", "max_tokens": 1}
        return requests.post(url, json=body, timeout=10).status_code == 200
    except Exception:
        return False


def deploy(model_dir: str, port: int) -> str:
    """raylm's application (serving/app.py's build_app) with 2 replicas behind one proxy on the head (on
    one machine, a proxy per node would fight over the port)."""
    from ray import serve

    from raylm.serving.app import build_app
    from raylm.serving.config import ServeConfig

    cfg = ServeConfig(model=model_dir, app_name=APP, num_replicas=2, http={"port": port})
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    serve.run(build_app(cfg, "tiny", []), name=APP, route_prefix="/", blocking=False)
    return f"http://127.0.0.1:{port}/v1/completions"


def build_model(work: Path) -> str:
    from raylm.pipelines.tokenize import train_tokenizer
    from tests.conftest import build_tiny_llama
    from tests.synthetic import sample_text

    rng = random.Random(0)
    tok = train_tokenizer(iter([sample_text(rng, 60) for _ in range(400)]), vocab_size=512, min_frequency=2)
    tok.save_pretrained(work / "tokenizer")
    return build_tiny_llama(str(work / "tokenizer"), work / "model")


def inject(kind: str, cluster, client, url: str, raylet: int, rng: random.Random) -> dict[str, Any]:
    if kind == "gcs_restart":
        fault: dict[str, Any] = {"kind": kind, **restart_gcs(cluster)}
    else:
        pid = rng.choice(replica_pids(raylet))
        fault = {"kind": kind, "pid": pid, "t_fault": time.time()}
        os.kill(pid, signal.SIGKILL)
    gone = fault.get("pid")
    try:
        wait_for(lambda: healthy(client, url, 2, raylet, gone), 180, "serving to recover", poll=0.1)
        fault.update(recovered=True, recovery_s=time.time() - fault["t_fault"])
    except TimeoutError:
        fault.update(recovered=False, recovery_s=None)
    return fault


def scenario(work: Path, args) -> dict[str, Any]:
    import ray
    from ray import serve

    work.mkdir()
    model = build_model(work)
    cluster = start_cluster(fixed_gcs_port=True)
    node = cluster.add_node(num_cpus=4)
    raylet = raylet_pid(node)
    log: list[dict[str, Any]] = []
    stop = threading.Event()
    faults: list[dict[str, Any]] = []
    rng = random.Random(args.seed)
    plan = ["replica_kill"] * args.replica_kills + ["gcs_restart"] * args.gcs_restarts
    rng.shuffle(plan)
    try:
        url = deploy(model, free_port())
        client = serve.context._get_global_client()
        wait_for(lambda: healthy(client, url, 2, raylet), 300, "2 healthy replicas", poll=0.2)
        clients = [Load(url, log, stop, i) for i in range(args.clients)]
        for c in clients:
            c.start()
        for kind in plan:
            time.sleep(args.settle_s + rng.uniform(0, args.settle_s))
            faults.append(inject(kind, cluster, client, url, raylet, rng))
        time.sleep(args.settle_s)
        stop.set()
        for c in clients:
            c.join(REQUEST_TIMEOUT_S + 5)
    finally:
        stop.set()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
    from check_serve import analyse

    return analyse(log, faults, plan, args)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--replica-kills", type=int, default=1)
    p.add_argument("--gcs-restarts", type=int, default=1)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settle-s", type=float, default=3.0, help="load before, between and after faults")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="rlchaos-", dir="/tmp")
    isolated_env(tmp)
    gcs_fault_tolerance(os.path.join(tmp, "gcs"))
    try:
        result = scenario(Path(tmp) / "work", args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
