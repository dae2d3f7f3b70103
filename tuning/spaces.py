"""LoRA (and full fine-tuning) search spaces: how a recipe writes one, the named presets, and how a
sampled point becomes a trial's training config.

A parameter is a fixed value, `{choice: [...]}`, `{log_uniform: [low, high]}` or `{uniform: [low, high]}`;
alpha may also be `{tied: k}` (alpha = k * rank, so the LoRA scale stays put when the rank moves).
Target modules are named by group (attention, mlp, all: found in the model by where its linear layers
sit) or as a comma-separated list of layer names ("q_proj,v_proj"): Optuna's categorical choices must be
plain strings.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from raylm.core.schema import Bool, Float, Int, Section

MODULE_GROUPS = ("attention", "mlp", "all")
Rank = Annotated[Int, Field(ge=1, le=4096)]
LORA_KEYS = ("rank", "alpha", "dropout", "target_modules", "rslora", "dora", "quantize_4bit")


class _Range(Section):
    """A float searched over: one of choice, log_uniform or uniform (subclasses bound the values)."""

    @model_validator(mode="after")
    def _one(self) -> _Range:
        given = [k for k in ("choice", "log_uniform", "uniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, log_uniform, uniform (got {given or 'none'})")
        bounds = self.log_uniform or self.uniform
        if bounds is not None and bounds[0] >= bounds[1]:
            raise ValueError(f"low ({bounds[0]}) must be below high ({bounds[1]})")
        if self.log_uniform is not None and self.log_uniform[0] <= 0:
            raise ValueError(f"log_uniform needs low > 0 (got {self.log_uniform[0]})")
        return self


LearningRate = Annotated[Float, Field(gt=0, le=1)]
Probability = Annotated[Float, Field(ge=0, lt=1)]


class LrParam(_Range):
    choice: list[LearningRate] | None = Field(None, min_length=1)
    """Learning rates to pick from."""
    log_uniform: tuple[LearningRate, LearningRate] | None = None
    """[low, high], sampled uniformly in log space."""
    uniform: tuple[LearningRate, LearningRate] | None = None
    """[low, high], sampled uniformly."""


class DropoutParam(_Range):
    choice: list[Probability] | None = Field(None, min_length=1)
    """Dropout rates to pick from."""
    log_uniform: tuple[Probability, Probability] | None = None
    """[low, high], sampled uniformly in log space (low > 0)."""
    uniform: tuple[Probability, Probability] | None = None
    """[low, high], sampled uniformly."""


class RankParam(Section):
    choice: list[Rank] = Field(..., min_length=1)
    """LoRA ranks to pick from (each >= 1)."""


class AlphaParam(Section):
    """LoRA alpha: free choices, or tied to the rank."""

    choice: list[Annotated[Int, Field(ge=1, le=1 << 16)]] | None = Field(None, min_length=1)
    """Alpha values to pick from."""
    tied: Float | None = Field(None, gt=0, le=1024)
    """alpha = tied * rank (e.g. 2 for the common alpha = 2r)."""

    @model_validator(mode="after")
    def _one(self) -> AlphaParam:
        if (self.choice is None) == (self.tied is None):
            raise ValueError("give exactly one of choice and tied")
        return self


class ModulesParam(Section):
    choice: list[str] = Field(..., min_length=1)
    """Module sets to pick from: attention, mlp, all, or "name,name,..." of linear layers."""

    @model_validator(mode="after")
    def _names(self) -> ModulesParam:
        for item in self.choice:
            if not module_names(item) and item not in MODULE_GROUPS:
                raise ValueError(f"{item!r} is neither a group ({', '.join(MODULE_GROUPS)}) nor layer names")
        return self


class BoolParam(Section):
    choice: list[Bool] = Field(..., min_length=1)
    """Switch values to try (e.g. [false, true])."""


Preset = Literal["lora-lr", "lora", "lora-wide", "lora-grid", "full-lr", "qlora"]


class SpaceConfig(Section):
    preset: Preset | None = None
    """A named space (see tuning/spaces.py PRESETS); parameters written here replace the preset's."""
    lr: LrParam | None = None
    """Peak learning rate."""
    rank: RankParam | None = None
    """LoRA rank r."""
    alpha: AlphaParam | None = None
    """LoRA alpha, free or tied to the rank."""
    dropout: DropoutParam | None = None
    """LoRA dropout (0 <= p < 1)."""
    target_modules: ModulesParam | None = None
    """Which linear layers get adapters."""
    rslora: BoolParam | None = None
    """Rank-stabilised LoRA scaling (alpha / sqrt(r))."""
    dora: BoolParam | None = None
    """Weight-decomposed LoRA (DoRA)."""
    quantize_4bit: BoolParam | None = None
    """QLoRA: a 4-bit NF4 base (CUDA only)."""


PRESETS: dict[str, dict[str, Any]] = {
    "lora-lr": {"lr": {"log_uniform": [1e-4, 3e-2]}},
    "lora": {
        "lr": {"log_uniform": [1e-4, 3e-2]},
        "rank": {"choice": [4, 8, 16]},
        "alpha": {"tied": 2},
        "dropout": {"choice": [0.0, 0.05]},
        "target_modules": {"choice": ["attention", "all"]},
    },
    "lora-wide": {
        "lr": {"log_uniform": [3e-5, 3e-2]},
        "rank": {"choice": [4, 8, 16, 32, 64]},
        "alpha": {"choice": [8, 16, 32, 64]},
        "dropout": {"uniform": [0.0, 0.1]},
        "target_modules": {"choice": ["attention", "mlp", "all"]},
        "rslora": {"choice": [False, True]},
        "dora": {"choice": [False, True]},
    },
    "lora-grid": {
        "lr": {"choice": [3e-4, 1e-3, 3e-3, 1e-2]},
        "rank": {"choice": [4, 8, 16]},
        "alpha": {"tied": 2},
        "target_modules": {"choice": ["attention", "all"]},
    },
    "full-lr": {"lr": {"log_uniform": [1e-5, 3e-3]}},
    "qlora": {
        "lr": {"log_uniform": [1e-4, 3e-2]},
        "rank": {"choice": [8, 16, 32]},
        "alpha": {"tied": 2},
        "target_modules": {"choice": ["attention", "all"]},
        "quantize_4bit": {"choice": [True]},
    },
}


# ---- resolving a space ----------------------------------------------------------------------------


def resolve_space(space: SpaceConfig, lora: bool, algorithm: str) -> dict[str, Section]:
    """The preset's parameters with the recipe's on top, checked against the trial and the algorithm.
    Raises ValueError naming the key (`space.<name>: ...`)."""
    merged: dict[str, Section] = {}
    if space.preset is not None:
        preset = SpaceConfig.model_validate(PRESETS[space.preset])
        merged.update({k: v for k in SPACE_KEYS if (v := getattr(preset, k)) is not None})
    merged.update({k: v for k in SPACE_KEYS if (v := getattr(space, k)) is not None})
    if not merged:
        raise ValueError("space is empty: name a preset or at least one parameter (space.lr, ...)")
    for key in merged:
        if key in LORA_KEYS and not lora:
            raise ValueError(f"space.{key}: a LoRA parameter, but trial.lora.enabled is false")
        param = merged[key]
        if algorithm == "grid" and isinstance(param, _Range) and param.choice is None:
            raise ValueError(f"space.{key}: grid search needs choice values, not a continuous range")
    return merged


SPACE_KEYS = ("lr", *LORA_KEYS)


def to_param_space(space: dict[str, Section], algorithm: str) -> dict[str, Any]:
    """Ray Tune's param_space: tune.grid_search for a grid, else tune.choice / loguniform / uniform.
    A tied alpha is a constant (the trial multiplies it by the sampled rank)."""
    from ray import tune

    def choice(values: list[Any]) -> Any:
        return tune.grid_search(values) if algorithm == "grid" else tune.choice(values)

    out: dict[str, Any] = {}
    for key, param in space.items():
        if isinstance(param, AlphaParam) and param.tied is not None:
            out["alpha_per_rank"] = param.tied
        elif isinstance(param, _Range) and param.log_uniform is not None:
            out[key] = tune.loguniform(*param.log_uniform)
        elif isinstance(param, _Range) and param.uniform is not None:
            out[key] = tune.uniform(*param.uniform)
        else:
            out[key] = choice(list(param.choice))
    return out


def grid_size(space: dict[str, Section]) -> int:
    size = 1
    for param in space.values():
        size *= len(getattr(param, "choice", None) or [1])
    return size


def module_names(item: str) -> list[str]:
    """ "q_proj, v_proj" -> ["q_proj", "v_proj"]; a group name gives []."""
    if item in MODULE_GROUPS:
        return []
    return [name.strip() for name in item.split(",") if name.strip()]


def apply_params(
    train: dict[str, Any], params: dict[str, Any], groups: dict[str, list[str]]
) -> dict[str, Any]:
    """A trial's training config (a TrainConfig dump): `train` with the sampled point written in.
    `groups` maps attention / mlp / all to this model's layer names (linear_module_groups)."""
    out = {**train, "schedule": dict(train["schedule"]), "lora": dict(train["lora"])}
    lora = out["lora"]
    if "lr" in params:
        out["schedule"]["lr"] = float(params["lr"])
    if "rank" in params:
        lora["r"] = int(params["rank"])
    if "alpha_per_rank" in params:
        lora["alpha"] = max(1, round(float(params["alpha_per_rank"]) * lora["r"]))
    elif "alpha" in params:
        lora["alpha"] = int(params["alpha"])
    if "dropout" in params:
        lora["dropout"] = float(params["dropout"])
    if "target_modules" in params:
        item = params["target_modules"]
        lora["target_modules"] = groups[item] if item in MODULE_GROUPS else module_names(item)
    for key, field in (("rslora", "use_rslora"), ("dora", "use_dora"), ("quantize_4bit", "quantize_4bit")):
        if key in params:
            lora[field] = bool(params[key])
    return out


# ---- the model's linear layers -----------------------------------------------------------------


ATTENTION_PARENTS = ("attn", "attention")
MLP_PARENTS = ("mlp", "feed_forward", "ffn")


def linear_module_groups(model_path: str, trust_remote_code: bool = False) -> dict[str, list[str]]:
    """attention / mlp / all: the names of the model's linear layers by where they sit, found by
    building the architecture from config.json on the meta device (no weights are read). The output
    head is never a LoRA target."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    groups: dict[str, set[str]] = {"attention": set(), "mlp": set(), "all": set()}
    output_head = model.get_output_embeddings()
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output_head:
            continue
        *parents, name = path.split(".")
        groups["all"].add(name)
        if any(p.endswith(ATTENTION_PARENTS) for p in parents):
            groups["attention"].add(name)
        elif any(p.endswith(MLP_PARENTS) for p in parents):
            groups["mlp"].add(name)
    return {k: sorted(v) for k, v in groups.items()}


def check_modules(space: dict[str, Section], groups: dict[str, list[str]]) -> None:
    """Raise ValueError naming space.target_modules when a set names layers this model does not have
    (or a group it has none of)."""
    param = space.get("target_modules")
    if param is None:
        return
    for item in param.choice:
        names = module_names(item)
        if not names and not groups.get(item):
            raise ValueError(f"space.target_modules: this model has no {item} linear layers")
        unknown = sorted(set(names) - set(groups["all"]))
        if unknown:
            raise ValueError(
                f"space.target_modules: {unknown} are not linear layers of this model "
                f"(it has {', '.join(groups['all'])})"
            )
