"""`raylm serve RECIPE`: deploy the model on Ray Serve, print the URL, block until Ctrl-C, SIGTERM or SIGHUP.

Also writes `<run_dir>/serve/serve_config.yaml`, the same application as a Ray Serve config file, so an
operator can run it on a cluster with `serve deploy` (and change batching there through user_config).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Any

import yaml

from raylm.core import outputs, session, storage
from raylm.core.artifacts import SERVE, RunDir
from raylm.core.config import PlatformConfig
from raylm.core.errors import ConfigError, RaylmError
from raylm.serving import vllm_checks
from raylm.serving.config import ServeConfig
from raylm.serving.engine import check_model_dir

log = logging.getLogger("raylm")
# How long stop() waits for Serve to delete the application of a joined cluster.
DELETE_TIMEOUT_S = 10


def serve_dir(cfg: PlatformConfig) -> str:
    return RunDir(cfg.run_dir).serve


def preflight(cfg: PlatformConfig) -> None:
    """Checks that need no Ray: the folder for serve_config.yaml may be written (core/outputs.py), and
    what the engine cannot run (vllm_checks), once the model exists (a train stage of the same run has
    not written it yet: run() checks it again before deploying)."""
    outputs.check_stage_output("run_dir", serve_dir(cfg), SERVE, cfg.run_dir)
    if cfg.serve.model is None or os.path.isfile(os.path.join(cfg.serve.model, "config.json")):
        vllm_checks.check(cfg.serve)


def served_model_id(cfg: PlatformConfig) -> str:
    return cfg.serve.model_id or cfg.name


def api_key_hashes(env_name: str | None) -> list[str]:
    """SHA-256 digests of the keys in $env_name: replicas and config files only ever see digests."""
    from raylm.serving.http import hash_key

    if env_name is None:
        return []
    keys = [k.strip() for k in os.environ.get(env_name, "").split(",") if k.strip()]
    if not keys:
        raise ConfigError(f"serve.http.api_key_env names ${env_name}, but it is unset or empty")
    return [hash_key(k) for k in keys]


def serve_config(cfg: ServeConfig, model_id: str, api_key_sha256: list[str]) -> dict[str, Any]:
    """A Ray Serve config file (for `serve deploy`) describing the same application as `raylm serve`."""
    from raylm.serving.app import DEPLOYMENT_NAME, deployment_options, init_config

    deployment: dict[str, Any] = {"name": DEPLOYMENT_NAME, **deployment_options(cfg)}
    if cfg.engine == "vllm":  # Serve LLM adds the placement group when the application is built
        from raylm.serving.vllm_server import deployment_options as vllm_deployment_options

        deployment = vllm_deployment_options(cfg)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.http.host, "port": cfg.http.port},
        "applications": [
            {
                "name": cfg.app_name,
                "route_prefix": cfg.http.route_prefix,
                "import_path": "raylm.serving.app:build_from_args",
                "args": {"serve": init_config(cfg), "model_id": model_id, "api_key_sha256": api_key_sha256},
                # Listed again so operators can edit them here; user_config changes apply without a restart.
                "deployments": [deployment],
            }
        ],
    }


def write_serve_config(cfg: ServeConfig, model_id: str, api_key_sha256: list[str], path: str) -> str:
    storage.write_text(path, yaml.safe_dump(serve_config(cfg, model_id, api_key_sha256), sort_keys=False))
    return path


def base_url(cfg: ServeConfig) -> str:
    return f"http://{cfg.http.host}:{cfg.http.port}{cfg.http.route_prefix.rstrip('/')}/v1"


def start(cfg: ServeConfig, model_id: str, api_key_sha256: list[str] | None = None) -> str:
    """Deploy on the running Ray (non-blocking) and return the OpenAI base URL."""
    from ray import serve

    from raylm.serving.app import build_app

    check_model_dir(cfg.model)
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    try:
        serve.run(
            build_app(cfg, model_id, api_key_sha256),
            name=cfg.app_name,
            route_prefix=cfg.http.route_prefix,
            blocking=False,
        )
    except RuntimeError as exc:  # Serve gave up on the replicas (after its constructor retries)
        cause = startup_failure(cfg.app_name) or str(exc)
        serve.delete(cfg.app_name)
        raise RaylmError(
            f"serve: the {cfg.engine} engine's replicas failed to start: {cause} (the replicas' logs: "
            "`ray logs` or the dashboard's Serve tab)"
        ) from None
    return base_url(cfg)


def startup_failure(app_name: str) -> str | None:
    """The exception a failed replica constructor raised, from Serve's deployment status (its message
    ends with the replica's traceback); None when Serve says nothing more specific."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    for deployment in app.deployments.values() if app else []:
        lines = [line.strip() for line in (deployment.message or "").splitlines() if line.strip()]
        errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
        if errors:
            return errors[-1]
    return None


def run(cfg: PlatformConfig) -> None:
    """Serve cfg.serve until interrupted. Ray is already initialised by the CLI."""
    sc = cfg.serve
    if storage.is_remote(sc.model):
        raise ConfigError(
            f"serve.model must be a local folder, got {sc.model} (copy the export to local disk)"
        )
    check_model_dir(sc.model)
    vllm_checks.check(sc)
    model_id = served_model_id(cfg)
    hashes = api_key_hashes(sc.http.api_key_env)
    preflight(cfg)  # again: run() is also called without the CLI
    outputs.claim_run_dir(cfg.run_dir, serve_dir(cfg))
    outputs.claim(serve_dir(cfg), SERVE)
    config_path = write_serve_config(sc, model_id, hashes, RunDir(cfg.run_dir).serve_config)
    url = start(sc, model_id, hashes)
    print(f"raylm: serving '{model_id}' at {url} (OpenAI API; Ctrl-C to stop)", flush=True)
    print(f"raylm: Ray Serve config for `serve deploy`: {config_path}", flush=True)
    with session.stop_signals():  # also when run() is called without the CLI
        try:
            while True:
                time.sleep(3600)
        finally:
            stop(sc.app_name)


def stop(app_name: str) -> None:
    """Take this application down, and only it: on a shared cluster other Serve applications keep running
    (serve.shutdown() would end them too).

    On a Ray this process started there is nothing to delete: ray.shutdown ends the application with the
    cluster. Asking Serve would even hang there after a SIGTERM to the process group (what a container
    runtime or a service manager sends): Ray's GCS, raylet and workers share the group and are gone, and
    the driver waits for the GCS for 60 s before Ray aborts it. On a joined cluster the delete is bounded
    for the same reason (its processes may share the group), and a delete that does not finish is said.
    """
    from ray import serve

    if session.started_here():
        return
    deleting = threading.Thread(target=serve.delete, args=(app_name,), name="serve-delete", daemon=True)
    deleting.start()
    deleting.join(DELETE_TIMEOUT_S)
    if deleting.is_alive():
        log.warning(
            "serve: application '%s' not confirmed deleted after %d s (is the cluster up?); check with "
            "`serve status` and remove it with `serve delete %s`",
            app_name,
            DELETE_TIMEOUT_S,
            app_name,
        )
