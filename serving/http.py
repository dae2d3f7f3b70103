"""The HTTP surface both engines share: OpenAI-style errors, API keys, request parsing, request counts,
and running a request the Gateway forwarded through a replica's FastAPI app.

The raylm engine (app.LLMServer) and the vLLM engine (vllm_server.VLLMServer) each hold a FastAPI app
built with `openai_app()`, so a bad request gets the same status and error body whichever engine serves.

No `from __future__ import annotations` here: FastAPI must see the real `Request` type on the routes.
"""

import asyncio
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from raylm.core import metrics
from raylm.serving import api
from raylm.serving.config import ServeConfig
from raylm.serving.gateway import read_limited_body

log = logging.getLogger("raylm")

# The routes, declared once: the Gateway counts a 503 it gives under the route it was meant for.
COMPLETIONS, CHAT, MODELS, HEALTH = "/v1/completions", "/v1/chat/completions", "/v1/models", "/health"
ROUTES = [COMPLETIONS, CHAT, MODELS, HEALTH]


class CountRequests:
    """ASGI middleware: one count per HTTP request, by route template (unknown paths share "unmatched",
    so probes cannot grow the series) and status; an exception no handler answered counts as a 500.
    Plain ASGI, not BaseHTTPMiddleware, so streaming responses and client disconnects pass untouched."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_noting_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics.record(metrics.SERVE_REQUESTS, 1, {"route": route, "status": str(status)})


async def _openai_error(_: Request, exc: api.OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = api.validation_message(list(exc.errors()))
    return JSONResponse(api.error_body(message, param=param), status_code=400)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = "not_found" if exc.status_code == 404 else None
    return JSONResponse(api.error_body(str(exc.detail), param=None, code=code), status_code=exc.status_code)


async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    # Our own bug or a model failure: log the traceback server-side, never send it to the client.
    log.exception("internal error while serving a request")
    return JSONResponse(api.error_body("internal server error", kind="server_error"), status_code=500)


def openai_app(title: str) -> FastAPI:
    """A FastAPI app whose every error is an OpenAI-style body, with requests counted by route."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None)
    app.add_middleware(CountRequests)
    app.add_exception_handler(api.OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    return app


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def authorize(request: Request, key_hashes: list[str]) -> None:
    """401 unless the bearer token's digest is one of key_hashes (no keys configured: auth is off)."""
    if not key_hashes:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    digest = hash_key(token.strip()) if scheme.lower() == "bearer" and token else ""
    if not digest or not any(hmac.compare_digest(digest, h) for h in key_hashes):
        raise api.OpenAIError(
            401,
            "invalid or missing API key (send Authorization: Bearer <key>)",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def parse_request(
    request: Request, model: type[api._Request], cfg: ServeConfig, key_hashes: list[str]
) -> Any:
    """The authorized request, validated against raylm's schema (the same for both engines)."""
    authorize(request, key_hashes)
    body = api.parse_body(await read_limited_body(request, cfg.http.max_request_bytes))
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        message, param = api.validation_message(list(exc.errors()))
        raise api.OpenAIError(400, message, param=param) from None
    if req.n > cfg.max_n:
        raise api.OpenAIError(400, f"n must be at most {cfg.max_n} (got {req.n})", param="n")
    return req


def unknown_model(model: str) -> api.OpenAIError:
    return api.OpenAIError(
        404,
        f"The model '{model}' does not exist; GET /v1/models lists the served models",
        param="model",
        code="model_not_found",
    )


def asgi_scope(meta: dict[str, Any]) -> dict[str, Any]:
    """An ASGI HTTP scope for a request the Gateway forwarded (gateway.request_meta)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "scheme": "http",
        "method": meta["method"],
        "path": meta["path"],
        "raw_path": meta["path"].encode(),
        "root_path": "",
        "query_string": meta["query_string"],
        "headers": meta["headers"],
        "client": None,
        "server": None,
    }


async def run_forwarded(app: Any, meta: dict[str, Any], body: bytes) -> AsyncIterator[Any]:
    """One request forwarded by the Gateway, run through `app`: yields the response start ({"status",
    "headers"}), then the body chunks as the app sends them. Closing the generator (the client went
    away) cancels the route, whose stream then ends its generation."""
    messages: asyncio.Queue = asyncio.Queue()
    scope, never = asgi_scope(meta), asyncio.Event()
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await never.wait()  # no disconnect to report: cancellation ends the request
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(scope, receive, messages.put)
        finally:
            messages.put_nowait(None)

    task = asyncio.create_task(run())
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "headers": message.get("headers", [])}
            elif message.get("body"):
                yield message["body"]
        await task  # raises what the app raised
    finally:
        task.cancel()


async def run_forwarded_whole(app: Any, meta: dict[str, Any], body: bytes) -> dict[str, Any]:
    """run_forwarded's response collected into one {"status", "headers", "body"} (a request that does not
    stream: one reply to the Gateway instead of two messages)."""
    answer: dict[str, Any] = {}
    chunks = []
    async for item in run_forwarded(app, meta, body):
        if isinstance(item, dict):
            answer = item
        else:
            chunks.append(item)
    return {**answer, "body": b"".join(chunks)}
