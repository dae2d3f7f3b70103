"""The Gateway (serving/gateway.py) in front of a replica that really dies (its process exits): a request
is sent once more, then answered 503 with an OpenAI error body; a stream cut mid-way ends with an error
event. The replica behind it is a small deployment with LLMServer's `handle_http` / `handle_http_whole`
protocol (a body that may ask for a stream takes the first, any other the second), so a death can be
placed exactly (before the answer, mid-stream) rather than raced against with a kill."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
import requests

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gateway_url(ray_cluster, loopback_port):
    from ray import serve

    from raylm.serving.gateway import Gateway

    @serve.deployment(ray_actor_options={"num_cpus": 0}, health_check_period_s=1)
    class Mortal:
        """Answers /ok; exits its process before answering /die, and after two chunks of /stream."""

        def __init__(self):
            self.pid = os.getpid()

        async def handle_http(self, meta: dict, body: bytes):
            if meta["path"] != "/die":
                events = meta["path"] == "/stream"
                kind = b"text/event-stream" if events else b"application/json"
                yield {"status": 200, "headers": [(b"content-type", kind)]}
                yield (
                    b"data: 1\n\n"
                    if events
                    else json.dumps({"pid": self.pid, "body": body.decode()}).encode()
                )
                if not events:
                    return
                await asyncio.sleep(1)  # the chunks reach the gateway before the process goes
            os._exit(1)

        async def handle_http_whole(self, meta: dict, body: bytes) -> dict:
            parts = [item async for item in self.handle_http(meta, body)]
            return {**parts[0], "body": b"".join(parts[1:])}

    serve.start(http_options={"host": "127.0.0.1", "port": loopback_port})
    app = Gateway.options(name="Gateway").bind(Mortal.bind(), 1024, 3, ["/ok", "/die", "/stream"])
    serve.run(app, name="gateway", route_prefix="/gw", blocking=False)
    url = f"http://127.0.0.1:{loopback_port}/gw"
    yield url
    serve.shutdown()


def wait_ok(url: str) -> requests.Response:
    for _ in range(120):  # the replica comes back after a death (a few seconds)
        r = requests.post(f"{url}/ok", data=b"hello", timeout=60)
        if r.status_code == 200:
            return r
    raise AssertionError(f"/ok never answered 200: {r.status_code} {r.text[:200]}")


def test_a_request_passes_through_with_its_body(gateway_url):
    r = wait_ok(gateway_url)
    assert r.json()["body"] == "hello" and r.headers["content-type"] == "application/json"


@pytest.mark.parametrize("body", [{}, {"stream": True}], ids=["whole", "streamed"])
def test_a_replica_dying_before_it_answers_gives_503_with_an_openai_error(gateway_url, body):
    wait_ok(gateway_url)
    r = requests.post(f"{gateway_url}/die", json=body, timeout=120)  # both attempts meet a dying replica
    assert r.status_code == 503, r.text[:300]
    assert r.json()["error"]["code"] == "service_unavailable" and r.headers["retry-after"] == "3"


def test_a_replica_dying_mid_stream_ends_the_stream_with_an_error_event(gateway_url):
    wait_ok(gateway_url)
    r = requests.post(f"{gateway_url}/stream", json={"stream": True}, timeout=120)
    assert r.status_code == 200
    events = [line[len("data: ") :] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[0] == "1" and events[-1] == "[DONE]", events
    assert json.loads(events[-2])["error"]["type"] == "server_error", events


def test_a_body_over_the_limit_is_refused_413_by_the_gateway(gateway_url):
    r = requests.post(f"{gateway_url}/ok", data=b"x" * 2048, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
