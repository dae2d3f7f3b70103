"""The embedded Ray that raylm starts for a local run listens on loopback only.

A subprocess starts Ray exactly as `raylm run` does (core/session.py init_ray), runs a task so that a
worker process exists, and lists the listening sockets (TCP listeners, bound UDP sockets) of its whole
process tree with psutil, sampling a few times because the metrics servers start a little later. The
session's Ray fixture is not involved. The README's security section lists the same table.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

# Listeners allowed on another interface, each documented in the README's security section. raylm's
# embedded Ray needs none: every server Ray starts for a local node can bind to loopback.
DOCUMENTED_NON_LOOPBACK: set[str] = set()

SCRIPT = r"""
import json, time
import psutil, ray
from raylm.core.config import RayConfig
from raylm.core.session import init_ray

init_ray(RayConfig(num_cpus=1, log_to_driver=False))
ray.get(ray.remote(lambda: 1).remote())  # a worker process, with its own gRPC server
me = psutil.Process()
seen = {}
for _ in range(8):  # the dashboard's and autoscaler's metrics servers start a few seconds after init
    for p in [me, *me.children(recursive=True)]:
        try:
            name = p.name()
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN or (c.type == 2 and c.laddr):  # 2: SOCK_DGRAM
                    seen[f"{c.laddr.ip}:{c.laddr.port}"] = name
        except psutil.Error:
            pass  # a worker that ended between listing and reading
    time.sleep(1)
print("SOCKETS " + json.dumps(seen))
ray.shutdown()
"""


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # gRPC shows IPv4 listeners as ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def embedded_ray_sockets() -> dict[str, str]:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=180,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},  # start a Ray, join none
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SOCKETS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("SOCKETS "))


def test_embedded_ray_listens_on_loopback_only():
    sockets = embedded_ray_sockets()
    names = set(sockets.values())
    # the sockets were really seen: the GCS, the raylet and the dashboard all listen
    assert {"gcs_server", "raylet"} <= names, sockets
    assert len(sockets) >= 6, sockets
    exposed = {
        address: name
        for address, name in sockets.items()
        if not is_loopback(address.rsplit(":", 1)[0]) and address not in DOCUMENTED_NON_LOOPBACK
    }
    assert exposed == {}, f"listening on a non-loopback address: {exposed}"
