"""Cluster benchmarks on one machine; JSON out (default .bench/cluster.json).

    .venv/bin/python benchmarks/cluster.py [--reps 2] [--watch-interval 5] [--train-poll 5]

Each figure comes from a real Ray cluster started in a subprocess (the scenario scripts the tests run):

  * autoscaling (tests/cluster/autoscale_scenario.py, cluster/launcher/local-fake.yaml, Ray's fake
    multi-node provider): a placement group of two 1-CPU bundles on a head with no CPU; seconds from the
    demand to 2 workers alive, to the group being ready, and from its removal to 0 workers (the
    config's idle_timeout_minutes, 6 s, included: reported with and without it);
  * spot notice (tests/cluster/spot_scenario.py --mode notice-late): a 2-worker ZeRO-3 run in steady
    training (its step-40 checkpoint committed) when the metadata server starts serving an AWS
    instance-action; seconds from the notice to
    the watcher's first read, to the drain accepted (`ray drain-node` returned), and to the committed
    just-in-time checkpoint; then from the reclaim of the node to the first resumed step elsewhere. The
    watcher's poll interval and Ray Train's drain poll (RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S) are both
    5 s by default, their defaults;
  * node loss (--mode loss): the spot node's processes are killed right after checkpoint 4 is
    committed; seconds to the first resumed step on the remaining node, broken down like
    benchmarks/train.py's recovery (restart: loss -> loop start on the new workers; process group,
    data, DeepSpeed init, checkpoint load, first step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "tests" / "cluster"


def run_scenario(script: str, out: Path, *args: str) -> dict[str, Any]:
    subprocess.run([sys.executable, str(SCENARIOS / script), str(out), *args], check=True, timeout=1200)
    return json.loads(out.read_text())


def autoscaling(work: Path, reps: int) -> dict[str, Any]:
    runs = []
    for i in range(reps):
        r = run_scenario("autoscale_scenario.py", work / f"autoscale-{i}.json")
        t, idle = r["times"], r["idle_timeout_minutes"] * 60
        runs.append(
            {
                "scale_up_0_to_2_s": t["scaled_up"] - t["demand"],
                "job_running_s": t["job_running"] - t["demand"],
                "scale_down_2_to_0_s": t["scaled_down"] - t["released"],
                "scale_down_past_idle_timeout_s": t["scaled_down"] - t["released"] - idle,
                "worker_counts": [n for _, n in r["timeline"]],
            }
        )
    medians = {k: statistics.median(run[k] for run in runs) for k in runs[0] if k.endswith("_s")}
    return {"idle_timeout_s": idle, "median": medians, "runs": runs}


def resumed_row(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The first row of the last attempt: it carries that attempt's setup times."""
    last = history[-1]["attempt"]
    return next(row for row in history if row["attempt"] == last)


def resume_breakdown(row: dict[str, Any], lost_at: float) -> dict[str, float]:
    return {
        "loss_to_first_resumed_step_s": row["first_step_wall"] - lost_at,
        "restart_s": row["t_loop_start"] - lost_at,
        "process_group_s": row["pg_s"],
        "data_s": row["data_s"],
        "deepspeed_init_s": row["ds_init_s"],
        "checkpoint_load_s": row["ckpt_load_s"],
        "first_step_s": row["step_time_s"],
    }


def spot_notice(work: Path, watch_interval: float, train_poll: float) -> dict[str, Any]:
    # One periodic checkpoint (step 40) to time the notice from, then none before the end: the first
    # checkpoint committed after the notice is the just-in-time one.
    args = ["--mode", "notice-late", "--max-steps", "160", "--every-steps", "40"]
    args += ["--watch-interval", str(watch_interval), "--train-poll", str(train_poll)]
    r = run_scenario("spot_scenario.py", work / "notice.json", *args)
    e, hist = r["events"], r["history"]
    resumed = resumed_row(hist)
    stop_step = resumed["step"] - 1
    return {
        "settings": r["settings"],
        "notice_to_watcher_read_s": e["watcher_first_read"] - e["notice"],
        "notice_to_drain_accepted_s": e["drained"] - e["notice"],
        "notice_to_checkpoint_committed_s": e["checkpoint_committed"] - e["notice"],
        "checkpoint": e["checkpoint"],
        "stop_step": stop_step,  # attempt 0's last step; the resumed run went on from the next one
        "notice_to_stop_step_end_s": hist[stop_step - 1]["t_wall"] - e["notice"],
        "restarts": hist[-1]["attempt"],
        "reclaim": resume_breakdown(resumed, e["node_lost"]),
        "placement": [p["nodes"] for p in r["placement"]],
        "error": r["error"],
    }


def node_loss(work: Path) -> dict[str, Any]:
    r = run_scenario("spot_scenario.py", work / "loss.json", "--mode", "loss", "--max-steps", "40")
    hist = r["history"]
    resumed = resumed_row(hist)
    return {
        **resume_breakdown(resumed, r["events"]["node_lost"]),
        # The steps after the checkpoint are redone; how many ran before the loss is not in the history
        # (a resumed run's history is the checkpoint's), so only where it resumed is reported.
        "resumed_from_step": resumed["step"] - 1,
        "restarts": hist[-1]["attempt"],
        "placement": [p["nodes"] for p in r["placement"]],
        "error": r["error"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / ".bench" / "cluster.json"))
    p.add_argument("--reps", type=int, default=2, help="autoscaling repetitions")
    p.add_argument("--watch-interval", type=float, default=5.0, help="the spot watcher's poll (its default)")
    p.add_argument("--train-poll", type=float, default=5.0, help="Ray Train's drain poll (Ray's default)")
    args = p.parse_args()
    work = Path(os.environ.get("RAYLM_BENCH_DIR", "/tmp/raylm-bench-cluster"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": os.environ.get("RAYLM_MACHINE", "2-core CPU VM, no GPU"),
        "load_average_at_start": os.getloadavg(),
    }
    result["autoscaling"] = autoscaling(work, args.reps)
    result["spot_notice"] = spot_notice(work, args.watch_interval, args.train_poll)
    result["node_loss"] = node_loss(work)
    result["load_average_at_end"] = os.getloadavg()
    result["wall_s"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
