"""Config of the serving stage (`serve:` in a recipe).

Everything that shapes the deployment lives here, so a bad combination fails at config load (exit 2)
before Ray starts. Batching parameters reach the replicas through Serve's `user_config`, so they can be
changed on a running deployment (`serve deploy` with a new `user_config`) without reloading the model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raylm.core.schema import Bool, Float, Int, PathOrUri, Section


class QuantizationConfig(Section):
    method: Literal["none", "int8", "nf4"] = "none"
    """Weight quantization applied at load time with bitsandbytes: none, int8 (LLM.int8) or nf4 (4-bit NormalFloat)."""
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


class ServeConfig(Section):
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

    def user_config(self) -> dict[str, float | int]:
        """The part of the config a running deployment can change without reloading the model."""
        return self.batching.model_dump()
