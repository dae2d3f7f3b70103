"""Issue 17: raylm stopped by a signal to its process group, and raylm's embedded Ray beside another Ray.

Both run `raylm` as a subprocess in its own session, never in the pytest process (which shares one Ray).

(a) A service manager or container runtime stops a process by sending SIGTERM to its whole process group,
Ray's raylet, GCS and workers included. `raylm serve` used to ask the dead GCS to delete its application
and hang for 60 s; it must now exit within 15 s with 143 and no traceback, leaving no process behind.

(b) With a second Ray on the machine (`ray start --head`, which also records itself in ray_current_cluster),
a raylm training run must start and use its own Ray: Ray Train's placement group cleaner used to fail with
"Found multiple active Ray instances" (or query the other cluster), and ray.init() to join the other Ray.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests
import yaml

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
STOP_WITHIN_S = 15  # the bound; Ctrl-C takes about 6 s
# Warnings Ray logs with a traceback when a 2-core machine is overloaded, saying themselves that they
# are "safe to ignore" (Ray Train's resource request to its autoscaling coordinator, 5 s timeout).
OVERLOAD_WARNINGS = ("Failed to send resource request",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Raylm:
    """`raylm ARGS` in a new session (its own process group), its output collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "raylm.core.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if found := next(filter(None, (re.search(pattern, line) for line in self.lines)), None):
                return found
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r}:\n{self.output()[-4000:]}")

    def output(self) -> str:
        self.reader.join(timeout=5 if self.proc.poll() is not None else 0)
        return "".join(self.lines)


def group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                members.append(p)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def end_group(pgid: int, grace_s: float = 10) -> None:
    """SIGTERM to the whole process group, SIGKILL to whatever is left after grace_s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.5)


def unexpected_tracebacks(output: str) -> list[str]:
    """The lines before each traceback, but for Ray's overload warnings."""
    lines = output.splitlines()
    found = []
    for i, line in enumerate(lines):
        if "Traceback" in line:
            context = "\n".join(lines[max(0, i - 3) : i + 1])
            if not any(w in context for w in OVERLOAD_WARNINGS):
                found.append(context)
    return found


def own_env(**extra: str) -> dict[str, str]:
    """This environment without RAY_ADDRESS, so raylm starts its embedded Ray."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "TOKENIZERS_PARALLELISM": "false", **extra}


def test_sigterm_to_the_process_group_stops_raylm_serve_quickly(tiny_model_dir, tmp_path):
    port = free_port()
    recipe = tmp_path / "serve.yaml"
    serve = {"model": tiny_model_dir, "app_name": "sig", "num_cpus": 1, "http": {"port": port}}
    ray_section = {"num_cpus": 2, "include_dashboard": False}
    recipe.write_text(
        yaml.safe_dump({"name": "sig", "stages": ["serve"], "ray": ray_section, "serve": serve})
    )
    raylm = Raylm(["serve", str(recipe), f"run_dir={tmp_path / 'run'}"], own_env())
    pgid = raylm.proc.pid
    try:
        url = raylm.wait_for(r"raylm: serving 'sig' at (\S+)", timeout=240).group(1)
        assert requests.get(url.removesuffix("/v1") + "/health", timeout=30).status_code == 200
        # Ray's processes are in raylm's process group, so the signal reaches them too.
        assert len(group_members(pgid)) > 3

        start = time.monotonic()
        os.killpg(pgid, signal.SIGTERM)
        code = raylm.proc.wait(timeout=120)
        took = time.monotonic() - start
        output = raylm.output()
        assert code == 143, output[-3000:]
        assert took < STOP_WITHIN_S, f"stopped after {took:.1f} s:\n{output[-3000:]}"
        assert "raylm: interrupted by SIGTERM" in output
        assert "Traceback" not in output, output[-5000:]
        time.sleep(2)  # what Ray's shutdown killed is reaped by now
        assert group_members(pgid) == [], "left behind in raylm's process group"
    finally:
        end_group(pgid)


def start_second_ray(ray_tmpdir: str) -> subprocess.Popen:
    """`ray start --head` in its own session, under RAY_TMPDIR (where raylm's Ray also lives), so that
    its ray_current_cluster is the one raylm would find, without touching the machine's /tmp/ray."""
    log = open(os.path.join(ray_tmpdir, "second-ray.log"), "w")  # noqa: SIM115  (closed with the test)
    cmd = [str(RAY), "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=1"]
    cmd += ["--include-dashboard=false", "--object-store-memory=100000000", "--disable-usage-stats"]
    second = subprocess.Popen(
        cmd,
        env={**own_env(), "RAY_TMPDIR": ray_tmpdir},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address_file = os.path.join(ray_tmpdir, "ray", "ray_current_cluster")
    deadline = time.monotonic() + 120
    while not os.path.exists(address_file) and second.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert os.path.exists(address_file), Path(log.name).read_text()[-3000:]
    return second


def train_recipe(tmp_path: Path, data_dir: str) -> Path:
    model = {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}
    train = {
        "data_dir": data_dir,
        "model": {"from_scratch": model},
        "num_workers": 1,
        "micro_batch_size": 2,
        "global_batch_size": 2,
        "max_steps": 3,
        "eval_every": 3,
        "schedule": {"warmup_steps": 1},
        "cpus_per_worker": 1,
        "deepspeed": {"zero_stage": 0},
        "checkpoint": {"every_steps": 3},
    }
    recipe = {"name": "beside", "stages": ["train"], "ray": {"num_cpus": 2}, "train": train}
    recipe["tracking"] = {"enabled": False}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def ray_session_logs(ray_tmpdir: str, driver_pid: int) -> str:
    """Everything Ray's processes of raylm's session wrote (its session folder ends with the driver's pid)."""
    text = []
    for path in glob.glob(os.path.join(ray_tmpdir, "ray", f"session_*_{driver_pid}", "logs", "*")):
        if os.path.isfile(path):
            text.append(Path(path).read_text(errors="replace"))
    assert text, f"no Ray session of pid {driver_pid} under {ray_tmpdir}"
    return "\n".join(text)


def test_raylm_train_beside_another_ray(tiny_tokenizer_dir, tmp_path):
    from tests.training.conftest import build_curated

    data_dir = build_curated(tiny_tokenizer_dir, tmp_path / "curated")
    ray_tmpdir = tempfile.mkdtemp(prefix="rl17-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    second = start_second_ray(ray_tmpdir)
    raylm = None
    try:
        recipe = train_recipe(tmp_path, data_dir)
        raylm = Raylm(["train", str(recipe), f"run_dir={tmp_path / 'run'}"], own_env(RAY_TMPDIR=ray_tmpdir))
        code = raylm.proc.wait(timeout=300)
        output = raylm.output()
        assert code == 0, output[-5000:]
        assert "started local Ray" in output  # its own Ray, not the one in ray_current_cluster
        assert "multiple active Ray instances" not in output
        assert unexpected_tracebacks(output) == [], output[-5000:]
        # What Ray's workers logged, wherever raylm's console sends it (the cleaner runs in a worker).
        assert "multiple active Ray instances" not in ray_session_logs(ray_tmpdir, raylm.proc.pid)
        assert second.poll() is None  # the other Ray is untouched
    finally:
        if raylm is not None and raylm.proc.poll() is None:
            end_group(raylm.proc.pid)
        end_group(second.pid)  # only the second Ray's group: `ray stop` would stop every Ray here
    assert group_members(second.pid) == []
    shutil.rmtree(ray_tmpdir, ignore_errors=True)
