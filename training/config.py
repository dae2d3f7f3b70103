"""Config of the training stage (`train:` in a recipe).

Cross-field rules (batch divisibility, QLoRA vs ZeRO-3, offload vs stage, ...) live in the model
validators here, so a bad combination fails at config load (exit 2) before Ray or any worker starts.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator

from raylm.core.artifacts import SPLITS
from raylm.core.schema import Bool, Float, Int, PathOrUri, Section, Seed, reject_bool

Beta = Annotated[Float, Field(ge=0, lt=1)]
Split = Literal[SPLITS]  # type: ignore[valid-type]
# Literal[1] would take `true` (True == 1), so the stage number refuses booleans like every number does.
ZeroStage = Annotated[Literal[0, 1, 2, 3], BeforeValidator(reject_bool)]


class ScratchModelConfig(Section):
    """A Llama-shaped model built from a config, for pretraining from scratch (vocab from the tokenizer)."""

    hidden_size: Int = Field(64, ge=8)
    """Width of the residual stream."""
    intermediate_size: Int = Field(128, ge=8)
    """Width of the MLP."""
    num_layers: Int = Field(2, ge=1)
    """Number of transformer blocks."""
    num_heads: Int = Field(4, ge=1)
    """Attention heads."""
    num_kv_heads: Int | None = Field(None, ge=1)
    """Key/value heads (grouped-query attention); null means num_heads."""
    rope_theta: Float = Field(10000.0, gt=0)
    """RoPE base frequency."""
    tie_word_embeddings: Bool = False
    """Share the input embedding and the output head."""

    @model_validator(mode="after")
    def _heads(self) -> ScratchModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({kv})")
        return self


class ModelConfig(Section):
    path: PathOrUri | None = None
    """Local Hugging Face checkpoint folder to start from (from_pretrained); exclusive with from_scratch."""
    from_scratch: ScratchModelConfig | None = None
    """Build a random-init Llama-shaped model from this config instead of loading one (pretraining)."""
    trust_remote_code: Bool = False
    """Allow model code shipped with the checkpoint to run (off: only transformers' own architectures)."""

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.path is None) == (self.from_scratch is None):
            raise ValueError("set exactly one of model.path (a local HF checkpoint) and model.from_scratch")
        return self


class LoraConfig(Section):
    enabled: Bool = False
    """Train LoRA adapters (peft) instead of all weights."""
    r: Int = Field(8, ge=1)
    """Rank of the adapter matrices."""
    alpha: Int = Field(16, ge=1)
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: Float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    """Names of the linear layers that get adapters."""
    use_rslora: Bool = False
    """Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r (Kalajdzievski, 2023)."""
    use_dora: Bool = False
    """DoRA: learn a magnitude per output and adapt the direction with LoRA (Liu et al., 2024)."""
    quantize_4bit: Bool = False
    """QLoRA: load the frozen base in bitsandbytes 4-bit NF4 (needs lora.enabled and model.path)."""


class DeepSpeedConfig(Section):
    zero_stage: ZeroStage = 3
    """ZeRO stage: 0 plain data parallel, 1 optimizer state, 2 + gradients, 3 + parameters sharded."""
    offload_optimizer: Bool = False
    """Keep optimizer state (and the update) on CPU (DeepSpeedCPUAdam); needs zero_stage >= 1."""
    offload_params: Bool = False
    """Keep parameters on CPU between uses; needs zero_stage 3."""
    precision: Literal["bf16", "fp16", "fp32"] = "fp32"
    """Training precision; fp16 uses dynamic loss scaling, bf16 and fp32 none."""
    initial_scale_power: Int = Field(16, ge=0, le=32)
    """fp16 only: the dynamic loss scale starts at 2**initial_scale_power."""
    grad_clip: Float = Field(1.0, ge=0)
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    activation_checkpointing: Bool = False
    """Recompute activations in the backward pass (HF gradient checkpointing) to save memory."""

    @model_validator(mode="after")
    def _offload(self) -> DeepSpeedConfig:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_params needs deepspeed.zero_stage 3")
        return self


class ScheduleConfig(Section):
    lr: Float = Field(3e-4, gt=0, le=1)
    """Peak learning rate of AdamW."""
    min_lr_ratio: Float = Field(0.1, ge=0, le=1)
    """The cosine decays to lr * min_lr_ratio at max_steps."""
    warmup_steps: Int = Field(10, ge=0)
    """Linear warmup from 0 to lr over this many optimizer steps."""
    weight_decay: Float = Field(0.1, ge=0)
    """AdamW decoupled weight decay (not applied to biases and norms)."""
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    """AdamW betas."""
    eps: Float = Field(1e-8, gt=0, le=1)
    """AdamW epsilon."""


class CheckpointConfig(Section):
    every_steps: Int = Field(50, ge=1)
    """Take a checkpoint every this many optimizer steps (and always at the end)."""
    keep_last: Int = Field(2, ge=1)
    """Keep this many most recent checkpoints."""
    storage_path: PathOrUri | None = None
    """Folder or s3:// / gs:// URI for Ray Train checkpoints; defaults to <output>/checkpoints."""
    run_name: str = "run"
    """Ray Train run name under storage_path; a rerun with the same name resumes its latest checkpoint."""
    resume_from: PathOrUri | None = None
    """Start from this checkpoint folder (a step_XXXXXXXX folder); an error if it is missing or unreadable."""
    max_failures: Int = Field(3, ge=-1)
    """Worker-group restarts from the latest checkpoint before the run fails (-1: unlimited)."""
    preemption_check_every: Int = Field(5, ge=1)
    """Ask Ray for a preemption notice (a collective) every this many steps; SIGTERM is checked every step."""


class TrainConfig(Section):
    data_dir: PathOrUri | None = None
    """Curated data folder (shards/, tokenizer/, manifest.json); defaults to the curate stage's output."""
    train_split: Split = "train"
    """The curated split trained on (finetune: the part of the corpus held apart from pretraining)."""
    eval_split: Split = "eval"
    """The curated split evaluated on (finetune_eval goes with train_split finetune)."""
    output: PathOrUri | None = None
    """Output folder (checkpoints live under storage_path, export/ and manifest.json here); defaults to <run_dir>/train."""
    model: ModelConfig
    """What to train: a local HF checkpoint or a from-scratch config."""
    lora: LoraConfig = LoraConfig()
    """LoRA / QLoRA adapters (peft)."""
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    """DeepSpeed ZeRO, precision, offload, clipping."""
    schedule: ScheduleConfig = ScheduleConfig()
    """AdamW and the warmup + cosine schedule."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Checkpointing and recovery."""
    num_workers: Int = Field(2, ge=1)
    """Ray Train workers (one process each; one GPU each when use_gpu)."""
    use_gpu: Bool = False
    """One GPU per worker with NCCL; otherwise CPU workers with gloo (DS_ACCELERATOR=cpu)."""
    cpus_per_worker: Float = Field(1, gt=0)
    """CPUs reserved per worker."""
    micro_batch_size: Int = Field(4, ge=1)
    """Sequences per worker per forward pass."""
    global_batch_size: Int = Field(8, ge=1)
    """Sequences per optimizer step over all workers; accumulation = global / (micro * workers)."""
    max_steps: Int = Field(100, ge=1)
    """Optimizer steps to train."""
    eval_every: Int = Field(0, ge=0)
    """Evaluate on the held-out split every this many steps (and at the end); 0: only at the end."""
    eval_batches: Int = Field(8, ge=1)
    """At most this many micro batches per worker per evaluation."""
    log_every: Int = Field(1, ge=1)
    """Log a metrics line on rank 0 every this many steps."""
    report_every: Int = Field(10, ge=1)
    """Send metrics to Ray Train every this many steps and on checkpoint steps (each report is a barrier
    that waits for Ray's controller, about a second, so a report per short step would slow training)."""
    seed: Seed | None = None
    """Seed of init, data order and RNG; null takes the recipe's top-level seed."""
    peak_flops: Float | None = Field(None, gt=0)
    """Peak FLOP/s of one device for MFU; null: 989e12 (H100 bf16 dense) on CUDA, measured matmul rate on CPU."""
    export: Bool = True
    """Write export/ (consolidated safetensors model, or the PEFT adapter) at the end."""

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainConfig:
        per_step = self.micro_batch_size * self.num_workers
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size}) * num_workers ({self.num_workers}) = {per_step}"
            )
        if self.lora.quantize_4bit:
            if not self.lora.enabled:
                raise ValueError("lora.quantize_4bit (QLoRA) needs lora.enabled: true")
            if self.deepspeed.zero_stage == 3:
                raise ValueError(
                    "lora.quantize_4bit (QLoRA) cannot be combined with deepspeed.zero_stage 3: "
                    "4-bit weights cannot be partitioned; use zero_stage 0-2"
                )
            if self.model is not None and self.model.path is None:  # a tuning trial's model comes later
                raise ValueError(
                    "lora.quantize_4bit (QLoRA) needs a pretrained model.path, not model.from_scratch"
                )
            if not self.use_gpu:
                raise ValueError(
                    "lora.quantize_4bit (QLoRA) needs use_gpu: true (bitsandbytes 4-bit runs on CUDA)"
                )
        if self.deepspeed.precision == "fp16" and not self.use_gpu:
            raise ValueError(
                "deepspeed.precision fp16 needs use_gpu: true (DeepSpeed's CPU backend has no fp16)"
            )
        if self.deepspeed.offload_optimizer and not self.use_gpu:
            raise ValueError(
                "deepspeed.offload_optimizer only makes sense with use_gpu: true (CPU workers keep state on CPU)"
            )
        if self.schedule.warmup_steps >= self.max_steps and self.schedule.warmup_steps > 0:
            raise ValueError(
                f"schedule.warmup_steps ({self.schedule.warmup_steps}) must be below max_steps ({self.max_steps})"
            )
        return self

    @property
    def grad_accum(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)
