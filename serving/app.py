"""The Ray Serve deployments: OpenAI routes, authentication, request parsing and OpenAI-style errors.

HTTP reaches the `Gateway` (gateway.py) first, which forwards each request to an `LLMServer` replica
through a DeploymentHandle and answers for a replica that dies (503 + OpenAI error body, not Ray's
plain-text 500). LLMServer holds the FastAPI routes and runs each forwarded request through them
(`handle_http`). Each replica holds one base model (engine.py) and one `AsyncEngine` (scheduler.py), which
owns the engine thread, the admission queue, the decode batches and the LoRA adapters. A route parses and
validates the request, tokenizes it, and hands it to the engine as one `GenerationRequest`; the deltas
come back per sequence, collected into one response or streamed as server-sent events (sse.py).
Batching settings arrive through Serve's user_config (`reconfigure`), so they change in place.

No `from __future__ import annotations` here: FastAPI must see the real `Request` type on the routes.
"""

import asyncio
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import Request
from ray import serve
from ray.serve import Application

from raylm.core.artifacts import TuneDir
from raylm.serving import api, sse
from raylm.serving.config import BatchingConfig, ServeConfig
from raylm.serving.engine import DEFAULT_CHAT_STOP, Delta, Engine, SamplingParams, check_adapter_dir
from raylm.serving.gateway import GATEWAY_MAX_ONGOING, Gateway
from raylm.serving.http import (
    CHAT,
    COMPLETIONS,
    HEALTH,
    MODELS,
    ROUTES,
    authorize,
    openai_app,
    parse_request,
    run_forwarded,
    run_forwarded_whole,
    unknown_model,
)
from raylm.serving.scheduler import AsyncEngine, GenerationRequest

log = logging.getLogger("raylm")
DEPLOYMENT_NAME = "LLMServer"
SWEEP_BEST = "best"  # the adapter id of a sweep's best adapter (serve.sweep)
# Prompts longer than this (characters, all of a request's together) are tokenized on a thread of their
# own: a few ms of tokenizing inline is cheaper than the hop, seconds of it would stall every stream.
INLINE_TOKENIZE_CHARS = 16_384

fastapi_app = openai_app("raylm")


def adapter_catalog(cfg: ServeConfig) -> dict[str, str]:
    """Adapter id -> folder, from adapters.paths, every adapter sub-folder of adapters.dirs, and a sweep's
    best adapter (as `best`) and ranked adapters."""
    catalog = dict(cfg.adapters.paths)
    dirs = list(cfg.adapters.dirs)
    if cfg.sweep is not None:
        sweep = TuneDir(cfg.sweep)
        if not os.path.isfile(os.path.join(sweep.best_adapter.root, "adapter_config.json")):
            raise api.OpenAIError(
                500, f"serve.sweep {cfg.sweep} has no best_adapter/: run `raylm tune` first"
            )
        catalog.setdefault(SWEEP_BEST, sweep.best_adapter.root)
        dirs.append(sweep.adapters)
    for root in dirs:
        if not os.path.isdir(root):
            raise api.OpenAIError(500, f"adapters dir {root} does not exist")
        for name in sorted(os.listdir(root)):
            if os.path.isfile(os.path.join(root, name, "adapter_config.json")):
                catalog.setdefault(name, os.path.join(root, name))
    for path in catalog.values():
        check_adapter_dir(path)
    return catalog


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(fastapi_app)
class LLMServer:
    def __init__(self, serve_config: dict[str, Any], model_id: str, api_key_sha256: list[str] | None = None):
        import torch

        cfg = ServeConfig.model_validate(serve_config)
        torch.set_num_threads(max(1, int(cfg.num_cpus)))
        self.cfg, self.model_id = cfg, model_id
        self.key_hashes = list(api_key_sha256 or [])
        self.model = Engine(
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
        self.engine = AsyncEngine(
            self.model,
            model_id,
            self.catalog,
            max_loaded=cfg.adapters.max_loaded,
            max_batch_size=cfg.batching.max_batch_size,
            batch_wait_timeout_s=cfg.batching.batch_wait_timeout_s,
        )
        # Large prompts are tokenized here, neither on the event loop nor behind the decoding steps. Encoding
        # without padding or truncation only reads the Rust tokenizer, as the engine thread's decode() does,
        # so the two threads can share it.
        self.tokenize_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raylm-tokenize")
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
        self.engine.reconfigure(batching.max_batch_size, batching.batch_wait_timeout_s)

    def stats(self) -> dict[str, Any]:
        """Batch sizes seen so far and current batching settings (for tests, benchmarks, debugging)."""
        return {
            **self.engine.stats(),
            "memory_bytes": self.model.memory_footprint(),
            "packed_prefill": self.model.packed_prefill,
            "pid": os.getpid(),
        }

    # ---- request handling ---------------------------------------------------------------------
    async def handle_http(self, meta: dict[str, Any], body: bytes) -> AsyncIterator[Any]:
        """One request forwarded by the Gateway, run through this replica's routes (http.run_forwarded).
        Closing the generator (the client went away) cancels the route, whose stream leaves the batch."""
        async for item in run_forwarded(self.app, meta, body):
            yield item

    async def handle_http_whole(self, meta: dict[str, Any], body: bytes) -> dict[str, Any]:
        """A forwarded request that does not stream, answered in one reply (http.run_forwarded_whole)."""
        return await run_forwarded_whole(self.app, meta, body)

    async def _parse(self, request: Request, model: type[api._Request]) -> Any:
        return await parse_request(request, model, self.cfg, self.key_hashes)

    def _adapter_for(self, model: str) -> str | None:
        if model == self.model_id:
            return None
        if model in self.catalog:
            return model
        raise unknown_model(model)

    async def _encode(self, texts: list[str], param: str) -> list[list[int]]:
        """Token ids of the prompts. One that surely passes the context is refused before any tokenizing
        (engine.min_tokens); large ones are tokenized off the event loop so other requests keep flowing."""
        context = self.model.context_length
        for text in texts:
            if (least := self.model.min_tokens(text)) >= context:
                raise api.OpenAIError(
                    400,
                    f"This model's maximum context length is {context} tokens. However, your prompt has "
                    f"{len(text)} characters, which is at least {least} tokens.",
                    param=param,
                    code="context_length_exceeded",
                )
        if sum(len(t) for t in texts) <= INLINE_TOKENIZE_CHARS:
            return [self.model.encode(t) for t in texts]
        return await asyncio.get_running_loop().run_in_executor(
            self.tokenize_executor, lambda: [self.model.encode(t) for t in texts]
        )

    def _generation(self, req: api._Request, prompts: list[list[int]], stop: list[str]) -> GenerationRequest:
        if any(len(p) == 0 for p in prompts):
            raise api.OpenAIError(400, "prompt must not be empty", param="prompt")
        longest = max(len(p) for p in prompts)
        room = self.model.context_length - longest
        if room < 1 or (req.max_tokens is not None and req.max_tokens > room):
            wanted = req.max_tokens or 1
            raise api.OpenAIError(
                400,
                f"This model's maximum context length is {self.model.context_length} tokens. However, you "
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
                params = SamplingParams(
                    max_tokens, req.temperature, req.top_p, tuple(stop), seed, req.ignore_eos
                )
                seqs.append((prompt, params))
        return GenerationRequest(req.model, adapter, [p for p, _ in seqs], [sp for _, sp in seqs])

    @staticmethod
    async def _collect(
        deltas: AsyncGenerator[tuple[int, Delta], None], n: int
    ) -> tuple[list[str], list[str | None], int]:
        texts, reasons, tokens = [""] * n, [None] * n, [0] * n
        try:
            async for i, delta in deltas:
                texts[i] += delta.text
                tokens[i] = delta.completion_tokens
                reasons[i] = delta.finish_reason or reasons[i]
        finally:
            await deltas.aclose()  # the client went away: its sequences leave the running batch
        return texts, reasons, sum(tokens)

    async def _respond(
        self, req: api._Request, gen: GenerationRequest, prompt_tokens: int, chat: bool
    ) -> Any:
        """Submit the request (its adapter loaded first, so a failure is an error response, never an error
        event after a 200), then stream its deltas or collect them into one response body."""
        deltas = await self.engine.submit(gen)
        rid = api.new_id("chatcmpl" if chat else "cmpl")
        if req.stream:
            fmt = sse.StreamFormat(
                rid,
                req.model,
                api.chat_chunk if chat else api.completion_chunk,
                "chat.completion.chunk" if chat else "text_completion",
                chat,
                len(gen.prompts),
                prompt_tokens,
                req.include_usage_in_stream(),
            )
            return sse.response(deltas, fmt)
        texts, reasons, tokens = await self._collect(deltas, len(gen.prompts))
        body = api.chat_body if chat else api.completion_body
        return body(rid, req.model, texts, reasons, prompt_tokens, tokens)

    @fastapi_app.post(COMPLETIONS)
    async def completions(self, request: Request) -> Any:
        req: api.CompletionRequest = await self._parse(request, api.CompletionRequest)
        prompts = await self._encode(req.prompts(), "prompt")
        gen = self._generation(req, prompts, req.stop_list())
        return await self._respond(req, gen, sum(len(p) for p in prompts), chat=False)

    @fastapi_app.post(CHAT)
    async def chat_completions(self, request: Request) -> Any:
        req: api.ChatCompletionRequest = await self._parse(request, api.ChatCompletionRequest)
        try:
            prompt = self.model.render_chat(req.plain_messages())
        except Exception as exc:  # a template error is about the messages given, e.g. roles out of order
            raise api.OpenAIError(
                400, f"messages do not fit the chat template: {exc}", param="messages"
            ) from None
        stop = req.stop_list() + ([DEFAULT_CHAT_STOP] if self.model.uses_default_template else [])
        prompts = await self._encode([prompt], "messages")
        gen = self._generation(req, prompts, stop)
        return await self._respond(req, gen, len(prompts[0]), chat=True)

    @fastapi_app.get(MODELS)
    async def models(self, request: Request) -> Any:
        authorize(request, self.key_hashes)
        return api.models_body([self.model_id, *sorted(self.catalog)])

    @fastapi_app.get(HEALTH)
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
    if env := cfg.replica_env():
        options["ray_actor_options"]["runtime_env"] = {"env_vars": env}
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = cfg.autoscaling.model_dump()
    else:
        options["num_replicas"] = cfg.num_replicas
    return options


def gateway_options(cfg: ServeConfig) -> dict[str, Any]:
    """The Gateway runs as many replicas as LLMServer (or scales between the same bounds, never below one:
    it must be there to wake LLMServer from zero): no CPUs."""
    options: dict[str, Any] = {"max_ongoing_requests": GATEWAY_MAX_ONGOING}
    if cfg.niceness is not None:
        env = {"RAY_worker_niceness": str(cfg.niceness)}
        options["ray_actor_options"] = {"num_cpus": 0, "runtime_env": {"env_vars": env}}
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = {
            "min_replicas": max(1, cfg.autoscaling.min_replicas),
            "max_replicas": cfg.autoscaling.max_replicas,
            "target_ongoing_requests": GATEWAY_MAX_ONGOING // 2,
        }
    else:
        options["num_replicas"] = cfg.num_replicas
    return options


def build_app(cfg: ServeConfig, model_id: str, api_key_sha256: list[str] | None = None) -> Application:
    """The Serve application for a config: the Gateway ingress in front of the engine's replicas
    (LLMServer for the raylm engine, vllm_server.VLLMServer for the vLLM engine)."""
    if cfg.engine == "vllm":
        from raylm.serving.vllm_server import build_vllm_app

        return build_vllm_app(cfg, model_id, list(api_key_sha256 or []), gateway_options(cfg))
    server = LLMServer.options(**deployment_options(cfg)).bind(
        init_config(cfg), model_id, list(api_key_sha256 or [])
    )
    if not cfg.http.gateway:
        return server  # LLMServer is a FastAPI ingress itself
    return Gateway.options(**gateway_options(cfg)).bind(
        server, cfg.http.max_request_bytes, cfg.retry_after_s, ROUTES
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
