"""Autoscaling on one machine with cluster/launcher/local-fake.yaml (Ray's fake multi-node provider): a
pending job scales the workers from 0 to 2, and back to 0 once they are idle.

The cluster runs in tests/cluster/autoscale_scenario.py, a subprocess with its own RAY_TMPDIR and port,
so the test session's Ray is not disturbed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parents[1] / "cluster" / "launcher" / "local-fake.yaml"


@pytest.mark.slow
def test_pending_job_scales_0_to_2_and_back(tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    out = tmp_path / "autoscale.json"
    subprocess.run(
        [sys.executable, str(HERE / "autoscale_scenario.py"), str(out), "--config", str(CONFIG)],
        check=True,
        timeout=600,
    )
    r = json.loads(out.read_text())
    t, counts = r["times"], [n for _, n in r["timeline"]]
    # 0 workers, then up to max_workers (2) for the job, never more, then 0 again.
    assert config["max_workers"] == 2
    assert counts[0] == 0 and counts[-1] == 0, counts
    assert max(counts) == 2 and t["max_workers_seen"] == 2, counts
    # The job ran on two distinct worker nodes (the head has no CPU to run it).
    assert len(set(r["task_nodes"])) == 2, r["task_nodes"]
    assert t["demand"] < t["scaled_up"] <= t["job_running"] < t["released"] < t["scaled_down"]
    # Workers were removed for being idle, not at once: not before idle_timeout_minutes had passed.
    idle_s = config["idle_timeout_minutes"] * 60
    assert t["scaled_down"] - t["released"] >= 0.8 * idle_s, t
