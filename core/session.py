"""Start or join Ray, the same way for every stage.

`ray job submit` sets RAY_ADDRESS, so a job joins its cluster; a plain `raylm run` on a laptop starts an
embedded local Ray. Ray 2.60 turns on token authentication for a local `ray.init()` (the token lives in
~/.ray/auth_token, or RAY_AUTH_TOKEN); raylm keeps that default, binds the dashboard to localhost, and
puts the embedded Ray's node on 127.0.0.1 so that none of its servers listens on another interface.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator

from raylm.core.config import RayConfig

log = logging.getLogger("raylm")


@contextlib.contextmanager
def loopback_node() -> Iterator[None]:
    """While Ray starts a local node, make it resolve the node's IP to 127.0.0.1.

    Ray binds its gRPC servers (GCS, raylet, every worker), the dashboard agent, the runtime env agent
    and the metrics servers to loopback when the node IP is a loopback address, and to every interface
    otherwise. `ray.init(_node_ip_address="127.0.0.1")` is not enough: ray.init rewrites a loopback
    address to the machine's external IP (services.resolve_ip_for_localhost). Ray resolves it to
    127.0.0.1 itself when ray_constants.ENABLE_RAY_CLUSTER is off, which is its default on macOS and
    Windows (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER); that flag is read once at import, so it is switched
    here for the duration of ray.init only. Once a node runs, Ray asks it for its IP instead.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def init_ray(cfg: RayConfig) -> bool:
    """Join or start Ray; returns True when this call started (and so owns) the Ray instance."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=cfg.log_to_driver)
        log.info("joined Ray cluster at %s", address)
        return True
    with loopback_node():
        info = ray.init(
            num_cpus=cfg.num_cpus,
            include_dashboard=cfg.include_dashboard,
            dashboard_host=cfg.dashboard_host,
            log_to_driver=cfg.log_to_driver,
        )
    dashboard = f", dashboard http://{info.dashboard_url}" if info.dashboard_url else ""
    log.info("started local Ray on 127.0.0.1%s", dashboard)
    return True


@contextlib.contextmanager
def ray_session(cfg: RayConfig) -> Iterator[None]:
    """Ray for the duration of a command; shuts down only a Ray this process started."""
    import ray

    owned = init_ray(cfg)
    try:
        yield
    finally:
        if owned:
            ray.shutdown()


@contextlib.contextmanager
def sigint_restored() -> Iterator[None]:
    """Ray Train and Ray Tune install a SIGINT handler for their run and leave it in place afterwards
    (Tune's then only "ends the Tune run" on Ctrl-C). Restoring the previous one keeps Ctrl-C working
    for the stages that follow in the same command: `raylm run` serves after training and tuning."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)
