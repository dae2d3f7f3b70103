"""One typed config tree for every stage, loaded from a YAML recipe plus `a.b=c` overrides.

Each stage owns its section (pipelines/config.py, training/config.py, serving/config.py) so the fields
sit next to the code that reads them; this module assembles them under `PlatformConfig`, fills in the
paths that link one stage's output to the next stage's input, and turns every validation failure into a
`ConfigError` that names the offending key. Nothing here imports Ray: a bad recipe fails before Ray starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError, model_validator

from core.errors import ConfigError
from core.schema import Section
from pipelines.config import DataConfig
from serving.config import ServeConfig
from training.config import TrainConfig

Stage = Literal["curate", "train", "serve"]
STAGE_SECTIONS: dict[str, str] = {"curate": "data", "train": "train", "serve": "serve"}


class RayConfig(Section):
    address: str | None = None
    """Ray cluster to join; None uses RAY_ADDRESS when set (ray job submit sets it), else starts a local Ray."""
    num_cpus: int | None = None
    """CPUs for a local Ray started by raylm; None lets Ray count them."""
    include_dashboard: bool = True
    """Start the Ray dashboard with a local Ray (bound to dashboard_host)."""
    dashboard_host: str = "127.0.0.1"
    """Interface the local dashboard binds to; localhost by default so it is not exposed."""
    log_to_driver: bool = True
    """Forward worker logs to the driver's terminal."""


class PlatformConfig(Section):
    name: str
    """Name of the run; the default run_dir is runs/<name>."""
    run_dir: str | None = None
    """Folder (or s3:// / gs:// URI) under which each stage writes its artifacts."""
    stages: list[Stage] = ["curate"]
    """Stages that `raylm run` executes, in this order."""
    seed: int = 0
    """Seed shared by every stage unless a stage sets its own."""
    ray: RayConfig = RayConfig()
    """How to reach (or start) Ray."""
    data: DataConfig | None = None
    """Corpus curation (pipelines/)."""
    train: TrainConfig | None = None
    """Training (training/)."""
    serve: ServeConfig | None = None
    """Serving (serving/)."""

    @model_validator(mode="after")
    def _link_stages(self) -> PlatformConfig:
        _update(self, "run_dir", absolute(self.run_dir or f"runs/{self.name}"))
        for stage in self.stages:
            if getattr(self, STAGE_SECTIONS[stage]) is None:
                raise ValueError(
                    f"stage '{stage}' is listed in stages but the recipe has no '{STAGE_SECTIONS[stage]}' section"
                )
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages lists a stage twice: {self.stages}")
        # Each stage reads the previous stage's output unless the recipe points it elsewhere.
        curated = self.data.output if self.data and self.data.output else join(self.run_dir, "curated")
        if self.data is not None and self.data.output is None:
            _update(self.data, "output", curated)
        if self.train is not None:
            if self.train.data_dir is None:
                _update(self.train, "data_dir", curated)
            if self.train.output is None:
                _update(self.train, "output", join(self.run_dir, "train"))
        if self.serve is not None and self.serve.model is None:
            trained = self.train.output if self.train else join(self.run_dir, "train")
            _update(self.serve, "model", join(trained, "export"))
        self._make_paths_absolute()
        return self

    def _make_paths_absolute(self) -> None:
        """Ray workers (Ray Train's especially) run in other working directories, so every local path
        is resolved against the directory the command was started in, once, here."""
        fields = [("data", "output"), ("train", "data_dir"), ("train", "output"), ("serve", "model")]
        for section, name in fields:
            node = getattr(self, section)
            if node is not None and getattr(node, name):
                _update(node, name, absolute(getattr(node, name)))
        if self.data is not None:
            for src in self.data.sources:
                if not src.path.startswith("builtin:"):
                    _update(src, "path", absolute(src.path))
            if self.data.tokenizer.path:
                _update(self.data.tokenizer, "path", absolute(self.data.tokenizer.path))
        if self.train is not None:
            if self.train.model.path:
                _update(self.train.model, "path", absolute(self.train.model.path))
            if self.train.checkpoint.storage_path:
                _update(self.train.checkpoint, "storage_path", absolute(self.train.checkpoint.storage_path))
        if self.serve is not None and self.serve.adapters.paths:
            _update(
                self.serve.adapters, "paths", {k: absolute(p) for k, p in self.serve.adapters.paths.items()}
            )


def _update(node: Section, name: str, value: Any) -> None:
    """Assign only a changed value: assignment re-runs validators (validate_assignment), and an
    unconditional one inside a validator would recurse."""
    if getattr(node, name) != value:
        setattr(node, name, value)


def absolute(path: str) -> str:
    """An absolute local path (~ expanded); URIs such as s3://bucket/x are returned unchanged."""
    if "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    """Join path parts for local paths and URIs alike (os.path.join would mangle s3://)."""
    return "/".join([base.rstrip("/"), *parts])


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["train.lr=1e-4", "stages=[curate]"] into a nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}' is not of the form key.path=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{key}': value {raw!r} is not valid YAML ({exc.problem})") from None
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': '{part}' is set both as a value and as a section")
        node[parts[-1]] = value
    return tree


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_recipe(recipe: str) -> Path:
    """A recipe is a YAML path, or the name of a file in ./recipes (`quickstart` -> recipes/quickstart.yaml)."""
    path = Path(recipe)
    if path.is_file():
        return path
    for candidate in (Path("recipes") / recipe, Path("recipes") / f"{recipe}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"recipe '{recipe}' not found (looked for {path} and recipes/{recipe}.yaml)")


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<recipe>"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in err and not isinstance(err["input"], dict):
            msg += f" (got {err['input']!r})"
        lines.append(f"  {loc}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def build_config(raw: dict[str, Any]) -> PlatformConfig:
    try:
        return PlatformConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def load_config(recipe: str | os.PathLike, overrides: list[str] | None = None) -> PlatformConfig:
    """Load a recipe, apply overrides, validate. Raises ConfigError naming the bad key."""
    path = resolve_recipe(str(recipe))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections, got {type(raw).__name__}")
    raw = deep_merge(raw, parse_overrides(overrides or []))
    return build_config(raw)


def dump_config(cfg: Section) -> dict[str, Any]:
    """A JSON-ready dict of a config (for manifests and generated files)."""
    return cfg.model_dump(mode="json")
