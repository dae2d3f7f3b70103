"""Config of the compression stage (`compress:` in a recipe): which methods, calibration, evaluation.

Each method writes its own Hugging Face model folder under the output: gptq_w4a16 (GPTQ int4 weights,
groups of gptq.group_size, 16-bit activations), w8a8 (SmoothQuant, then GPTQ int8 weights per output
channel, int8 activations per token at run time), sparse_2of4 (2 of every 4 consecutive weights zero)
and sparse_unstructured (prune.sparsity of each row's weights zero), pruned with SparseGPT or by magnitude;
distill (a student with fewer layers trained against the model's logits by the training loop on Ray Train,
compression/distill.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError, model_validator

from raylm.core.schema import Bool, Float, Fraction, Int, PathOrUri, Section, Seed
from raylm.training.config import CheckpointConfig, DeepSpeedConfig, ScheduleConfig, TrainConfig

Method = Literal["gptq_w4a16", "w8a8", "sparse_2of4", "sparse_unstructured", "distill"]
QUANTIZED: tuple[str, ...] = ("gptq_w4a16", "w8a8")
PRUNED: tuple[str, ...] = ("sparse_2of4", "sparse_unstructured")


class CalibrationConfig(Section):
    num_samples: Int = Field(128, ge=1, le=1_000_000)
    """Rows of token ids drawn (without replacement) from the curated split to calibrate on."""
    seq_len: Int | None = Field(None, ge=2, le=1_000_000)
    """Tokens per calibration sample (the first seq_len of each row); null: the shards' row length."""
    seed: Seed | None = None
    """Seed of the draw; null takes the recipe's seed."""
    split: Literal["train", "finetune"] = "train"
    """The curated split the samples come from."""
    batch_size: Int = Field(8, ge=1, le=100_000)
    """Samples per forward pass while calibrating."""


class EvalConfig(Section):
    split: Literal["eval", "finetune_eval"] = "eval"
    """The held-out curated split perplexity is measured on."""
    max_rows: Int = Field(64, ge=1, le=10_000_000)
    """Rows of it scored (the first ones, so every method sees the same text)."""
    batch_size: Int = Field(8, ge=1, le=100_000)
    """Rows per forward pass."""


class GptqConfig(Section):
    group_size: Int | None = Field(128, ge=2, le=1_000_000)
    """gptq_w4a16: input columns sharing one scale (must divide every Linear's input size); null: one
    scale per output channel. w8a8 always uses one scale per output channel."""
    dampening: Float = Field(0.01, gt=0, le=1)
    """Added to the Hessian's diagonal, as a fraction of its mean, before it is inverted."""


class SmoothQuantConfig(Section):
    alpha: Fraction = 0.5
    """w8a8: how much of the activations' range moves into the weights (0: none, SmoothQuant's 0.5)."""


class PruneConfig(Section):
    algorithm: Literal["sparsegpt", "magnitude"] = "sparsegpt"
    """sparsegpt: calibrated, the pruning error pushed onto the weights kept; magnitude: smallest |w|."""
    sparsity: Float = Field(0.5, gt=0, lt=1)
    """sparse_unstructured: the fraction of each Linear's weights set to zero (2:4 is always 0.5)."""


class DistillConfig(Section):
    student_layers: Int | None = Field(None, ge=1, le=100_000)
    """Layers of a student built from the model's own config; null: half the model's (rounded down)."""
    student: PathOrUri | None = None
    """A local HF checkpoint to distill into instead (same tokenizer, fewer layers); exclusive with student_layers."""
    init: Literal["teacher_layers", "random"] = "teacher_layers"
    """A built student starts from evenly spaced layers of the teacher (as DistilBERT does), or random."""
    temperature: Float = Field(2.0, gt=0, le=100)
    """Softmax temperature of the KL term (scaled by temperature^2)."""
    alpha: Fraction = 0.5
    """Weight of the KL term; 1 - alpha weighs the cross-entropy on the data (0: no teacher at all)."""
    max_steps: Int = Field(200, ge=1, le=100_000_000)
    """Optimizer steps of the student's training."""
    num_workers: Int = Field(2, ge=1, le=100_000)
    """Ray Train workers (each holds a frozen teacher replica)."""
    cpus_per_worker: Float = Field(1, gt=0, le=10_000)
    """CPUs reserved per worker."""
    use_gpu: Bool = False
    """One GPU per worker with NCCL; otherwise CPU workers with gloo."""
    micro_batch_size: Int = Field(4, ge=1, le=100_000)
    """Sequences per worker per forward pass."""
    global_batch_size: Int = Field(8, ge=1, le=100_000_000)
    """Sequences per optimizer step over all workers."""
    eval_every: Int = Field(0, ge=0, le=100_000_000)
    """Evaluate the student on compress.eval.split every this many steps (and at the end); 0: at the end."""
    log_every: Int = Field(10, ge=1, le=100_000_000)
    """Log a metrics line on rank 0 every this many steps."""
    schedule: ScheduleConfig = ScheduleConfig()
    """AdamW and the warmup + cosine schedule of the student."""
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    """DeepSpeed ZeRO, precision, clipping of the student (the teacher is never partitioned)."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Checkpoints and restarts; storage_path defaults to distill_train/checkpoints in the output (removed
    when done), set it to a lasting folder or URI so a rerun of a killed compress resumes there."""

    @model_validator(mode="after")
    def _checks(self) -> DistillConfig:
        if self.student is not None and self.student_layers is not None:
            raise ValueError("set at most one of distill.student (a checkpoint) and distill.student_layers")
        try:  # the training stage's cross-field rules (batch divisibility, warmup, fp16 on CPU, ...)
            self.train_config(model_path="/student", data_dir=None, output=None, seed=0)
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return self

    def train_config(
        self, model_path: str, data_dir: str | None, output: str | None, seed: int, splits=("train", "eval")
    ) -> TrainConfig:
        """The training stage's config of the student run."""
        return TrainConfig(
            data_dir=data_dir,
            train_split=splits[0],
            eval_split=splits[1],
            output=output,
            model={"path": model_path},
            deepspeed=self.deepspeed,
            schedule=self.schedule,
            checkpoint=self.checkpoint,
            num_workers=self.num_workers,
            use_gpu=self.use_gpu,
            cpus_per_worker=self.cpus_per_worker,
            micro_batch_size=self.micro_batch_size,
            global_batch_size=self.global_batch_size,
            max_steps=self.max_steps,
            eval_every=self.eval_every,
            log_every=self.log_every,
            seed=seed,
        )


class ResourcesConfig(Section):
    num_cpus: Float = Field(1, gt=0, le=10_000)
    """CPUs of each Ray task (one task per method, plus one for the reference perplexity)."""
    num_gpus: Float = Field(0, ge=0, le=64)
    """GPUs of each task; > 0 calibrates on CUDA."""


class CompressConfig(Section):
    model: PathOrUri | None = None
    """The model to compress (a local HF safetensors folder); defaults to the train stage's export/."""
    data_dir: PathOrUri | None = None
    """Curated data (calibration and held-out rows); defaults to the curate stage's output."""
    output: PathOrUri | None = None
    """Output folder: one model folder per method, compare.json, manifest.json; default <run_dir>/compress."""
    methods: list[Method] = ["gptq_w4a16"]
    """What to produce, one folder each: gptq_w4a16, w8a8, sparse_2of4, sparse_unstructured, distill."""
    calibration: CalibrationConfig = CalibrationConfig()
    """The calibration samples."""
    eval: EvalConfig = EvalConfig()
    """The held-out perplexity of the comparison table."""
    gptq: GptqConfig = GptqConfig()
    """GPTQ settings (gptq_w4a16, w8a8)."""
    smoothquant: SmoothQuantConfig = SmoothQuantConfig()
    """SmoothQuant settings (w8a8)."""
    prune: PruneConfig = PruneConfig()
    """Pruning settings (sparse_2of4, sparse_unstructured)."""
    distill: DistillConfig = DistillConfig()
    """Knowledge distillation settings (distill): the student, the loss, its training run."""
    resources: ResourcesConfig = ResourcesConfig()
    """What each Ray task reserves."""

    @model_validator(mode="after")
    def _checks(self) -> CompressConfig:
        if not self.methods:
            raise ValueError(
                "methods: list at least one of gptq_w4a16, w8a8, sparse_2of4, sparse_unstructured, distill"
            )
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods lists a method twice: {self.methods}")
        return self
