"""What the fault-injection scenario scripts share: an isolated Ray environment, a multi-node
ray.cluster_utils.Cluster (optionally with GCS fault tolerance on Ray's embedded RocksDB storage), the
processes of a node, waiting, and percentiles.

Every scenario runs as a script in a process of its own (its own RAY_TMPDIR, TMPDIR and ports), so a
pytest session's Ray is never touched; the script writes a JSON of what happened.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def isolated_env(tmp: str, train_poll: float = 1.0) -> None:
    """Before Ray is imported: a Ray temp dir and a TMPDIR of our own (so checkpoint folders that workers
    write through tempfile can be seen), token auth on, CPU DeepSpeed, and Ray Train's drain poll."""
    os.environ["RAY_TMPDIR"] = tmp
    os.makedirs(os.path.join(tmp, "tmp"), exist_ok=True)
    os.environ["TMPDIR"] = os.path.join(tmp, "tmp")
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = str(train_poll)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def gcs_fault_tolerance(storage_dir: str) -> None:
    """GCS fault tolerance without Redis: Ray 2.60's embedded RocksDB store (RAY_gcs_storage=rocksdb)
    keeps the head's metadata on disk, so a killed GCS restarts with the cluster's state."""
    # Ray's config names are case-sensitive: RAY_<name> with the name as in ray_config_def.h.
    os.environ["RAY_gcs_storage"] = "rocksdb"  # noqa: SIM112
    os.environ["RAY_gcs_storage_path"] = storage_dir  # noqa: SIM112


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(head_cpus: int = 0, fixed_gcs_port: bool = False, **head_args: Any):
    """A head (the driver connects to it before any other node exists, so removing a worker node never
    takes the driver's raylet). A restarted GCS must come back on the same port: fixed_gcs_port.
    head_args: more `ray start` arguments for the head (its own temp dir, env_vars, the dashboard)."""
    import ray
    from ray.cluster_utils import Cluster

    head: dict[str, Any] = {"num_cpus": head_cpus, "include_dashboard": False, **head_args}
    if fixed_gcs_port:
        head["gcs_server_port"] = free_port()
    # shutdown_at_exit=False: nodes added from a director thread must not install signal handlers.
    cluster = Cluster(initialize_head=True, head_node_args=head, shutdown_at_exit=False)
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def processes_under(raylet: int, title: str) -> list[int]:
    """Pids of live processes whose command line holds `title` and whose ancestors include `raylet`."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if title not in " ".join(p.info["cmdline"] or []) or p.status() == psutil.STATUS_ZOMBIE:
                continue
            if any(a.pid == raylet for a in p.parents()):
                found.append(p.pid)
        except psutil.Error:
            continue
    return sorted(found)


def restart_gcs(cluster) -> dict[str, float]:
    """SIGKILL the head's GCS, start it again on the same port; times of both and of the first answer."""
    import ray

    t_kill = time.time()
    cluster.head_node.kill_gcs_server()
    t_down = time.time()
    cluster.head_node.start_gcs_server()
    wait_for(lambda: _gcs_answers(ray), 120, "the restarted GCS to answer", poll=0.1)
    return {"t_fault": t_kill, "t_killed": t_down, "t_back": time.time()}


def _gcs_answers(ray) -> bool:
    try:
        return bool(ray.nodes())
    except Exception:
        return False


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


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))  # the smallest value with q% of them at or below
    return ordered[rank - 1]


def summary(faults: list[dict[str, Any]], data_lost: int) -> dict[str, Any]:
    """Faults injected, recovered, data lost, recovery seconds p50/p95 over the recovered faults."""
    seconds = [f["recovery_s"] for f in faults if f.get("recovered")]
    return {
        "faults_injected": len(faults),
        "recovered": len(seconds),
        "data_lost": data_lost,
        "recovery_s_p50": percentile(seconds, 50),
        "recovery_s_p95": percentile(seconds, 95),
    }
