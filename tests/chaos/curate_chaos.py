"""Faults injected into a curation run (Ray Data), in a process of its own with its own Ray.

    python tests/chaos/curate_chaos.py OUT.json [--kills 1] [--seed 0] [--docs 400] [--light]

A generated corpus (exact duplicates included) is curated once without faults; then again while a
thread SIGKILLs Ray Data worker processes mid-pipeline (a process running a read, map, filter or write
task, or a map actor), `--kills` of them at seeded random moments. If that run fails, it is run again
(the rerun, with no faults: the staged output of the failed run must not leak into it). --light turns
near dedup off (fewer Ray Data stages: the test's short version; exact dedup still shuffles). The output
folders are then compared file by file: parquet files as tables, everything else byte for byte, and the
manifests without their timings.

OUT.json: the faults (time, pid, process title), whether the faulty run failed and the rerun's
outcome, the differences found, and a summary.
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
from chaos_common import isolated_env, summary

# Ray Data task and actor titles (ray::<name>) that carry the pipeline's data.
DATA_TITLES = ("Read", "Map", "Filter", "Write", "FlatMap", "Repartition", "Aggregate", "Sort", "Shuffle")
SYSTEM_ACTORS = ("_StatsActor", "AutoscalingCoordinator", "UsageCollection", "IDLE", "SplitCoordinator")


def corpus(root: Path, docs: int) -> Path:
    from tests.synthetic import document

    rng = random.Random(7)
    rows = [{"id": f"d{i:04d}", "text": document(rng)} for i in range(docs)]
    rows += [{"id": f"z-copy-{r['id']}", "text": r["text"] + "  \n"} for r in rows[: docs // 10]]
    root.mkdir()
    for part in range(4):
        lines = [json.dumps(r) for r in rows[part::4]]
        (root / f"part-{part}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def config(source: Path, run_dir: Path, light: bool):
    from raylm.core.config import build_config

    data = {"sources": [{"path": str(source)}], "seq_len": 32, "rows_per_shard": 50}
    data |= {"tokenizer": {"vocab_size": 400}, "eval_fraction": 0.1}
    if light:
        data["near_dedup"] = {"enabled": False}
    return build_config({"name": "t", "run_dir": str(run_dir), "data": data})


def data_workers() -> list[tuple[int, str]]:
    """(pid, title) of this Ray's worker processes running a Ray Data task or map actor right now."""
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):  # this Ray's processes only, never another's
        try:
            title = " ".join(p.cmdline())
            if not title.startswith("ray::") or any(s in title for s in SYSTEM_ACTORS):
                continue
            if any(t in title for t in DATA_TITLES) and p.status() != psutil.STATUS_ZOMBIE:
                found.append((p.pid, title[:120]))
        except psutil.Error:
            continue
    return sorted(set(found))


class Killer(threading.Thread):
    """SIGKILLs `kills` data workers, each after a seeded random pause once one is running."""

    def __init__(self, kills: int, rng: random.Random):
        super().__init__(daemon=True)
        self.kills, self.rng = kills, rng
        self.faults: list[dict[str, Any]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while len(self.faults) < self.kills and not self.stop.is_set():
            if self.stop.wait(self.rng.uniform(0.2, 1.5)):
                return
            workers = data_workers()
            while not workers and not self.stop.wait(0.01):
                workers = data_workers()
            if not workers:
                return
            pid, title = self.rng.choice(workers)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.faults.append(
                {"kind": "data_worker_kill", "t_fault": time.time(), "pid": pid, "title": title}
            )


def timed_run(cfg) -> dict[str, Any]:
    from raylm.pipelines.run import run

    t0 = time.time()
    try:
        run(cfg)
        return {"wall_s": time.time() - t0, "t_end": time.time(), "error": None}
    except Exception as exc:
        return {
            "wall_s": time.time() - t0,
            "t_end": time.time(),
            "error": f"{type(exc).__name__}: {exc}"[-1500:],
        }


def scenario(work: Path, args) -> dict[str, Any]:
    import ray

    work.mkdir()
    source = corpus(work / "corpus", args.docs)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        clean_cfg = config(source, work / "clean", args.light)
        chaos_cfg = config(source, work / "chaos", args.light)
        clean = timed_run(clean_cfg)
        killer = Killer(args.kills, random.Random(args.seed))
        killer.start()
        chaos = timed_run(chaos_cfg)
        killer.stop.set()
        killer.join(5)
        rerun = timed_run(chaos_cfg) if chaos["error"] else None
    finally:
        ray.shutdown()
    from check_curate import compare_outputs

    diffs = compare_outputs(clean_cfg.data.output, chaos_cfg.data.output)
    for f in killer.faults:  # recovered: the pipeline (or its rerun) finished with the clean output
        done = (rerun or chaos)["t_end"]
        f["recovered"] = clean["error"] is None and (rerun or chaos)["error"] is None and not diffs
        f["recovery_s"] = done - f["t_fault"] if f["recovered"] else None
    return {
        "seed": args.seed,
        "docs": args.docs,
        "light": args.light,
        "clean": clean,
        "chaos": chaos,
        "rerun": rerun,
        "faults": killer.faults,
        "differences": diffs,
        "summary": summary(killer.faults, len(diffs)),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--kills", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs", type=int, default=400)
    p.add_argument("--light", action="store_true", help="near dedup off: fewer stages, a shorter run")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="rlchaos-", dir="/tmp")
    isolated_env(tmp)
    try:
        result = scenario(Path(tmp) / "work", args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
