"""The one stage table: every stage is registered here once, and config linking and the CLI read it.

A stage is a name (also its CLI verb and its entry in a recipe's `stages:`), the recipe section holding
its config, the function that runs it (imported lazily, so `raylm check` never imports Ray or torch),
an optional preflight that runs before Ray starts, where its output goes by default, which upstream
stages' outputs it reads when the recipe does not say, and switches of its verb. Adding a stage means adding a row here
and writing the stage's own folder; nothing else in core/ changes.

Verbs that are not stages (`raylm run`, `raylm check`, and later ones with arguments of their own, such
as `raylm cluster check FILE`) are rows of VERBS in core/cli.py.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raylm.compression.config import CompressConfig
from raylm.core.artifacts import CompressDir, RunDir, TrainDir
from raylm.core.schema import Section
from raylm.pipelines.config import DataConfig
from raylm.serving.config import ServeConfig
from raylm.training.config import TrainConfig
from raylm.tuning.config import TuneConfig


@dataclass(frozen=True)
class Input:
    """A section field naming something a stage reads, filled from an upstream stage's output when unset."""

    field: str
    upstream: str
    """The stage whose output the field defaults to."""
    of: Callable[[str], str] = lambda output: output
    """Maps the upstream output folder to the path read (train's export/, say)."""
    optional: bool = False
    """Linked only when the recipe has the upstream stage's section (serve reads a sweep if there is one)."""


@dataclass(frozen=True)
class Flag:
    """A stage verb's switch that stands for an override: `raylm tune R --resume` = `tune.resume=true`."""

    name: str
    help: str
    override: str


@dataclass(frozen=True)
class Stage:
    name: str
    """The CLI verb and the name in a recipe's `stages:` list."""
    section: str
    """The recipe section holding this stage's config."""
    config: type[Section]
    """The section's config class."""
    run: str
    """"module:function" that runs the stage: run(cfg: PlatformConfig) -> Any, with Ray initialised."""
    help: str
    """One line for `raylm --help`."""
    preflight: str | None = None
    """"module:function" with checks that need no Ray (inputs exist, outputs may be written)."""
    output_field: str | None = None
    """The section field naming the stage's output folder, filled from `default_output` when unset."""
    default_output: Callable[[RunDir], str] | None = None
    """Where the output goes under run_dir by default."""
    inputs: tuple[Input, ...] = ()
    """What the stage reads, each defaulting to an upstream stage's output."""
    flags: tuple[Flag, ...] = ()
    """Switches of the stage's verb, each an override of its config."""

    def function(self, attr: str = "run") -> Callable[..., Any] | None:
        """The stage's run (or preflight) function, imported now."""
        target = getattr(self, attr)
        if target is None:
            return None
        module, name = target.split(":")
        return getattr(importlib.import_module(module), name)


STAGES: tuple[Stage, ...] = (
    Stage(
        name="curate",
        section="data",
        config=DataConfig,
        run="raylm.pipelines.run:run",
        preflight="raylm.pipelines.run:preflight",
        help="curate the corpus into token shards (pipelines/)",
        output_field="output",
        default_output=lambda run: run.curated.root,
    ),
    Stage(
        name="train",
        section="train",
        config=TrainConfig,
        run="raylm.training.run:run",
        preflight="raylm.training.run:preflight",
        help="train a model on the curated shards (training/)",
        output_field="output",
        default_output=lambda run: run.train.root,
        inputs=(Input("data_dir", "curate"),),
    ),
    Stage(
        name="tune",
        section="tune",
        config=TuneConfig,
        run="raylm.tuning.run:run",
        preflight="raylm.tuning.run:preflight",
        help="sweep LoRA and learning-rate hyperparameters with Ray Tune; best adapter to serving (tuning/)",
        output_field="output",
        default_output=lambda run: run.tune.root,
        inputs=(
            Input("model", "train", lambda output: TrainDir(output).export.root),
            Input("data_dir", "curate"),
        ),
        flags=(
            Flag("--resume", "continue a killed sweep in tune.output (Tuner.restore)", "tune.resume=true"),
        ),
    ),
    Stage(
        name="compress",
        section="compress",
        config=CompressConfig,
        run="raylm.compression.run:run",
        preflight="raylm.compression.run:preflight",
        help="quantize (GPTQ W4A16, SmoothQuant W8A8), prune (2:4, unstructured) or distill (fewer layers) the trained model (compression/)",
        output_field="output",
        default_output=lambda run: CompressDir.under(run).root,
        inputs=(
            Input("model", "train", lambda output: TrainDir(output).export.root),
            Input("data_dir", "curate"),
        ),
    ),
    Stage(
        name="serve",
        section="serve",
        config=ServeConfig,
        run="raylm.serving.run:run",
        preflight="raylm.serving.run:preflight",
        help="serve the trained model behind an OpenAI-compatible API (serving/)",
        inputs=(
            Input("model", "train", lambda output: TrainDir(output).export.root),
            Input("sweep", "tune", optional=True),
        ),
    ),
)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def output_of(stage: Stage, cfg: Any) -> str | None:
    """The stage's output folder in this config: its section's field, else its default under run_dir."""
    section = getattr(cfg, stage.section)
    if section is not None and stage.output_field and getattr(section, stage.output_field):
        return getattr(section, stage.output_field)
    return stage.default_output(RunDir(cfg.run_dir)) if stage.default_output else None


def link(cfg: Any, assign: Callable[[Section, str, Any], None]) -> None:
    """Fill every unset output and input path from the table: each stage reads the previous stage's
    output unless the recipe points it elsewhere."""
    for stage in STAGES:
        section = getattr(cfg, stage.section)
        if section is None:
            continue
        if stage.output_field and getattr(section, stage.output_field) is None:
            assign(section, stage.output_field, output_of(stage, cfg))
        for read in stage.inputs:
            upstream = BY_NAME[read.upstream]
            if read.optional and getattr(cfg, upstream.section) is None:
                continue
            if getattr(section, read.field) is None:
                assign(section, read.field, read.of(output_of(upstream, cfg)))
