"""Config of the serving stage (`serve:` in a recipe).

Everything that shapes the deployment lives here, so a bad combination fails at config load (exit 2)
before Ray starts. Batching parameters reach the replicas through Serve's `user_config`, so they can be
changed on a running deployment (`serve deploy` with a new `user_config`) without reloading the model.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raylm.core.schema import Bool, Float, Int, PathOrUri, Section

# Which engine runs which quantization method: the raylm engine quantizes at load time with bitsandbytes;
# the vLLM engine uses vLLM's own methods (fp8 at load time, AWQ / GPTQ checkpoints as they are, and
# bitsandbytes where the installed vLLM has it: vllm-bnb-plugin).
RAYLM_QUANTIZATION = ("none", "int8", "nf4")
VLLM_QUANTIZATION = ("none", "fp8", "awq", "gptq", "bitsandbytes")


class QuantizationConfig(Section):
    method: Literal["none", "int8", "nf4", "fp8", "awq", "gptq", "bitsandbytes"] = "none"
    """Weight quantization. raylm engine: int8 (LLM.int8) or nf4 (4-bit NormalFloat), with bitsandbytes at
    load time. vllm engine: fp8 (at load time, GPU), awq / gptq (checkpoints quantized that way), bitsandbytes."""
    nf4_double_quant: Bool = True
    """nf4 only: also quantize the quantization constants (saves ~0.4 bit per weight)."""


class BatchingConfig(Section):
    max_batch_size: Int = Field(8, ge=1, le=512)
    """Most sequences (prompts x n) generated together in one batch."""
    batch_wait_timeout_s: Float = Field(0.005, ge=0, le=10)
    """How long the first request of a batch waits for others before the batch starts."""


class AutoscalingSection(Section):
    min_replicas: Int = Field(1, ge=0)
    """Fewest replicas kept running."""
    max_replicas: Int = Field(2, ge=1)
    """Most replicas the autoscaler may start."""
    target_ongoing_requests: Float = Field(8, gt=0)
    """Ongoing requests per replica the autoscaler aims for."""

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSection:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is larger than max_replicas ({self.max_replicas})"
            )
        return self


class HttpConfig(Section):
    host: str = "127.0.0.1"
    """Interface the HTTP proxy binds to; loopback by default so nothing is exposed unless asked."""
    port: Int = Field(8000, ge=1, le=65535)
    """TCP port of the HTTP proxy."""
    route_prefix: str = "/"
    """Prefix under which /v1/... and /health are served."""
    api_key_env: str | None = None
    """Name of an environment variable holding accepted API keys (comma-separated); None turns auth off."""
    max_request_bytes: Int = Field(4 * 1024 * 1024, ge=1024)
    """Largest request body accepted; a bigger one is answered 413 before the rest of it is read."""
    gateway: Bool = True
    """HTTP reaches the replicas through the Gateway, which answers for a replica lost mid-request (503 +
    Retry-After, or an SSE error event). false: the replicas are the HTTP ingress, one Serve hop less
    (BENCHMARKS.md prices it), and a lost replica's requests get Ray Serve's plain-text 500."""

    @model_validator(mode="after")
    def _prefix(self) -> HttpConfig:
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with '/' (got {self.route_prefix!r})")
        return self


class AdaptersConfig(Section):
    paths: dict[str, PathOrUri] = {}
    """LoRA adapters by model id: {id: folder with adapter_config.json + adapter_model.safetensors}."""
    dirs: list[PathOrUri] = []
    """Folders whose sub-folders are adapters (e.g. a sweep's output); each is served under its folder name."""
    max_loaded: Int = Field(4, ge=1)
    """Adapters kept in memory per replica; the least recently used is unloaded beyond this."""


# Engine arguments raylm sets from its own keys: giving them in vllm.engine_kwargs would be ambiguous.
VLLM_OWNED_KWARGS = {
    "model": "serve.model",
    "served_model_name": "serve.model_id",
    "dtype": "serve.dtype",
    "max_model_len": "serve.max_context",
    "max_num_seqs": "serve.batching.max_batch_size",
    "quantization": "serve.quantization.method",
    "trust_remote_code": "serve.trust_remote_code",
    "tensor_parallel_size": "serve.vllm.tensor_parallel_size",
    "enable_lora": "serve.adapters",
    "max_loras": "serve.adapters.max_loaded",
    "kv_cache_memory_bytes": "serve.vllm.kv_cache_gib",
    "gpu_memory_utilization": "serve.vllm.gpu_memory_utilization",
    "enforce_eager": "serve.vllm.enforce_eager",
    "chat_template": "serve.chat_template",
}


class VLLMSection(Section):
    tensor_parallel_size: Int = Field(1, ge=1)
    """GPUs one replica shards the model over (vLLM tensor parallelism); num_gpus must match it."""
    kv_cache_gib: Float | None = Field(None, gt=0)
    """KV cache per replica in GiB. None: on GPUs vLLM sizes it from gpu_memory_utilization; on a CPU
    replica raylm reserves CPU_KV_CACHE_GIB (vLLM's CPU default would claim 92% of the node's memory)."""
    gpu_memory_utilization: Float = Field(0.9, gt=0, le=1)
    """Fraction of GPU memory vLLM may use for weights, activations and KV cache."""
    enforce_eager: Bool = False
    """Skip CUDA graphs and compilation: faster start-up, slower decoding (vLLM's --enforce-eager)."""
    engine_kwargs: dict[str, Any] = {}
    """Other vLLM engine arguments, passed as they are (e.g. enable_prefix_caching, max_num_batched_tokens)."""
    env_vars: dict[str, str] = {}
    """Environment of the replicas and their engine processes (e.g. VLLM_CPU_OMP_THREADS_BIND=0-7)."""

    @field_validator("engine_kwargs")
    @classmethod
    def _known_and_not_owned(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        for key in sorted(set(kwargs) & set(VLLM_OWNED_KWARGS)):
            raise ValueError(f"{key} is set by raylm: use {VLLM_OWNED_KWARGS[key]} instead")
        known = vllm_argument_names() if kwargs else None
        for key in sorted(set(kwargs) - (known or set(kwargs))):
            raise ValueError(f"{key} is not an engine argument of the installed vLLM")
        return kwargs


@functools.cache
def vllm_argument_names() -> frozenset[str] | None:
    """The engine and frontend argument names of the installed vLLM (what Serve LLM accepts in
    engine_kwargs); None without vLLM, whose absence the engine's preflight reports (vllm_checks)."""
    if importlib.util.find_spec("vllm") is None:
        return None
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    return frozenset(f.name for cls in (AsyncEngineArgs, FrontendArgs) for f in dataclasses.fields(cls))


class ServeConfig(Section):
    engine: Literal["raylm", "vllm"] = "raylm"
    """raylm: transformers + bitsandbytes, runs anywhere torch does. vllm: vLLM through Ray Serve LLM
    (paged attention, continuous batching, CUDA graphs); needs the vllm extra (README: Serving engines)."""
    vllm: VLLMSection = VLLMSection()
    """Settings of the vllm engine only."""
    model: PathOrUri | None = None
    """Local path of the HF model to serve; defaults to the train stage's export/."""
    model_id: str | None = None
    """Name clients use in the `model` field for the base model; defaults to the recipe's name."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype (the compute dtype of quantized layers too); float16 needs a GPU to be fast."""
    quantization: QuantizationConfig = QuantizationConfig()
    """Load-time weight quantization."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model runs; auto picks cuda when the replica has a GPU."""
    trust_remote_code: Bool = False
    """Allow model code shipped with the checkpoint to run; off because it executes arbitrary code."""
    chat_template: str | None = None
    """Jinja chat template overriding the tokenizer's; None uses the tokenizer's, else raylm's default."""
    max_context: Int | None = Field(None, ge=8)
    """Cap on prompt + completion tokens; None uses the model's max_position_embeddings."""
    default_max_tokens: Int = Field(64, ge=1)
    """Completion length when a request gives no max_tokens (clipped to the room left in the context)."""
    max_n: Int = Field(8, ge=1)
    """Largest `n` (choices per prompt) a request may ask for."""
    batching: BatchingConfig = BatchingConfig()
    """Dynamic batching (changeable at run time through Serve user_config)."""
    adapters: AdaptersConfig = AdaptersConfig()
    """LoRA adapters multiplexed on the base model."""
    sweep: PathOrUri | None = None
    """A tuning output whose adapters are served too: its best as `best`, and adapters/NN-<trial> by
    folder name, best first; defaults to the tune stage's output when the recipe has a tune section."""
    num_replicas: Int | None = Field(1, ge=1)
    """Fixed number of replicas; set to null when autoscaling is used."""
    autoscaling: AutoscalingSection | None = None
    """Autoscaling bounds; replaces num_replicas when set."""
    num_cpus: Float = Field(1, ge=0)
    """CPUs reserved per replica (torch uses this many threads, at least 1)."""
    num_gpus: Float = Field(0, ge=0)
    """GPUs reserved per replica."""
    max_ongoing_requests: Int = Field(64, ge=1)
    """Requests one replica works on or holds in its batch queue at once."""
    max_queued_requests: Int = Field(256, ge=0)
    """Requests waiting for a replica beyond max_ongoing_requests; more are answered 503 + Retry-After."""
    retry_after_s: Float = Field(1, ge=0, le=86_400)
    """Retry-After (seconds) sent with a 503 when the queue is full."""
    http: HttpConfig = HttpConfig()
    """HTTP proxy and authentication."""
    niceness: Int | None = Field(None, ge=0, le=19)
    """Scheduling niceness of the replicas; None keeps Ray's worker default (15: they yield the CPU to any
    process at 0 on the node). 0 on nodes shared with other work (README: Serving engines)."""
    app_name: str = "raylm"
    """Ray Serve application name."""

    @model_validator(mode="after")
    def _check_combinations(self) -> ServeConfig:
        if self.autoscaling is not None and self.num_replicas is not None:
            raise ValueError("set either num_replicas or autoscaling, not both (set num_replicas: null)")
        if self.autoscaling is None and self.num_replicas is None:
            raise ValueError("num_replicas is null but no autoscaling section is given")
        if self.batching.max_batch_size > self.max_ongoing_requests * self.max_n:
            raise ValueError(
                f"batching.max_batch_size ({self.batching.max_batch_size}) can never fill: a replica holds at most "
                f"max_ongoing_requests x max_n = {self.max_ongoing_requests * self.max_n} sequences"
            )
        self._check_engine()
        if self.quantization.method != "none" and self.dtype == "float16" and self.device == "cpu":
            raise ValueError(
                "quantized float16 compute is not supported on cpu; use dtype float32 or bfloat16"
            )
        if self.device == "cuda" and self.num_gpus == 0:
            raise ValueError("device is cuda but num_gpus is 0: the replica would get no GPU")
        clash = set(self.adapters.paths) & ({self.model_id} if self.model_id else set())
        if clash:
            raise ValueError(
                f"adapter id {clash.pop()!r} is the same as model_id; adapter ids must differ from the base"
            )
        return self

    def _check_engine(self) -> None:
        method = self.quantization.method
        if self.engine == "raylm" and method not in RAYLM_QUANTIZATION:
            raise ValueError(
                f"quantization.method {method} is a vLLM method: set engine: vllm, or use one of "
                f"{', '.join(RAYLM_QUANTIZATION)} with the raylm engine"
            )
        if self.engine != "vllm":
            return
        if method not in VLLM_QUANTIZATION:
            raise ValueError(
                f"quantization.method {method} is the raylm engine's (bitsandbytes at load time): with "
                f"engine: vllm use one of {', '.join(VLLM_QUANTIZATION)}"
            )
        if self.num_gpus == 0 and method == "fp8":
            raise ValueError("quantization.method fp8 runs on GPUs only: set num_gpus, or use engine: raylm")
        tp = self.vllm.tensor_parallel_size
        if tp > 1 and self.num_gpus != tp:
            raise ValueError(
                f"vllm.tensor_parallel_size is {tp}, so num_gpus must be {tp} (got {self.num_gpus})"
            )
        if self.num_gpus > 1 and tp == 1:
            raise ValueError(f"num_gpus is {self.num_gpus}: set vllm.tensor_parallel_size to match it")

    def runs_on_cpu(self) -> bool:
        return self.num_gpus == 0 or self.device == "cpu"

    def replica_env(self) -> dict[str, str]:
        """Environment variables of the replica processes (Ray reads RAY_worker_niceness at worker start)."""
        env = {} if self.niceness is None else {"RAY_worker_niceness": str(self.niceness)}
        return {**env, **(self.vllm.env_vars if self.engine == "vllm" else {})}

    def user_config(self) -> dict[str, float | int]:
        """The part of the config a running deployment can change without reloading the model."""
        return self.batching.model_dump()
