"""The Ray Serve deployment: OpenAI routes, dynamic batching, LoRA multiplexing, metrics.

One deployment, `LLMServer`, is both the HTTP ingress (FastAPI) and the model replica, so a request costs
no extra hop. Each replica holds one base model (engine.py) and an LRU of LoRA adapters
(`serve.multiplexed`). Requests are tokenized and validated in the route, then queued into a
`@serve.batch` generator; the admitted batch is handed to a scheduler that prefills it and merges it into
the running decode batch between two steps (iteration-level batching), all model calls on one worker
thread so the event loop stays free to accept and stream. Sequences for different adapters never share
a forward pass: each adapter has its own decode batch and the batches are stepped in turn.

No `from __future__ import annotations` here: FastAPI must see the real `Request` type on the routes.
"""

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core import metrics
from serving import api
from serving.config import BatchingConfig, ServeConfig
from serving.engine import DEFAULT_CHAT_STOP, DecodeBatch, Delta, Engine, SamplingParams, check_adapter_dir

log = logging.getLogger("raylm")
DEPLOYMENT_NAME = "LLMServer"
BATCH_SIZE_BOUNDARIES = (1, 2, 4, 8, 16, 32, 64, 128)
# Prompts longer than this (characters, all of a request's together) are tokenized on a thread of their
# own: a few ms of tokenizing inline is cheaper than the hop, seconds of it would stall every stream.
INLINE_TOKENIZE_CHARS = 16_384

fastapi_app = FastAPI(title="raylm", docs_url=None, redoc_url=None)


@fastapi_app.exception_handler(api.OpenAIError)
async def _openai_error(_: Request, exc: api.OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = api.validation_message(list(exc.errors()))
    return JSONResponse(api.error_body(message, param=param), status_code=400)


@fastapi_app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = "not_found" if exc.status_code == 404 else None
    return JSONResponse(api.error_body(str(exc.detail), param=None, code=code), status_code=exc.status_code)


@fastapi_app.exception_handler(Exception)
async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    # Our own bug or a model failure: log the traceback server-side, never send it to the client.
    log.exception("internal error while serving a request")
    return JSONResponse(api.error_body("internal server error", kind="server_error"), status_code=500)


@dataclass
class Job:
    """A slice of one request's sequences (prompts x n) queued for batching; all on one adapter."""

    model_id: str
    adapter: str | None
    prompts: list[list[int]]
    params: list[SamplingParams]
    arrived: float = field(default_factory=time.monotonic)


def _rows(jobs: list[Job]) -> int:
    return sum(len(j.prompts) for j in jobs)


class _AdapterHandle:
    """What the multiplexing LRU holds for one adapter; Serve calls __del__ when it evicts it."""

    def __init__(self, server: "LLMServer", name: str):
        self.server, self.name, self.unloaded = server, name, False

    def __del__(self) -> None:
        # Never block here: this may run on any thread, even the engine thread itself during GC.
        if not self.unloaded:
            self.unloaded = True
            self.server.executor.submit(self.server.engine.unload_adapter, self.name)


def adapter_catalog(cfg: ServeConfig) -> dict[str, str]:
    """Adapter id -> folder, from adapters.paths and every adapter sub-folder of adapters.dirs."""
    catalog = dict(cfg.adapters.paths)
    for root in cfg.adapters.dirs:
        if not os.path.isdir(root):
            raise api.OpenAIError(500, f"adapters dir {root} does not exist")
        for name in sorted(os.listdir(root)):
            if os.path.isfile(os.path.join(root, name, "adapter_config.json")):
                catalog.setdefault(name, os.path.join(root, name))
    for path in catalog.values():
        check_adapter_dir(path)
    return catalog


async def _merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several async iterators as items arrive, tagging each item with its stream's index."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(k: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                await queue.put((k, item))
        finally:
            await queue.put((k, done))

    tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(streams)]
    try:
        finished = 0
        while finished < len(streams):
            k, item = await queue.get()
            if item is done:
                finished += 1
            else:
                yield k, item
        for t in tasks:
            if t.done() and t.exception():
                raise t.exception()
    finally:
        for t in tasks:
            t.cancel()


@dataclass
class _Admission:
    """Sequences on one adapter waiting to join the decoding batch; tags route each row's output back."""

    adapter: str | None
    prompts: list[list[int]]
    params: list[SamplingParams]
    tags: list[tuple[asyncio.Queue, int, int]]


class _Scheduler:
    """Iteration-level batching on the replica's single engine thread.

    `@serve.batch` forms admission batches; between two decoding steps the scheduler prefills what was
    admitted and merges it into the running batch of the same adapter, as long as at most
    max_batch_size sequences decode together. So a request arriving mid-generation starts at the next
    step instead of waiting for the whole running batch to finish. Batches of different adapters are
    stepped in turn, never in one forward pass.
    """

    def __init__(self, server: "LLMServer"):
        self.server = server
        self.pending: deque[_Admission] = deque()
        self.active: list[DecodeBatch] = []
        self.task: asyncio.Task | None = None

    def submit(self, admission: _Admission) -> None:
        self.pending.append(admission)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._loop())

    async def _engine(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.server.executor, fn, *args)

    async def _loop(self) -> None:
        engine = self.server.engine
        while self.pending or self.active:
            for admission in self._admit():
                try:
                    if admission.adapter is not None:
                        await self.server.get_adapter(admission.adapter)  # (re)load; refreshes its LRU slot
                    batch, deltas = await self._engine(
                        engine.prefill, admission.prompts, admission.params, admission.adapter, admission.tags
                    )
                except Exception as exc:
                    self._fail(admission.tags, exc)
                    continue
                self.server.record_batch(len(admission.prompts), admission.adapter)
                self._deliver(deltas)
                if batch.seqs:
                    running = next((b for b in self.active if b.adapter == batch.adapter), None)
                    if running is None:
                        self.active.append(batch)
                    else:
                        await self._engine(engine.merge, running, batch)
            for batch in list(self.active):
                self.server.record_batch(len(batch.seqs), batch.adapter)
                try:
                    deltas = await self._engine(engine.step, batch)
                except Exception as exc:
                    self._fail(batch.tags, exc)
                    self.active.remove(batch)
                    continue
                self._deliver(deltas)
                if not batch.seqs:
                    self.active.remove(batch)

    def _admit(self) -> list[_Admission]:
        """Take the queued admissions that fit next to the running rows, combined per adapter: everything
        that arrived during the last step is prefilled together, packed into as few passes as fit."""
        rows = sum(len(b.seqs) for b in self.active)
        combined: dict[str | None, _Admission] = {}
        while self.pending and (
            rows == 0 or rows + len(self.pending[0].prompts) <= self.server.max_batch_size
        ):
            admission = self.pending.popleft()
            rows += len(admission.prompts)
            if admission.adapter in combined:
                into = combined[admission.adapter]
                into.prompts += admission.prompts
                into.params += admission.params
                into.tags += admission.tags
            else:
                combined[admission.adapter] = admission
        return list(combined.values())

    @staticmethod
    def _deliver(deltas: list[tuple[Any, Delta]]) -> None:
        by_inbox: dict[asyncio.Queue, list[Any]] = {}
        for (inbox, j, r), delta in deltas:
            by_inbox.setdefault(inbox, []).append(((j, r), delta))
        for inbox, items in by_inbox.items():
            inbox.put_nowait(items)

    @staticmethod
    def _fail(tags: list[Any], exc: BaseException) -> None:
        log.error("generation failed: %s", exc)
        for inbox in {tag[0] for tag in tags}:
            inbox.put_nowait(exc)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(fastapi_app)
class LLMServer:
    def __init__(self, serve_config: dict[str, Any], model_id: str, api_key_sha256: list[str] | None = None):
        import torch

        cfg = ServeConfig.model_validate(serve_config)
        torch.set_num_threads(max(1, int(cfg.num_cpus)))
        self.cfg, self.model_id = cfg, model_id
        self.key_hashes = list(api_key_sha256 or [])
        self.engine = Engine(
            cfg.model,
            dtype=cfg.dtype,
            quantization=cfg.quantization.method,
            device=cfg.device,
            trust_remote_code=cfg.trust_remote_code,
            chat_template=cfg.chat_template,
            max_context=cfg.max_context,
            nf4_double_quant=cfg.quantization.nf4_double_quant,
        )
        self.catalog = adapter_catalog(cfg)
        if model_id in self.catalog:
            raise ValueError(f"adapter id {model_id!r} is the same as the base model id")
        # One thread runs every model call, so adapters are never swapped under a running forward pass.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raylm-engine")
        # Large prompts are tokenized here, neither on the event loop nor behind the decoding steps. Encoding
        # without padding or truncation only reads the Rust tokenizer, as the engine thread's decode() does,
        # so the two threads can share it.
        self.tokenize_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raylm-tokenize")
        self.max_batch_size = cfg.batching.max_batch_size
        self.batch_sizes: Counter[int] = Counter()  # rows per decoding forward pass, for stats() and tests
        self.scheduler = _Scheduler(self)

        async def load_adapter(adapter_id: str) -> _AdapterHandle:
            await asyncio.get_running_loop().run_in_executor(
                self.executor, self.engine.load_adapter, adapter_id, self.catalog[adapter_id]
            )
            return _AdapterHandle(self, adapter_id)

        self.get_adapter = serve.multiplexed(max_num_models_per_replica=cfg.adapters.max_loaded)(load_adapter)
        log.info(
            "serving %s (%s, quantization %s) with adapters %s",
            model_id,
            cfg.dtype,
            cfg.quantization.method,
            sorted(self.catalog),
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this with `user_config` at start and on every config update: batching knobs."""
        batching = BatchingConfig.model_validate(user_config)
        self.max_batch_size = batching.max_batch_size
        self._generate_batch.set_max_batch_size(batching.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    def stats(self) -> dict[str, Any]:
        """Batch sizes seen so far and current batching settings (for tests, benchmarks, debugging)."""
        return {
            "batch_sizes": dict(self.batch_sizes),
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self._generate_batch._get_batch_wait_timeout_s(),
            "memory_bytes": self.engine.memory_footprint(),
            "loaded_adapters": list(self.engine.adapters),
            "packed_prefill": self.engine.packed_prefill,
            "pid": os.getpid(),
        }

    # ---- batching -----------------------------------------------------------------------------
    @serve.batch(
        max_batch_size=8, batch_wait_timeout_s=0.005, max_concurrent_batches=256, batch_size_fn=_rows
    )
    async def _generate_batch(self, jobs: list[Job]) -> AsyncIterator[list[Any]]:
        """Admit a batch of jobs (one prefill per adapter group), then yield, per forward pass, one entry
        per job: [(row, Delta), ...], or StopIteration once the job is done."""
        now = time.monotonic()
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        groups: dict[str | None, list[int]] = {}
        for j, job in enumerate(jobs):
            groups.setdefault(job.adapter, []).append(j)
            metrics.histogram(
                "serve_queue_wait_s",
                now - job.arrived,
                {"model": job.model_id},
                "request arrival to its batch",
            )
        for adapter, members in groups.items():
            owners = [(j, r) for j in members for r in range(len(jobs[j].prompts))]
            self.scheduler.submit(
                _Admission(
                    adapter,
                    [jobs[j].prompts[r] for j, r in owners],
                    [jobs[j].params[r] for j, r in owners],
                    [(inbox, j, r) for j, r in owners],
                )
            )
        left = [len(job.prompts) for job in jobs]
        stopped = [False] * len(jobs)
        while any(left):
            item = await inbox.get()
            if isinstance(item, BaseException):
                raise item
            out: list[Any] = [StopIteration if stopped[j] else [] for j in range(len(jobs))]
            for (j, r), delta in item:
                out[j].append((r, delta))
                left[j] -= delta.finish_reason is not None
            yield out
            stopped = [done or n == 0 for done, n in zip(stopped, left)]

    def record_batch(self, rows: int, adapter: str | None) -> None:
        self.batch_sizes[rows] += 1
        metrics.histogram(
            "serve_batch_size",
            rows,
            {"model": adapter or self.model_id},
            "sequences per forward pass",
            boundaries=BATCH_SIZE_BOUNDARIES,
        )

    async def _run(self, jobs: list[Job]) -> AsyncIterator[tuple[int, Delta]]:
        """(sequence index in the request, Delta) as they come, from every job of one request."""
        offsets = [sum(len(j.prompts) for j in jobs[:k]) for k in range(len(jobs))]
        first = True
        started = jobs[0].arrived
        tokens = 0
        if len(jobs) == 1:
            streams = [self._generate_batch(jobs[0])]
        else:
            streams = [self._generate_batch(job) for job in jobs]
        async for k, deltas in _merge(streams):
            for r, delta in deltas:
                if first and delta.completion_tokens:
                    first = False
                    metrics.histogram(
                        "serve_time_to_first_token_s",
                        time.monotonic() - started,
                        {"model": jobs[0].model_id},
                        "request arrival to its first token",
                    )
                if delta.finish_reason is not None:
                    tokens += delta.completion_tokens
                yield offsets[k] + r, delta
        metrics.counter(
            "serve_tokens_generated", tokens, {"model": jobs[0].model_id}, "completion tokens generated"
        )

    # ---- request handling ---------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if not self.key_hashes:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        digest = hash_key(token.strip()) if scheme.lower() == "bearer" and token else ""
        if not digest or not any(hmac.compare_digest(digest, h) for h in self.key_hashes):
            raise api.OpenAIError(
                401,
                "invalid or missing API key (send Authorization: Bearer <key>)",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with a 413 once it is known to pass http.max_request_bytes: from Content-Length
        before reading any of it, else (chunked) as soon as the running count passes the limit."""
        limit = self.cfg.http.max_request_bytes
        too_large = api.OpenAIError(
            413, f"request body is larger than {limit} bytes", code="request_too_large"
        )
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

    async def _parse(self, request: Request, model: type[api._Request]) -> Any:
        self._authorize(request)
        body = api.parse_body(await self._read_body(request))
        try:
            req = model.model_validate(body)
        except ValidationError as exc:
            message, param = api.validation_message(list(exc.errors()))
            raise api.OpenAIError(400, message, param=param) from None
        if req.n > self.cfg.max_n:
            raise api.OpenAIError(400, f"n must be at most {self.cfg.max_n} (got {req.n})", param="n")
        return req

    def _adapter_for(self, model: str) -> str | None:
        if model == self.model_id:
            return None
        if model in self.catalog:
            return model
        raise api.OpenAIError(
            404,
            f"The model '{model}' does not exist; GET /v1/models lists the served models",
            param="model",
            code="model_not_found",
        )

    async def _encode(self, texts: list[str], param: str) -> list[list[int]]:
        """Token ids of the prompts. One that surely passes the context is refused before any tokenizing
        (engine.min_tokens); large ones are tokenized off the event loop so other requests keep flowing."""
        context = self.engine.context_length
        for text in texts:
            if (least := self.engine.min_tokens(text)) >= context:
                raise api.OpenAIError(
                    400,
                    f"This model's maximum context length is {context} tokens. However, your prompt has "
                    f"{len(text)} characters, which is at least {least} tokens.",
                    param=param,
                    code="context_length_exceeded",
                )
        if sum(len(t) for t in texts) <= INLINE_TOKENIZE_CHARS:
            return [self.engine.encode(t) for t in texts]
        return await asyncio.get_running_loop().run_in_executor(
            self.tokenize_executor, lambda: [self.engine.encode(t) for t in texts]
        )

    def _jobs(self, req: api._Request, prompts: list[list[int]], stop: list[str]) -> list[Job]:
        if any(len(p) == 0 for p in prompts):
            raise api.OpenAIError(400, "prompt must not be empty", param="prompt")
        longest = max(len(p) for p in prompts)
        room = self.engine.context_length - longest
        if room < 1 or (req.max_tokens is not None and req.max_tokens > room):
            wanted = req.max_tokens or 1
            raise api.OpenAIError(
                400,
                f"This model's maximum context length is {self.engine.context_length} tokens. However, you "
                f"requested {longest + wanted} tokens ({longest} in the prompt, {wanted} for the completion).",
                param="max_tokens" if room >= 1 else "prompt",
                code="context_length_exceeded",
            )
        max_tokens = req.max_tokens or min(self.cfg.default_max_tokens, room)
        adapter = self._adapter_for(req.model)
        seqs: list[tuple[list[int], SamplingParams]] = []
        for prompt in prompts:
            for choice in range(req.n):
                seed = None if req.seed is None else req.seed + choice
                seqs.append(
                    (prompt, SamplingParams(max_tokens, req.temperature, req.top_p, tuple(stop), seed))
                )
        size = self.max_batch_size  # a request bigger than one batch is split into batch-sized jobs
        return [
            Job(req.model, adapter, [p for p, _ in seqs[i : i + size]], [s for _, s in seqs[i : i + size]])
            for i in range(0, len(seqs), size)
        ]

    async def _collect(self, jobs: list[Job]) -> tuple[list[str], list[str | None], int]:
        total = sum(len(j.prompts) for j in jobs)
        texts, reasons, tokens = [""] * total, [None] * total, [0] * total
        async for i, delta in self._run(jobs):
            texts[i] += delta.text
            tokens[i] = delta.completion_tokens
            reasons[i] = delta.finish_reason or reasons[i]
        return texts, reasons, sum(tokens)

    async def _preload(self, jobs: list[Job]) -> None:
        """Load the request's adapter before a stream starts: once its 200 is sent, a failure can only be
        an error event, so whatever can fail is done first (the scheduler's own load is then a cache hit)."""
        if jobs[0].adapter is not None:
            await self.get_adapter(jobs[0].adapter)

    def _stream(
        self,
        jobs: list[Job],
        req: api._Request,
        chunk: Any,
        obj: str,
        prompt_tokens: int,
        rid: str,
        chat: bool,
    ) -> EventSourceResponse:
        async def events() -> AsyncIterator[dict[str, str]]:
            tokens: dict[int, int] = {}
            try:
                if chat:
                    for i in range(sum(len(j.prompts) for j in jobs)):
                        yield {
                            "data": json.dumps(
                                chunk(rid, req.model, i, {"role": "assistant", "content": ""}, None)
                            )
                        }
                async for i, delta in self._run(jobs):
                    tokens[i] = delta.completion_tokens
                    if delta.text or delta.finish_reason:
                        payload: Any = delta.text
                        if chat:
                            payload = {"content": delta.text} if delta.text else {}
                        yield {"data": json.dumps(chunk(rid, req.model, i, payload, delta.finish_reason))}
                if req.include_usage_in_stream():
                    yield {
                        "data": json.dumps(
                            api.usage_chunk(rid, req.model, obj, prompt_tokens, sum(tokens.values()))
                        )
                    }
            except Exception:
                log.exception("generation failed mid-stream")
                yield {"data": json.dumps(api.error_body("internal server error", kind="server_error"))}
            yield {"data": "[DONE]"}

        return EventSourceResponse(events(), ping=15)

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        req: api.CompletionRequest = await self._parse(request, api.CompletionRequest)
        prompts = await self._encode(req.prompts(), "prompt")
        jobs = self._jobs(req, prompts, req.stop_list())
        prompt_tokens, rid = sum(len(p) for p in prompts), api.new_id("cmpl")
        if req.stream:
            await self._preload(jobs)
            return self._stream(
                jobs, req, api.completion_chunk, "text_completion", prompt_tokens, rid, chat=False
            )
        texts, reasons, tokens = await self._collect(jobs)
        return api.completion_body(rid, req.model, texts, reasons, prompt_tokens, tokens)

    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        req: api.ChatCompletionRequest = await self._parse(request, api.ChatCompletionRequest)
        try:
            prompt = self.engine.render_chat(req.plain_messages())
        except Exception as exc:  # a template error is about the messages given, e.g. roles out of order
            raise api.OpenAIError(
                400, f"messages do not fit the chat template: {exc}", param="messages"
            ) from None
        stop = req.stop_list() + ([DEFAULT_CHAT_STOP] if self.engine.uses_default_template else [])
        prompts = await self._encode([prompt], "messages")
        jobs = self._jobs(req, prompts, stop)
        prompt_tokens, rid = len(prompts[0]), api.new_id("chatcmpl")
        if req.stream:
            await self._preload(jobs)
            return self._stream(
                jobs, req, api.chat_chunk, "chat.completion.chunk", prompt_tokens, rid, chat=True
            )
        texts, reasons, tokens = await self._collect(jobs)
        return api.chat_body(rid, req.model, texts, reasons, prompt_tokens, tokens)

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request) -> Any:
        self._authorize(request)
        return api.models_body([self.model_id, *sorted(self.catalog)])

    @fastapi_app.get("/health")
    async def health(self) -> Any:
        return {"status": "ok", "model": self.model_id}


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve deployment options from the config (replicas or autoscaling, queue bounds, resources)."""
    options: dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": cfg.retry_after_s},
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        "user_config": cfg.user_config(),
    }
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = cfg.autoscaling.model_dump()
    else:
        options["num_replicas"] = cfg.num_replicas
    return options


def build_app(cfg: ServeConfig, model_id: str, api_key_sha256: list[str] | None = None) -> Application:
    """The Serve application for a config: one LLMServer deployment."""
    return LLMServer.options(**deployment_options(cfg)).bind(
        init_config(cfg), model_id, list(api_key_sha256 or [])
    )


def init_config(cfg: ServeConfig) -> dict[str, Any]:
    """The config replicas are built with. Batching is left out on purpose: it arrives via user_config,
    so changing it updates running replicas in place instead of replacing them."""
    return cfg.model_dump(mode="json", exclude={"batching"})


def build_from_args(args: dict[str, Any]) -> Application:
    """Application builder for `serve deploy` (import_path serving.app:build_from_args).

    args: {"serve": <serve section as JSON>, "model_id": str, "api_key_sha256": [hex digests]}.
    """
    cfg = ServeConfig.model_validate(args["serve"])
    return build_app(cfg, args["model_id"], args.get("api_key_sha256", []))
