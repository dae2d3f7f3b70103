"""Start or join Ray, the same way for every stage, and stop cleanly on a signal.

`ray job submit` sets RAY_ADDRESS, so a job joins its cluster; a plain `raylm run` on a laptop starts an
embedded local Ray. Ray 2.60 turns on token authentication for a local `ray.init()` (the token lives in
~/.ray/auth_token, or RAY_AUTH_TOKEN); raylm keeps that default, binds the dashboard to localhost, and
puts the embedded Ray's node on 127.0.0.1 so that none of its servers listens on another interface.

Another Ray may run on the same machine (someone's `ray start`, a test session). Ray's own components
find "their" cluster by RAY_ADDRESS, else /tmp/ray/ray_current_cluster, else the only running GCS, and
fail with "Found multiple active Ray instances" when there are several. So the embedded Ray is started
with address="local" (never the one in ray_current_cluster) and its address is exported as RAY_ADDRESS
to this process, its children and every worker of the cluster (export_cluster_address).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from raylm.core.config import RayConfig

log = logging.getLogger("raylm")

RAY_ADDRESS = "RAY_ADDRESS"
# What a service manager or container runtime sends to stop a process (SIGHUP: the terminal closed).
# SIGINT stays Python's KeyboardInterrupt; Ray's processes block it, so Ctrl-C reaches the driver only.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

# The Ray init_ray connected to: its address, whether init_ray started it, RAY_ADDRESS before it.
_session: dict[str, Any] = {}
# Ray settings of the embedded Ray. After a signal to the process group its GCS is gone, and ray.shutdown
# spent 5 s (task_events_shutdown_flush_timeout_ms, default 5000) trying to flush the driver's task
# events to it; 1 s is plenty for a GCS on the same machine, and the events die with the cluster anyway.
SYSTEM_CONFIG = {"task_events_shutdown_flush_timeout_ms": 1000}


class Interrupted(KeyboardInterrupt):
    """A stop signal, raised where Ctrl-C raises KeyboardInterrupt, so that whatever cleans up after
    Ctrl-C (every `finally`, the CLI's `except KeyboardInterrupt`) does so after SIGTERM too."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum  # what a shell reports for a process ended by that signal


def _raise_interrupted(signum: int, frame: Any) -> None:
    # Once: the cleanup that follows is bounded, and a second signal must not cut it short half-way.
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, _already_stopping)
    raise Interrupted(signum)


def _already_stopping(signum: int, frame: Any) -> None:
    log.warning("%s: already stopping", signal.Signals(signum).name)


_OURS = (_raise_interrupted, _already_stopping)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP end the command the way Ctrl-C does (Interrupted, a KeyboardInterrupt), in
    place of Ray's handler (`sys.exit(15)`, installed by ray.init). Restores the previous handlers."""
    handler = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or handler in _OURS:
        yield  # only the main thread may set handlers; an enclosing stop_signals() restores them
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, _raise_interrupted)
    try:
        yield
    finally:
        for stop_signal, handler in previous.items():
            signal.signal(stop_signal, handler)


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


def export_cluster_address() -> None:
    """Ray worker setup hook of the embedded Ray: RAY_ADDRESS names the worker's own cluster.

    Ray's components that look a cluster up instead of using their connection (Ray Train's placement
    group cleaner asks the state API with address=None, say) would otherwise pick another Ray running
    on the machine, or fail with "Found multiple active Ray instances". The workers' environment comes
    from the raylet, started before the address was known, hence a hook rather than an env var."""
    import ray

    os.environ[RAY_ADDRESS] = ray.get_runtime_context().gcs_address


def init_ray(cfg: RayConfig) -> bool:
    """Join or start Ray; returns True when this call connected this process (so ray_session ends it)."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get(RAY_ADDRESS)
    if address:
        ray.init(address=address, log_to_driver=cfg.log_to_driver)
        log.info("joined Ray cluster at %s", address)
        _export_address(address, started=False)
        return True
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with loopback_node():
            info = ray.init(
                address="local",  # a new Ray, never the one `ray start` wrote to /tmp/ray/ray_current_cluster
                num_cpus=cfg.num_cpus,
                include_dashboard=cfg.include_dashboard,
                dashboard_host=cfg.dashboard_host,
                log_to_driver=cfg.log_to_driver,
                runtime_env={"worker_process_setup_hook": f"{__name__}.{export_cluster_address.__name__}"},
                _system_config=SYSTEM_CONFIG,
            )
    except SystemExit as exc:  # ray.init's own SIGTERM handler is `sys.exit(signum)`
        if handler is _raise_interrupted and exc.code == signal.SIGTERM:
            raise Interrupted(signal.SIGTERM) from None
        raise
    if handler is _raise_interrupted:  # ray.init replaced it: put stop_signals' handler back
        signal.signal(signal.SIGTERM, handler)
    _export_address(info.address_info["gcs_address"], started=True)
    dashboard = f", dashboard http://{info.dashboard_url}" if info.dashboard_url else ""
    log.info("started local Ray on 127.0.0.1%s", dashboard)
    return True


def _export_address(address: str, started: bool) -> None:
    """RAY_ADDRESS for this process and the ones it starts; shutdown_ray puts the old value back."""
    _session.update(address=address, started=started, saved=os.environ.get(RAY_ADDRESS))
    os.environ[RAY_ADDRESS] = address


def started_here() -> bool:
    """Whether the Ray this process is connected to was started by it (and so ends with it)."""
    import ray

    return bool(_session.get("started")) and ray.is_initialized()


def shutdown_ray() -> None:
    """Disconnect from Ray (stopping it if this process started it) and put RAY_ADDRESS back."""
    import ray

    ray.shutdown()
    if not _session:
        return
    saved, exported = _session["saved"], _session["address"]
    _session.clear()
    if os.environ.get(RAY_ADDRESS) != exported:
        return  # someone set it since: theirs
    if saved is None:
        del os.environ[RAY_ADDRESS]
    else:
        os.environ[RAY_ADDRESS] = saved


@contextlib.contextmanager
def ray_session(cfg: RayConfig) -> Iterator[None]:
    """Ray for the duration of a command, which SIGTERM and SIGHUP stop like Ctrl-C; shuts down only a
    Ray this process started (from a joined cluster it only disconnects)."""
    with stop_signals():
        owned = init_ray(cfg)
        try:
            yield
        finally:
            if owned:
                shutdown_ray()


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
