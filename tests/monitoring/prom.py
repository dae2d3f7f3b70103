"""A real Prometheus for the monitoring tests: started by `raylm monitor` against the test session's Ray,
queried through its HTTP API."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from raylm.cluster.monitor import SD_FILE

NEEDS_PROMETHEUS = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="prometheus/promtool not installed (CI: apt-get install -y prometheus)",
)


def write_service_discovery(ray) -> str:
    """The session's prom_metrics_service_discovery.json, written by Ray's own writer: the test session's
    Ray runs without a dashboard, which is what writes it on a `ray start` cluster."""
    from ray._private.metrics_agent import PrometheusServiceDiscoveryWriter

    session = ray._private.worker._global_node.get_session_dir_path()
    # temp_dir == session_dir: no link at /tmp/ray/, which other test sessions on this machine may own
    PrometheusServiceDiscoveryWriter(ray.get_runtime_context().gcs_address, session, session).write()
    assert os.path.isfile(os.path.join(session, SD_FILE))
    return session


def render_dashboards(url: str, out: str, start: float) -> list:
    """cluster/monitoring/render.py over this run: the PNGs of docs/monitoring/."""
    import importlib.util

    from raylm.cluster.monitor import MONITORING

    spec = importlib.util.spec_from_file_location("render", MONITORING / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    time.sleep(5)  # the last export and scrape
    return render.render_all(url, out, start, time.time(), rate_interval="15s")


def default_sigint() -> None:
    """The child starts with SIGINT as a shell gives it (deliverable, default action), whatever the test
    process's own mask and disposition have become (a library may block or ignore it; both are inherited
    across exec): the teardown's Ctrl-C once went unanswered in the full suite only."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def signal_masks(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return ", ".join(line for line in status if line.startswith(("State", "SigBlk", "SigIgn", "SigCgt")))


class Prometheus:
    def __init__(self, session: str, port: int, data_dir: str):
        self.url, self.started = f"http://127.0.0.1:{port}", time.time()
        command = ["raylm", "monitor", f"--session-dir={session}", f"--port={port}"]
        command += [f"--data-dir={data_dir}", "--scrape-interval=1s"]
        raylm = os.path.join(os.path.dirname(sys.executable), "raylm")
        # A file, not a pipe nobody reads: a full pipe would block Prometheus's writes (a run's output
        # here is ~4 KiB, so not the cause of the stop timeouts), and the file is there to read on failure.
        self.log = os.path.join(data_dir, "monitor.log")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [raylm, *command[1:]], stdout=out, stderr=subprocess.STDOUT, preexec_fn=default_sigint
            )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                with open(self.log, errors="replace") as f:
                    raise RuntimeError(f"raylm monitor exited: {f.read()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("Prometheus did not become ready")

    def get(self, path: str, **params) -> dict:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> dict[tuple, float]:
        """{sorted label items (without __name__): value} of an instant query."""
        out = {}
        for s in self.get("/api/v1/query", query=expr)["result"]:
            labels = tuple(sorted((k, v) for k, v in s["metric"].items() if k != "__name__"))
            out[labels] = float(s["value"][1])
        return out

    def value(self, expr: str) -> float | None:
        """The one value of an expression aggregated to one series, or None before it has one."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr}: {result}"
        return next(iter(result.values()), None)

    def wait_value(self, expr: str, expected: float, timeout: float = 45, rel: float = 1e-6) -> float:
        """Poll until the expression equals `expected` (Ray exports every few seconds, Prometheus scrapes
        every second); returns the last value seen so a failure shows it."""
        deadline, got = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            got = self.value(expr)
            if got is not None and abs(got - expected) <= rel * max(1.0, abs(expected)):
                return got
            time.sleep(1)
        return got

    def stop(self) -> int:
        """Ctrl-C, as a user stops `raylm monitor`; returns its exit code (on a timeout, says why)."""
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            masks = signal_masks(self.proc.pid)
            self.proc.kill()
            with open(self.log, errors="replace") as f:
                tail = f.read()[-1500:]
            raise AssertionError(f"raylm monitor still running 30 s after Ctrl-C ({masks}): {tail}") from None
