"""Fault injection, the longer run: more faults at seeded random moments; JSON out (default .bench/chaos.json).

    .venv/bin/python benchmarks/chaos.py [--seed 0] [--only train,serve,curate] [--out .bench/chaos.json]

Each scenario is one of tests/chaos/'s scripts (the ones the tests run with few faults), in a
subprocess with its own multi-node Ray cluster:

  * train: a 2-worker ZeRO-3 run on a 3-node ray.cluster_utils.Cluster with GCS fault tolerance (Ray's
    embedded RocksDB store), `--train-faults` faults shuffled by the seed: worker-node kills at random
    steps, kills during a checkpoint write, preemption drains with a deadline, GCS kill + restart.
    Data lost: committed checkpoints lost or unreadable afterwards; also recorded: every resume from the
    last committed step, losses and final weights bitwise equal to a fault-free run;
  * serve: 2 replicas under `--clients` concurrent clients, replica SIGKILLs and GCS restarts. Data
    lost: failed requests that were not in flight at a replica kill; failures are also classified
    (clean OpenAI-style 5xx, other status, hang, connection error);
  * curate: Ray Data worker processes SIGKILLed mid-pipeline; data lost: files of the output (or its
    rerun) that differ from a clean run's.

Per scenario: faults injected, recovered, data lost, recovery seconds p50 / p95 (train: fault to the
first resumed step, GCS: kill to the GCS answering; serve: kill to all replicas running and a request
served; curate: kill to the pipeline's (or rerun's) end with the clean output).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tests" / "chaos"
TRAIN_MIX = [
    "node_kill",
    "node_kill",
    "node_kill",
    "ckpt_kill",
    "ckpt_kill",
    "drain",
    "gcs_restart",
    "gcs_restart",
]


def run_script(script: str, out: Path, *args: str) -> dict[str, Any]:
    t0 = time.time()
    subprocess.run([sys.executable, str(SCRIPTS / script), str(out), *args], check=True, timeout=3000)
    result = json.loads(out.read_text())
    result["script_wall_s"] = time.time() - t0
    return result


def train(work: Path, seed: int, faults: int) -> dict[str, Any]:
    plan = [TRAIN_MIX[i % len(TRAIN_MIX)] for i in range(faults)]
    random.Random(seed).shuffle(plan)
    steps = 8 + 4 * faults  # room for every fault after a fresh commit
    r = run_script(
        "train_chaos.py",
        work / "train.json",
        "--faults",
        ",".join(plan),
        "--seed",
        str(seed),
        "--max-steps",
        str(steps),
        "--every-steps",
        "2",
    )
    checks = {
        "run_error": r["chaos"]["error"],
        "director_error": r["director_error"],
        "all_steps_once": [row["step"] for row in r["history"]] == list(range(1, steps + 1)),
        "resumes_from_last_committed": all(x["from_step"] == x["last_committed"] for x in r["resumes"]),
        "losses_bitwise_equal": r["losses_equal"],
        "final_weights_bitwise_equal": r["weights_equal"],
        "lost_checkpoints": r["lost_checkpoints"],
        "corrupt_checkpoints": r["corrupt_checkpoints"],
        "committed_checkpoints": len(r["checkpoints"]),
    }
    return {"summary": r["summary"], "by_kind": by_kind(r["faults"]), "checks": checks, "raw": r}


def serve(work: Path, seed: int, kills: int, restarts: int, clients: int) -> dict[str, Any]:
    r = run_script(
        "serve_chaos.py",
        work / "serve.json",
        "--replica-kills",
        str(kills),
        "--gcs-restarts",
        str(restarts),
        "--clients",
        str(clients),
        "--seed",
        str(seed),
        "--settle-s",
        "5",
    )
    checks = {k: r[k] for k in ("requests", "outcomes", "unexplained_failures", "unclean_failures")}
    return {"summary": r["summary"], "by_kind": by_kind(r["faults"]), "checks": checks, "raw": r}


def curate(work: Path, seed: int, kills: int) -> dict[str, Any]:
    r = run_script("curate_chaos.py", work / "curate.json", "--kills", str(kills), "--seed", str(seed))
    checks = {
        "faulty_run_error": r["chaos"]["error"],
        "rerun_error": (r["rerun"] or {}).get("error"),
        "reran": r["rerun"] is not None,
        "differences": r["differences"],
    }
    return {"summary": r["summary"], "checks": checks, "raw": r}


def by_kind(faults: list[dict[str, Any]]) -> dict[str, Any]:
    """Faults injected / recovered / recovery seconds per kind of fault (data lost is per scenario)."""
    sys.path.insert(0, str(SCRIPTS))
    from chaos_common import summary

    kinds = sorted({f["kind"] for f in faults})
    return {k: summary([f for f in faults if f["kind"] == k], 0) for k in kinds}


def table(results: dict[str, Any]) -> str:
    """The summaries as a Markdown table (for BENCHMARKS.md), one row per scenario and fault kind."""
    rows = [
        "| scenario | fault | injected | recovered | data lost | recovery s p50 | p95 |",
        "|---|---|---|---|---|---|---|",
    ]

    def fmt(x: Any) -> str:
        return "-" if x is None else f"{x:.1f}" if isinstance(x, float) else str(x)

    for name, r in results["scenarios"].items():
        parts = [("all", r["summary"]), *r.get("by_kind", {}).items()]
        for kind, s in parts:
            lost = s["data_lost"] if kind == "all" else ""
            cells = [
                name,
                kind,
                s["faults_injected"],
                s["recovered"],
                lost,
                s["recovery_s_p50"],
                s["recovery_s_p95"],
            ]
            rows.append("| " + " | ".join(fmt(c) for c in cells) + " |")
    return "\n".join(rows) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="train,serve,curate")
    p.add_argument("--train-faults", type=int, default=8)
    p.add_argument("--replica-kills", type=int, default=4)
    p.add_argument("--gcs-restarts", type=int, default=2)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--curate-kills", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / ".bench" / "chaos.json"))
    args = p.parse_args()
    out = Path(args.out)
    work = out.parent / "chaos-work"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"seed": args.seed, "date": time.strftime("%Y-%m-%d"), "scenarios": {}}
    wanted = args.only.split(",")
    runs = {
        "train": lambda: train(work, args.seed, args.train_faults),
        "serve": lambda: serve(work, args.seed, args.replica_kills, args.gcs_restarts, args.clients),
        "curate": lambda: curate(work, args.seed, args.curate_kills),
    }
    for name in [n for n in runs if n in wanted]:
        results["scenarios"][name] = runs[name]()
        out.write_text(json.dumps(results, indent=1))  # after each: a later failure keeps what ran
        print(name, json.dumps(results["scenarios"][name]["summary"]), flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
