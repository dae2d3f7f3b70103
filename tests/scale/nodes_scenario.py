"""Curation and a 2-worker ZeRO-3 training run on a 3-node ray.cluster_utils.Cluster, in a process of its own.

    python tests/scale/nodes_scenario.py OUT.json CORPUS SANDBOX [--max-steps 8]

The cluster: a head with no CPUs (the driver, Ray Train's controller) and two worker nodes with one CPU
each, exactly what one training worker asks for, so every task runs on a worker node and the two training
workers run on different nodes. Every node has a folder of its own, SANDBOX/nodes/<node>/{home,tmp,ray}
(its HOME, TMPDIR and Ray temp dir); the driver runs on the head with the head's folder and a working
directory (SANDBOX/cwd) that is not the storage folder. The run's storage, the stand-in for shared
storage, is SANDBOX/storage (curated/ and train/ inside it).

Nothing may assume a shared local disk: after the stages, the working directory, every HOME and every
TMPDIR must be as they were (a snapshot before and after), and audit/sitecustomize.py (on PYTHONPATH of
every process) must have recorded no access to another node's folder and no write outside the sandbox.

OUT.json: node ids by name, the nodes that ran curation tasks and the training workers (Ray's state
API), the training history, the snapshot differences, the audit records, wall times and errors.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "chaos"))
from chaos_common import free_port, isolated_env, start_cluster  # noqa: E402  (also puts the repo root on sys.path)

NODES = ("head", "w1", "w2")
TORCH_EXTENSIONS = ".cache/torch_extensions"
CANARY = "canary-from-w1"


def node_dirs(sandbox: Path, node: str) -> dict[str, str]:
    base = sandbox / "nodes" / node
    dirs = {"home": base / "home", "tmp": base / "tmp", "ray": base / "ray"}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    return {k: str(v) for k, v in dirs.items()}


def seed_home(home: str, real_home: str) -> None:
    """The node's image: DeepSpeed's CPU communication op already built (DeepSpeed JIT-builds it into
    ~/.cache/torch_extensions on first use; a minute or two per node on 2 cores). Copied from this
    machine's build when there is one; otherwise each node builds its own."""
    built = os.path.join(real_home, TORCH_EXTENSIONS)
    if os.path.isdir(built):
        shutil.copytree(built, os.path.join(home, TORCH_EXTENSIONS), symlinks=True)


def node_args(sandbox: Path, node: str, cpus: int) -> dict[str, Any]:
    """A node's Ray arguments: its CPUs, its own Ray temp dir, and HOME / TMPDIR / audit identity for its
    raylet (every worker process of the node inherits them)."""
    d = node_dirs(sandbox, node)
    env = {"HOME": d["home"], "TMPDIR": d["tmp"], "RAYLM_SCALE_NODE": node}
    return {"num_cpus": cpus, "temp_dir": d["ray"], "env_vars": env}


def enter_head(sandbox: Path):
    """This process is the driver on the head: the head's folder, the audit hook, a private cwd."""
    d = node_dirs(sandbox, "head")
    isolated_env(os.path.dirname(d["ray"]))  # RAY_TMPDIR (<it>/ray), TMPDIR (<it>/tmp), token auth, CPU
    # torch sets this in every process that imports torch._dynamo, to a folder under that process's temp
    # dir: inherited from the pytest process, it would send every node's cache to the machine's /tmp.
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    os.environ |= {"HOME": d["home"], "RAYLM_SCALE_NODE": "head"}
    # The cluster's token, as `ray start` on several machines would share it: a fresh HOME holds none.
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    os.environ |= {"RAYLM_SCALE_SANDBOX": str(sandbox), "PYTHONPATH": str(HERE / "audit")}
    (sandbox / "audit").mkdir(exist_ok=True)
    (sandbox / "cwd").mkdir(exist_ok=True)
    os.chdir(sandbox / "cwd")
    sys.path.insert(0, str(HERE / "audit"))
    import sitecustomize  # installs the audit hook in this process

    sitecustomize.AUDITOR.active = False  # on while the stages run; starting nodes is the harness's job
    return sitecustomize.AUDITOR


def start_nodes(sandbox: Path):
    head = node_args(sandbox, "head", 0) | {"include_dashboard": True, "dashboard_port": free_port()}
    cluster = start_cluster(head.pop("num_cpus"), **head)
    workers = [cluster.add_node(**node_args(sandbox, n, 1)) for n in NODES[1:]]
    return cluster, dict(zip(NODES, [cluster.head_node, *workers], strict=True))


def snapshot(roots: list[str]) -> dict[str, int]:
    """Every file below the roots, with its size."""
    found = {}
    for root in roots:
        for d, _, names in os.walk(root):
            for p in (os.path.join(d, n) for n in names):
                if os.path.isfile(p):  # not the sockets of live processes (multiprocessing's listeners)
                    found[p] = os.path.getsize(p)
    return found


def watched(sandbox: Path) -> list[str]:
    """The folders no stage may leave anything in: the cwd, and every node's HOME and TMPDIR."""
    roots = [str(sandbox / "cwd")]
    return roots + [str(sandbox / "nodes" / n / k) for n in NODES for k in ("home", "tmp")]


def nodes_of(names: dict[str, str], node_ids) -> dict[str, int]:
    """How many of the given node ids belong to each node (names: node id -> name)."""
    out: dict[str, int] = {}
    for node_id in node_ids:
        out[names.get(node_id, str(node_id))] = out.get(names.get(node_id, str(node_id)), 0) + 1
    return out


def timed(fn, *args) -> dict[str, Any]:
    t0 = time.time()
    try:
        fn(*args)
        return {"wall_s": round(time.time() - t0, 1), "error": None}
    except Exception as exc:
        return {"wall_s": round(time.time() - t0, 1), "error": f"{type(exc).__name__}: {exc}"[-2000:]}


def stages(corpus: str, storage: Path, max_steps: int, names: dict[str, str], address: str) -> dict[str, Any]:
    """Curate, then train on the curated output; each followed by where its work ran (Ray's state API
    at this cluster's address: without one it picks the latest Ray on the machine, maybe another's)."""
    from ray.util.state import list_actors, list_tasks

    from raylm.pipelines.run import run as curate
    from raylm.training.run import run as train
    from tests.scale.scale_common import curate_config, train_config
    from tests.training.train_helpers import history

    out: dict[str, Any] = {}
    cfg = curate_config(corpus, storage)
    out["curate"] = timed(curate, cfg)
    finished = [("state", "=", "FINISHED")]
    tasks = list_tasks(address, filters=finished, limit=10_000, raise_on_missing_output=False)
    # Ray Data's read / map / shuffle tasks and raylm's own (the tokenizer); not the calls to Ray Data's
    # bookkeeping actors, which live on the head.
    tasks = [t for t in tasks if t.type == "NORMAL_TASK"]
    out["curate"]["task_nodes"] = nodes_of(names, [t.node_id for t in tasks])
    tcfg = train_config(cfg.data.output, storage, max_steps)
    out["train"] = timed(train, tcfg)
    workers = [("class_name", "=", "RayTrainWorker")]
    actors = list_actors(address, filters=workers, raise_on_missing_output=False)
    out["train"]["worker_nodes"] = sorted(nodes_of(names, [a.node_id for a in actors]))
    out["train"]["history"] = history(tcfg) if out["train"]["error"] is None else []
    return out


def canary(sandbox: Path, names: dict[str, str]) -> None:
    """A task on w1 that opens a file in the head's TMPDIR: the audit must record it (the hook is live in
    the worker processes of the worker nodes), and the test tells it apart by its name."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    w1 = next(node_id for node_id, name in names.items() if name == "w1")
    path = str(sandbox / "nodes" / "head" / "tmp" / CANARY)

    @ray.remote(num_cpus=1, scheduling_strategy=NodeAffinitySchedulingStrategy(w1, soft=False))
    def touch() -> None:
        with open(path, "w") as f:
            f.write("a path only the head has")
        os.remove(path)

    ray.get(touch.remote())


def audit_records(sandbox: Path) -> list[dict[str, Any]]:
    records = []
    for log in sorted((sandbox / "audit").glob("*.jsonl")):
        node = log.name.split("-")[0]
        records += [json.loads(line) | {"node": node} for line in log.read_text().splitlines()]
    return records


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("corpus")
    p.add_argument("sandbox", help="a new folder, short (Ray's socket paths live under it)")
    p.add_argument("--max-steps", type=int, default=8)
    args = p.parse_args()
    sandbox, real_home = Path(args.sandbox), os.path.expanduser("~")
    auditor = enter_head(sandbox)
    for node in NODES:
        seed_home(node_dirs(sandbox, node)["home"], real_home)
    (sandbox / "storage").mkdir()
    import ray

    before = snapshot(watched(sandbox))
    cluster, nodes = start_nodes(sandbox)
    names = {node.node_id: name for name, node in nodes.items()}
    try:
        auditor.active = True
        result = stages(args.corpus, sandbox / "storage", args.max_steps, names, cluster.address)
        canary(sandbox, names)
    finally:
        auditor.active = False
        ray.shutdown()
        cluster.shutdown()
    after = snapshot(watched(sandbox))
    result |= {
        "node_ids": {name: node_id for node_id, name in names.items()},
        "audit": audit_records(sandbox),
    }
    result["left_behind"] = sorted(set(after) - set(before))
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
