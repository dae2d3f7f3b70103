"""`raylm serve` as `ray job submit` runs it: joined to a running cluster, stopped by SIGTERM (what
`ray job stop` sends). It must exit and take its application down with it, and only its own: on a
cluster a Serve application outlives the driver that started it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_stops_raylm_serve_and_deletes_only_its_application(
    ray_cluster, tiny_model_dir, loopback_port, tmp_path
):
    from ray import serve

    recipe = tmp_path / "stop.yaml"
    serve_section = {"model": tiny_model_dir, "app_name": "stopme", "num_cpus": 1}
    serve_section["http"] = {"host": "127.0.0.1", "port": loopback_port}
    recipe.write_text(yaml.safe_dump({"name": "stopme", "stages": ["serve"], "serve": serve_section}))
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
        "RAY_AUTH_MODE": "token",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "raylm.core.cli", "serve", str(recipe), f"run_dir={tmp_path / 'run'}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url, deadline, seen = None, time.monotonic() + 240, []
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            seen.append(line)
            if found := re.search(r"serving 'stopme' at (\S+)", line):
                url = found.group(1)
        assert url, "raylm serve never printed its URL:\n" + "".join(seen[-30:])
        other = serve.status().applications.keys() - {"stopme"}  # whatever else the cluster serves
        assert requests.get(url.removesuffix("/v1") + "/health", timeout=30).status_code == 200

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143  # 128 + SIGTERM, the CLI's exit code for a stop signal
        assert "stopme" not in serve.status().applications
        assert serve.status().applications.keys() >= other
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        serve.shutdown()  # the controller and proxy (on this test's port) stay up otherwise
