"""Config of the tuning stage (`tune:` in a recipe): what every trial trains, the search space, the
search algorithm, early stopping, and what a trial may use.

A space that cannot be sampled (empty choices, a rank <= 0, low >= high, LoRA keys on a full fine-tune,
a continuous range under grid search) fails here, at config load, naming the key. Module names that
this model does not have are checked by the stage's preflight, which reads the model's config.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from raylm.core.schema import Bool, Float, Int, PathOrUri, Section, Seed
from raylm.training.config import DeepSpeedConfig, LoraConfig, ModelConfig, TrainConfig
from raylm.tuning.spaces import SpaceConfig, resolve_space

Algorithm = Literal["tpe", "random", "grid"]


class TrialConfig(TrainConfig):
    """The training run every trial starts from (a `train:` section); the space overrides its fields.
    model, data_dir and output are filled by the stage: model from tune.model, output per trial."""

    model: ModelConfig | None = None  # type: ignore[assignment]
    """Filled from tune.model; set it only to pass model options (trust_remote_code)."""
    lora: LoraConfig = LoraConfig(enabled=True)
    """The adapters every trial starts from (set enabled: false to tune a full fine-tune's lr)."""
    deepspeed: DeepSpeedConfig = DeepSpeedConfig(zero_stage=0)
    """ZeRO stage 0 by default: a one-worker trial has nothing to shard."""
    num_workers: Int = Field(1, ge=1)
    """Workers per trial: 1 runs the loop inside the trial's own process, more a TorchTrainer per trial."""
    export: Bool = True
    """Every trial exports its adapter (or model) so the best ones can be served."""


class SearchConfig(Section):
    algorithm: Algorithm = "tpe"
    """tpe: Optuna's TPE through Ray Tune's OptunaSearch; random: random sampling; grid: every combination
    of the space's choices once."""
    num_samples: Int | None = Field(None, ge=1, le=100_000)
    """Trials to run (tpe, random; default 8); a grid runs each combination once, so leave it unset."""
    max_concurrent: Int = Field(2, ge=1, le=10_000)
    """Trials running at the same time."""
    seed: Seed | None = None
    """Seed of the searcher; null takes the recipe's seed."""


class SchedulerConfig(Section):
    type: Literal["asha", "none"] = "asha"
    """asha: stop trials whose validation loss is in the worse part of their rung (async successive halving)."""
    budget: Literal["steps", "tokens"] = "steps"
    """What ASHA counts: optimizer steps, or training tokens (steps x global batch x seq_len)."""
    grace_period: Int | None = Field(None, ge=1)
    """The budget every trial gets before it can be stopped (default: trial.eval_every steps, in the
    budget's unit)."""
    reduction_factor: Float = Field(3, gt=1, le=100)
    """Each rung keeps the best 1/reduction_factor of the trials that reach it."""


class ResourcesConfig(Section):
    cpus: Float = Field(1, gt=0, le=10_000)
    """CPUs per trial (per worker when trial.num_workers > 1)."""
    gpus: Float = Field(0, ge=0, le=64)
    """GPUs per trial (per worker when trial.num_workers > 1); fractions let small trials share a GPU."""


class TuneConfig(Section):
    model: PathOrUri | None = None
    """The base model (a local HF folder) the trials fine-tune; defaults to the train stage's export/."""
    data_dir: PathOrUri | None = None
    """Curated data folder; defaults to the curate stage's output."""
    output: PathOrUri | None = None
    """Output folder (trials.csv, best_config.yaml, best_adapter/, adapters/, plots, the Ray Tune
    experiment); defaults to <run_dir>/tune."""
    trial: TrialConfig = TrialConfig()
    """What every trial trains before the space is applied (LoRA on, by default)."""
    space: SpaceConfig = SpaceConfig()
    """The search space: a preset and/or parameters written here (these win over the preset's)."""
    search: SearchConfig = SearchConfig()
    """Search algorithm, trials, concurrency."""
    scheduler: SchedulerConfig = SchedulerConfig()
    """Early stopping."""
    resources: ResourcesConfig = ResourcesConfig()
    """What one trial reserves."""
    keep_adapters: Int = Field(3, ge=1, le=1000)
    """The best this many adapters are copied to adapters/ (best first) for `raylm serve`."""
    resume: Bool = False
    """Continue the sweep in `output` (Tuner.restore) after a crash; `raylm tune RECIPE --resume`."""

    @model_validator(mode="after")
    def _checks(self) -> TuneConfig:
        space = resolve_space(self.space, lora=self.trial.lora.enabled, algorithm=self.search.algorithm)
        if self.search.algorithm == "grid" and self.search.num_samples is not None:
            raise ValueError(
                "search.num_samples: a grid runs every combination of the space once; leave it unset"
            )
        if self.scheduler.type == "asha" and not self.trial.eval_every:
            raise ValueError(
                "trial.eval_every must be > 0 with scheduler asha: ASHA compares validation losses "
                "during training"
            )
        if space.get("quantize_4bit") and not self.trial.use_gpu:
            raise ValueError("space.quantize_4bit (QLoRA) needs trial.use_gpu: true")
        return self

    def sampled(self) -> dict[str, Any]:
        """The resolved space (preset merged with the recipe's parameters)."""
        return resolve_space(self.space, lora=self.trial.lora.enabled, algorithm=self.search.algorithm)
