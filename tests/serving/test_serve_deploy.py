"""The generated Ray Serve config file: it deploys as `serve deploy` would, and a batching change made in
its user_config reaches the running replica in place (same process, no model reload)."""

from __future__ import annotations

import copy
import time

import pytest
import requests

from raylm.serving.config import ServeConfig
from raylm.serving.run import serve_config

pytestmark = pytest.mark.slow


def wait_running(client, name: str) -> None:
    client._wait_for_application_running(name, timeout_s=180)


def test_generated_config_deploys_and_reconfigures_in_place(ray_cluster, tiny_model_dir, loopback_port):
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    cfg = ServeConfig(
        model=tiny_model_dir,
        app_name="fromfile",
        http={"port": loopback_port},
        batching={"max_batch_size": 8, "batch_wait_timeout_s": 0.01},
    )
    config = serve_config(cfg, "tiny", [])
    serve.start(http_options=config["http_options"])
    client = serve.context._get_global_client()
    try:
        client.deploy_apps(ServeDeploySchema.model_validate(config))
        wait_running(client, "fromfile")
        url = f"http://127.0.0.1:{loopback_port}/v1/completions"
        answer = requests.post(url, json={"model": "tiny", "prompt": "the road", "max_tokens": 3}, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1

        handle = serve.get_deployment_handle("LLMServer", app_name="fromfile")
        before = handle.stats.remote().result()
        assert before["max_batch_size"] == 8
        changed = copy.deepcopy(config)
        changed["applications"][0]["deployments"][0]["user_config"] = {
            "max_batch_size": 3,
            "batch_wait_timeout_s": 0.02,
        }
        client.deploy_apps(ServeDeploySchema.model_validate(changed))
        wait_running(client, "fromfile")
        deadline = time.monotonic() + 60  # the update is applied asynchronously by the controller
        while (after := handle.stats.remote().result())[
            "max_batch_size"
        ] != 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert (after["max_batch_size"], after["batch_wait_timeout_s"]) == (3, 0.02)
        assert after["pid"] == before["pid"]  # reconfigure() ran in place: no new replica, no reload
    finally:
        serve.shutdown()
