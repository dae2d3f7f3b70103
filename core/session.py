"""Start or join Ray, the same way for every stage.

`ray job submit` sets RAY_ADDRESS, so a job joins its cluster; a plain `raylm run` on a laptop starts an
embedded local Ray. Ray 2.60 turns on token authentication for a local `ray.init()` (the token lives in
~/.ray/auth_token, or RAY_AUTH_TOKEN); raylm keeps that default and binds the dashboard to localhost.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from raylm.core.config import RayConfig

log = logging.getLogger("raylm")


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
    info = ray.init(
        num_cpus=cfg.num_cpus,
        include_dashboard=cfg.include_dashboard,
        dashboard_host=cfg.dashboard_host,
        log_to_driver=cfg.log_to_driver,
    )
    dashboard = f", dashboard http://{info.dashboard_url}" if info.dashboard_url else ""
    log.info("started local Ray%s", dashboard)
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
