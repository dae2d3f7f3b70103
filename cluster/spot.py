"""Spot interruption watcher: turn a cloud's reclaim notice into a Ray node drain.

Runs on each spot (preemptible) worker node, started after `ray start` by the cluster YAML's
worker_start_ray_commands:

    python -m raylm.cluster.spot --provider aws|gcp [--endpoint URL] [--interval S]

It polls the instance metadata server for an interruption notice:

    aws  PUT  {endpoint}/latest/api/token (IMDSv2 session token), then
         GET  {endpoint}/latest/meta-data/spot/instance-action   404 until a notice, then
              {"action": "terminate" | "stop" | "hibernate", "time": "2026-11-28T12:00:00Z"}
    gcp  GET  {endpoint}/computeMetadata/v1/instance/preempted (Metadata-Flavor: Google)
              "FALSE" until the VM is preempted, then "TRUE"; GCE stops the VM about 30 s later

and, on a notice, drains this node through Ray with reason DRAIN_NODE_REASON_PREEMPTION and the reclaim
time as the deadline. Ray then schedules nothing new on the node, and Ray Train's preemption watcher
reports the drain to the workers (ray.train.get_preemption_info()); training/runtime.py reads that at a
step boundary, every rank takes a checkpoint, and the run restarts on the remaining nodes from it.

The drain goes through Ray's `ray drain-node` command (ray/scripts/scripts.py), the one entry point
Ray 2.60 offers for it (hidden from `ray --help`; it calls GcsClient.drain_node, as Ray's autoscaler
does). `--endpoint` is the metadata server's root, so tests point it at a local HTTP server.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from raylm.core.errors import ConfigError, RaylmError

log = logging.getLogger("raylm.spot")

AWS_ENDPOINT = "http://169.254.169.254"
AWS_TOKEN_PATH = "/latest/api/token"
AWS_NOTICE_PATH = "/latest/meta-data/spot/instance-action"
AWS_TOKEN_TTL_S = 300  # a token per poll would do; one that lasts a few polls saves a round trip
GCP_ENDPOINT = "http://metadata.google.internal"
GCP_NOTICE_PATH = "/computeMetadata/v1/instance/preempted"
GCP_NOTICE_S = 30  # GCE stops a preempted spot / preemptible VM about 30 s after the notice
DRAIN_REASON = "DRAIN_NODE_REASON_PREEMPTION"
HTTP_TIMEOUT_S = 2.0  # the metadata server is link-local: a slow answer means it is not there


class NoticeError(RaylmError):
    """The metadata server answered something that is not an interruption notice."""


class DrainError(RaylmError):
    """Ray did not accept the drain request."""


@dataclass(frozen=True)
class Notice:
    """An interruption notice: why (the drain's reason message) and when the node goes (epoch seconds)."""

    reason: str
    deadline: float


# ---- reading the notice ----------------------------------------------------------------------------


def http(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, str]:
    """(status, body) of one request; an HTTP error status is an answer, not an exception."""
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def parse_aws(body: str) -> Notice:
    """AWS's instance-action document: the action and its UTC time become the reason and deadline."""
    try:
        doc = json.loads(body)
        action, when = str(doc["action"]), str(doc["time"])
        deadline = datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()
    except (ValueError, KeyError, TypeError) as exc:
        raise NoticeError(f"unreadable AWS instance-action {body[:200]!r}: {exc}") from None
    return Notice(f"aws spot instance-action: {action} at {when}", deadline)


def parse_gcp(body: str, now: float) -> Notice | None:
    """GCE's `preempted` flag: TRUE means the VM stops in about GCP_NOTICE_S seconds from now."""
    flag = body.strip().upper()
    if flag == "FALSE":
        return None
    if flag != "TRUE":
        raise NoticeError(f"unexpected GCE preempted value {body[:200]!r}")
    return Notice(
        f"gcp preemption notice (instance/preempted=TRUE, about {GCP_NOTICE_S} s)", now + GCP_NOTICE_S
    )


def aws_notice(endpoint: str) -> Notice | None:
    """IMDSv2: a session token first, then the instance-action document (404 while there is none)."""
    status, token = http(
        endpoint + AWS_TOKEN_PATH, "PUT", {"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_S)}
    )
    if status != 200:
        raise NoticeError(f"IMDSv2 token request to {endpoint} answered {status}")
    status, body = http(endpoint + AWS_NOTICE_PATH, headers={"X-aws-ec2-metadata-token": token})
    if status == 404:
        return None
    if status != 200:
        raise NoticeError(f"{endpoint}{AWS_NOTICE_PATH} answered {status}")
    return parse_aws(body)


def gcp_notice(endpoint: str) -> Notice | None:
    status, body = http(endpoint + GCP_NOTICE_PATH, headers={"Metadata-Flavor": "Google"})
    if status != 200:
        raise NoticeError(f"{endpoint}{GCP_NOTICE_PATH} answered {status}")
    return parse_gcp(body, time.time())


PROVIDERS: dict[str, tuple[str, Callable[[str], Notice | None]]] = {
    "aws": (AWS_ENDPOINT, aws_notice),
    "gcp": (GCP_ENDPOINT, gcp_notice),
}


# ---- draining the node -----------------------------------------------------------------------------


def drain_command(notice: Notice, address: str, node_id: str | None, now: float) -> list[str]:
    """`ray drain-node` for this notice. Without node_id the command drains the node it runs on."""
    remaining = max(1, int(notice.deadline - now))  # whole seconds; 0 would mean "no deadline"
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "drain-node", "--address", address]
    cmd += ["--reason", DRAIN_REASON, "--reason-message", notice.reason]
    cmd += ["--deadline-remaining-seconds", str(remaining)]
    return cmd + (["--node-id", node_id] if node_id else [])


def drain(notice: Notice, address: str = "auto", node_id: str | None = None) -> None:
    """Ask Ray to drain the node; raises DrainError when Ray refuses or cannot be reached."""
    # Without --node-id the command finds "this node" by connecting a driver; RAY_ADDRESS makes that
    # driver join this cluster ("auto": the one `ray start` recorded on this node) and never start one.
    env = dict(os.environ, RAY_ADDRESS=address)
    cmd = drain_command(notice, address, node_id, time.time())
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if result.returncode != 0:
        raise DrainError(f"ray drain-node exited {result.returncode}: {result.stderr.strip()[-600:]}")


# ---- the watch loop --------------------------------------------------------------------------------


def watch(
    provider: str,
    endpoint: str | None = None,
    interval: float = 5.0,
    address: str = "auto",
    node_id: str | None = None,
) -> Notice:
    """Poll until a notice arrives, drain the node, and return the notice. A metadata server that does
    not answer is logged and polled again: a reclaim must not go unseen because of one bad poll."""
    root, read_notice = PROVIDERS[provider]
    root = (endpoint or root).rstrip("/")
    log.info("watching %s interruption notices at %s every %.1f s", provider, root, interval)
    while True:
        try:
            notice = read_notice(root)
        except (OSError, NoticeError) as exc:  # URLError and timeouts are OSErrors
            log.warning("interruption notice poll failed: %s", exc)
            notice = None
        if notice is not None:
            return drain_until_accepted(notice, address, node_id, interval)
        time.sleep(interval)


def drain_until_accepted(notice: Notice, address: str, node_id: str | None, interval: float) -> Notice:
    """Drain, retrying every `interval` until Ray accepts or the reclaim time has passed."""
    log.warning("%s: draining this Ray node", notice.reason)
    while True:
        try:
            drain(notice, address, node_id)
            log.warning("drain accepted; deadline in %.0f s", notice.deadline - time.time())
            return notice
        except (DrainError, subprocess.TimeoutExpired) as exc:
            if time.time() + interval >= notice.deadline:
                raise DrainError(f"node not drained before its reclaim: {exc}") from None
            log.warning("drain failed, retrying in %.1f s: %s", interval, exc)
            time.sleep(interval)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m raylm.cluster.spot",
        description="Drain this Ray node when the cloud announces a spot interruption.",
    )
    p.add_argument("--provider", required=True, choices=sorted(PROVIDERS), help="cloud whose notice to read")
    p.add_argument("--endpoint", help="metadata server root (default: the provider's link-local server)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between polls (default 5)")
    p.add_argument("--address", default="auto", help="Ray GCS address (default: the node's cluster)")
    p.add_argument("--node-id", help="hex id of the Ray node to drain (default: the node this runs on)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s raylm-spot %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    args = parser().parse_args(argv)
    try:
        if not args.interval > 0:
            raise ConfigError(f"--interval must be a positive number of seconds, got {args.interval}")
        watch(args.provider, args.endpoint, args.interval, args.address, args.node_id)
    except RaylmError as exc:
        print(f"raylm-spot: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
