"""`raylm monitor`: Prometheus for the running Ray cluster, from the Debian `prometheus` package or a binary
the user names. (Ray's own `ray metrics launch-prometheus` downloads Prometheus from the internet.)

It writes a prometheus.yml for the cluster (cluster/monitoring/prometheus.yml with the session's own
service-discovery file and absolute paths to the alert rules), runs Prometheus bound to 127.0.0.1 in the
foreground, prints the URL, and stops it on Ctrl-C. The session is Ray's latest on this machine
(/tmp/ray/session_latest) unless --session-dir names one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from raylm.core.errors import InputError

MONITORING = Path(__file__).resolve().parent / "monitoring"
SD_FILE = (
    "prom_metrics_service_discovery.json"  # ray._private.ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE
)
LATEST_SESSION = "/tmp/ray/session_latest"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--session-dir", help=f"the Ray session to scrape (default: {LATEST_SESSION})")
    p.add_argument("--prometheus", help="the prometheus binary (default: `prometheus` on PATH)")
    p.add_argument("--port", type=int, default=9090, help="port of Prometheus on 127.0.0.1 (default 9090)")
    p.add_argument("--data-dir", help="Prometheus storage (default: <session dir>/raylm_prometheus)")
    p.add_argument("--scrape-interval", default="10s", help="scrape and rule interval (default 10s)")


def session_dir(given: str | None) -> str:
    path = os.path.realpath(given or LATEST_SESSION)
    if not os.path.isdir(path):
        hint = "" if given else " (is Ray running on this machine? `ray start --head`, or pass --session-dir)"
        raise InputError(f"Ray session folder {path} does not exist{hint}")
    if not os.path.isfile(os.path.join(path, SD_FILE)):
        raise InputError(
            f"{path} has no {SD_FILE}: Ray's dashboard writes it, so start Ray with its dashboard "
            "(`ray start --head` does; a local recipe needs ray.include_dashboard=true)"
        )
    return path


def prometheus_binary(given: str | None) -> str:
    found = shutil.which(given or "prometheus")
    if found is None:
        what = given or "`prometheus` on PATH"
        raise InputError(f"{what} not found: `apt-get install prometheus`, or pass --prometheus BIN")
    return found


def write_config(session: str, out_dir: str, scrape_interval: str) -> str:
    """prometheus.yml for this session: the shipped config with the session's discovery file and the
    shipped alert rules by absolute path."""
    cfg = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    cfg["global"] = {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval}
    cfg["rule_files"] = [str(MONITORING / name) for name in cfg["rule_files"]]
    for job in cfg["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            sd["files"] = [os.path.join(session, SD_FILE)]
            sd["refresh_interval"] = scrape_interval
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "prometheus.yml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def main(args: argparse.Namespace) -> int:
    session = session_dir(args.session_dir)
    binary = prometheus_binary(args.prometheus)
    data = args.data_dir or os.path.join(session, "raylm_prometheus")
    config = write_config(session, data, args.scrape_interval)
    command = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={os.path.join(data, 'tsdb')}",
        f"--web.listen-address=127.0.0.1:{args.port}",
    ]
    proc = subprocess.Popen(command)
    print(f"raylm monitor: Prometheus at http://127.0.0.1:{args.port} scraping {session}", flush=True)
    print(f"raylm monitor: config {config}; Ctrl-C stops it", flush=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # Prometheus ignored SIGTERM: its data is flushed on a timer
            proc.kill()
            proc.wait()
            print("raylm monitor: Prometheus did not stop in 30 s; killed", file=sys.stderr)
            return 1
        print("raylm monitor: Prometheus stopped", file=sys.stderr)
        return 0
