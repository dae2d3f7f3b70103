"""The HTTP ingress in front of the model replicas: it answers for a replica that is lost.

Ray Serve's proxy answers a request whose replica died with a plain-text `500 Internal Server Error`
(ray/serve/_private/http_util.py maps RayActorError to 500 and sends no body of ours). So HTTP reaches a
`Gateway` deployment first (no CPUs: it only awaits), which hands the raw request to an `LLMServer`
replica through a DeploymentHandle, as Ray Serve LLM's OpenAiIngress does, and streams the answer back:

- the replica dies before it answered: the request is sent once more (to a live replica; nothing has
  reached the client yet), then answered 503 + Retry-After with an OpenAI error body;
- the replica dies mid-stream: an SSE error event and `data: [DONE]` end the stream (its 200 is sent);
- the replicas' queues are full (max_queued_requests): 503 + Retry-After with an OpenAI error body.

LLMServer keeps every route, its parsing, authentication and errors (app.py): the gateway forwards
bytes and knows nothing of the API.
"""

import json
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from raylm.core import metrics
from raylm.serving import api

log = logging.getLogger("raylm")
GATEWAY_NAME = "Gateway"
REPLICA_LOST = (RayActorError, DeploymentUnavailableError)
ATTEMPTS = 2  # a request whose replica died before answering is sent once more
# A gateway replica only awaits handles: it may hold many requests, and the model replicas' own
# max_ongoing_requests / max_queued_requests bound the work (their overflow is answered 503 here).
GATEWAY_MAX_ONGOING = 4096
# A body without these bytes cannot ask for a stream (an escaped "stream" inside a prompt reads \"stream\"):
# its answer comes back in one reply. A body with them takes the streaming path, which answers any request.
STREAM_KEY = b'"stream"'


async def read_limited_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 once it is known to pass `limit` bytes: from Content-Length before
    reading any of it, else (chunked) as soon as the running count passes the limit."""
    too_large = api.OpenAIError(413, f"request body is larger than {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:  # a malformed one is uvicorn's to refuse
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def request_meta(request: Request) -> dict[str, Any]:
    """What LLMServer needs to rebuild the ASGI scope (paths relative to the app's route prefix)."""
    root = request.scope.get("root_path", "")
    path = request.url.path[len(root) :] if root and request.url.path.startswith(root) else request.url.path
    return {
        "method": request.method,
        "path": path or "/",
        "query_string": request.scope.get("query_string", b""),
        "headers": list(request.scope.get("headers", [])),
    }


def unavailable(message: str, retry_after_s: float, route: str) -> JSONResponse:
    metrics.record(metrics.SERVE_REQUESTS, 1, {"route": route, "status": "503"})
    return JSONResponse(
        api.error_body(message, kind="server_error", code="service_unavailable"),
        status_code=503,
        headers={"Retry-After": str(max(0, math.ceil(retry_after_s)))},
    )


@serve.deployment(name=GATEWAY_NAME, ray_actor_options={"num_cpus": 0})
class Gateway:
    """A plain deployment, not a FastAPI ingress: Serve allows one of those per application (LLMServer).
    A Starlette response returned from __call__ is sent as is, streaming included."""

    def __init__(
        self, server: DeploymentHandle, max_request_bytes: int, retry_after_s: float, routes: list[str]
    ):
        self.server, self.whole = server.options(stream=True), server
        self.max_request_bytes, self.retry_after_s = max_request_bytes, retry_after_s
        self.routes = set(routes)  # LLMServer's route paths, to count a 503 given here under its route

    async def __call__(self, request: Request) -> Response:
        try:
            body = await read_limited_body(request, self.max_request_bytes)
        except api.OpenAIError as exc:
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
        meta = request_meta(request)
        route = meta["path"] if meta["path"] in self.routes else "unmatched"
        if STREAM_KEY in body:
            return await self._streamed(meta, body, route)
        return await self._whole(meta, body, route)

    async def _whole(self, meta: dict[str, Any], body: bytes, route: str) -> Response:
        """A request that cannot stream: its answer in one reply (one message back, where the streaming
        call sends the response start and the body as two)."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                answer = await self.whole.handle_http_whole.remote(meta, body)
            except BackPressureError:
                return unavailable("the server is at capacity; retry later", self.retry_after_s, route)
            except REPLICA_LOST as exc:
                log.warning("replica lost before answering %s (attempt %d): %s", meta["path"], attempt, exc)
                continue
            response = Response(answer["body"], status_code=answer["status"])
            response.raw_headers = [(bytes(k), bytes(v)) for k, v in answer["headers"]]
            return response
        return unavailable(
            "the model replica serving this request was lost; retry", self.retry_after_s, route
        )

    async def _streamed(self, meta: dict[str, Any], body: bytes, route: str) -> Response:
        for attempt in range(1, ATTEMPTS + 1):
            stream: DeploymentResponseGenerator = self.server.handle_http.remote(meta, body)
            try:
                start = await stream.__anext__()
            except BackPressureError:
                return unavailable("the server is at capacity; retry later", self.retry_after_s, route)
            except REPLICA_LOST as exc:
                log.warning("replica lost before answering %s (attempt %d): %s", meta["path"], attempt, exc)
                continue
            headers = [(bytes(k), bytes(v)) for k, v in start["headers"]]
            events = (b"content-type", b"text/event-stream") in [
                (k.lower(), v.split(b";")[0]) for k, v in headers
            ]
            response = StreamingResponse(relay(stream, events), status_code=start["status"])
            response.raw_headers = headers
            return response
        return unavailable(
            "the model replica serving this request was lost; retry", self.retry_after_s, route
        )


async def relay(stream: DeploymentResponseGenerator, events: bool) -> AsyncIterator[bytes]:
    """The body chunks after the response start. A replica lost mid-stream ends an event stream with an
    error event and [DONE] (the client already has its 200); any other body ends where it broke off."""
    try:
        async for chunk in stream:
            yield chunk
    except REPLICA_LOST as exc:
        log.warning("replica lost mid-response: %s", exc)
        if events:
            error = api.error_body("the model replica serving this stream was lost", kind="server_error")
            yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
    finally:
        stream.cancel()  # the client went away (or we are done): the replica stops generating
