"""One typed config tree for every stage, loaded from a YAML recipe plus `a.b=c` overrides.

Each stage owns its section (pipelines/config.py, training/config.py, serving/config.py) so the fields
sit next to the code that reads them; this module assembles them under `PlatformConfig`, fills in the
paths that link one stage's output to the next stage's input, and turns every validation failure into a
`ConfigError` that names the offending key. Nothing here imports Ray: a bad recipe fails before Ray starts.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import Field, ValidationError, create_model, model_validator

from raylm.core.errors import ConfigError
from raylm.core.schema import Bool, Int, PathOrUri, Section, Seed, absolute
from raylm.core.stages import BY_NAME, STAGES, link

StageName = Literal[tuple(stage.name for stage in STAGES)]  # type: ignore[valid-type]
MAX_LOCAL_CPUS = 10_000  # a local Ray runs on one machine; more CPUs than this is a typo

# Bounds on what a recipe may expand to. YAML aliases let a few hundred bytes stand for gigabytes
# ("billion laughs"); pydantic, json.dumps and error messages would walk every copy.
MAX_RECIPE_BYTES = 1 << 20  # real recipes are a few KB
MAX_OVERRIDE_CHARS = 64 << 10  # one `key=value` on the command line
MAX_VALUES = 100_000  # scalars, lists and mappings after aliases are expanded
MAX_EXPANDED_CHARS = 4 << 20  # characters of all strings after aliases are expanded
MAX_DEPTH = 50  # nesting of lists and mappings (a recipe needs about 6)
MAX_ERRORS = 5  # validation errors listed in one message; the rest are counted
MAX_SHOWN = 100  # characters of a bad value (or key) quoted in a message


class RayConfig(Section):
    address: str | None = None
    """Ray cluster to join; None uses RAY_ADDRESS when set (ray job submit sets it), else starts a local Ray."""
    num_cpus: Int | None = Field(None, ge=1, le=MAX_LOCAL_CPUS)
    """CPUs for a local Ray started by raylm; None lets Ray count them."""
    include_dashboard: Bool = True
    """Start the Ray dashboard with a local Ray (bound to dashboard_host)."""
    dashboard_host: str = "127.0.0.1"
    """Interface the local dashboard binds to; localhost by default so it is not exposed."""
    log_to_driver: Bool = True
    """Forward worker logs to the driver's terminal."""


class TrackingConfig(Section):
    """Experiment tracking in MLflow (core/tracking.py): a run per train / tune stage, a child per trial."""

    enabled: Bool = True
    """Record train and tune runs in MLflow; a store that cannot be reached warns once and is skipped."""
    uri: str | None = None
    """MLflow tracking URI; None: MLFLOW_TRACKING_URI when set, else sqlite:///<run_dir>/mlflow/mlflow.db."""
    experiment: str | None = Field(None, min_length=1)
    """MLflow experiment the runs go to; None: the recipe's name."""

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, raw: Any) -> Any:
        # Recipes are committed and copied into manifests: credentials belong in the environment. Checked
        # on the whole section so the error quotes the key, never the secret.
        uri = raw.get("uri") if isinstance(raw, dict) else None
        if isinstance(uri, str) and "@" in urlsplit(uri).netloc:
            raise ValueError(
                "uri holds credentials (user:password@host), which a recipe must not: set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the "
                "environment instead"
            )
        return raw


class _Platform(Section):
    """The sections every recipe may have; PlatformConfig adds one section per row of the stage table."""

    name: str
    """Name of the run; the default run_dir is runs/<name>."""
    run_dir: PathOrUri | None = None
    """Folder (or s3:// / gs:// URI) under which each stage writes its artifacts."""
    stages: list[StageName] = ["curate"]
    """Stages that `raylm run` executes, in this order."""
    seed: Seed = 0
    """Seed shared by every stage unless a stage sets its own."""
    ray: RayConfig = RayConfig()
    """How to reach (or start) Ray."""
    tracking: TrackingConfig = TrackingConfig()
    """Where train and tune runs are recorded (MLflow)."""

    @model_validator(mode="after")
    def _link_stages(self) -> _Platform:
        _update(self, "run_dir", absolute(self.run_dir or f"runs/{self.name}"))
        for name in self.stages:
            section = BY_NAME[name].section
            if getattr(self, section) is None:
                raise ValueError(
                    f"stage '{name}' is listed in stages but the recipe has no '{section}' section"
                )
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages lists a stage twice: {self.stages}")
        link(self, _update)
        return self


# One optional section per stage, from the table: `data` (curate), `train`, `serve`, ...
PlatformConfig = create_model(
    "PlatformConfig",
    __base__=_Platform,
    __doc__="A whole recipe: the run, Ray, and one section per stage.",
    **{s.section: (s.config | None, Field(None, description=s.help)) for s in STAGES},
)


def _update(node: Section, name: str, value: Any) -> None:
    """Assign only a changed value: assignment re-runs validators (validate_assignment), and an
    unconditional one inside a validator would recurse."""
    if getattr(node, name) != value:
        setattr(node, name, value)


def shown(value: Any, limit: int = MAX_SHOWN) -> str:
    """A value's repr, cut to `limit` characters, for error messages that must stay a few lines long."""
    text = value if isinstance(value, str) else repr(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The gist of a YAML error with its line; str(exc) quotes the offending line, which may be huge."""
    problem = getattr(exc, "problem", None) or str(exc).split("\n")[0]
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return shown(problem, 200) + where


def _check_expanded_size(value: Any, what: str) -> None:
    """Refuse a YAML document whose aliases expand it beyond what any recipe needs. The walk counts
    each alias every time it is used and stops at the bound, so a self-referencing alias ends too."""
    stack, values, chars = [(value, 1)], 0, 0
    while stack:
        node, depth = stack.pop()
        values += 1
        if isinstance(node, str):
            chars += len(node)
        if values > MAX_VALUES or chars > MAX_EXPANDED_CHARS:
            raise ConfigError(
                f"{what} expands to more than {MAX_VALUES} values or {MAX_EXPANDED_CHARS} characters "
                "(YAML aliases repeating themselves?); refusing it"
            )
        if depth > MAX_DEPTH:
            raise ConfigError(
                f"{what} is nested more than {MAX_DEPTH} levels deep (or a YAML alias contains itself); "
                "refusing it"
            )
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for item in node.items() for child in item)
        elif isinstance(node, (list, tuple)):
            stack.extend((child, depth + 1) for child in node)


def parse_yaml(text: str, what: str) -> Any:
    """yaml.safe_load with bounds: a ConfigError naming `what` instead of a YAML traceback, a
    RecursionError (deep nesting) or an alias bomb."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} is not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{what} is nested too deeply to parse; refusing it") from None
    except (ValueError, OverflowError) as exc:  # PyYAML builds ints and dates itself: 5000 digits, 2026-13-45
        raise ConfigError(f"{what} holds a value that cannot be read: {shown(str(exc), 200)}") from None
    _check_expanded_size(value, what)
    return value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["train.lr=1e-4", "stages=[curate]"] into a nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{shown(item)}' is not of the form key.path=value")
        if len(item) > MAX_OVERRIDE_CHARS:
            raise ConfigError(
                f"override '{shown(key)}' is {len(item)} characters long; the limit is {MAX_OVERRIDE_CHARS}"
            )
        value = parse_yaml(raw, f"override '{shown(key)}'") if raw != "" else ""
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


SHIPPED_RECIPES = "raylm.recipes"  # the repository's recipes/ folder, installed as package data
RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a shipped recipe is named, never a path


def shipped_recipes() -> dict[str, Path]:
    """The recipes installed with raylm, by name (`quickstart` -> .../raylm/recipes/quickstart.yaml);
    none when the package is missing (an editable install made before recipes/ became a package)."""
    try:
        folder = resources.files(SHIPPED_RECIPES)
    except ModuleNotFoundError:
        return {}
    # A wheel installs the recipes as a plain folder; a Path is what the rest of the code reads.
    files = (Path(str(f)) for f in folder.iterdir())
    return {f.stem: f for f in files if f.suffix == ".yaml" and f.is_file()}


def recipe_description(path: Path) -> str:
    """A recipe's one-line description: the first line of its leading comment (every shipped recipe
    starts with one)."""
    with path.open(encoding="utf-8") as f:
        first = f.readline(MAX_SHOWN * 3).strip()
    return shown(first.removeprefix("#").strip(), MAX_SHOWN * 2) if first.startswith("#") else ""


def resolve_recipe(recipe: str) -> Path:
    """A recipe is a YAML path, a file in ./recipes, or the name of a recipe shipped with raylm
    (`quickstart`): a path first, so a user's own files win over the shipped ones."""
    path = Path(recipe)
    candidates = [path, Path("recipes") / recipe, Path("recipes") / f"{recipe}.yaml"]
    try:
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        if path.is_dir():
            raise ConfigError(f"recipe '{shown(recipe)}' is a directory, not a YAML file")
    except OSError as exc:  # a name too long for the file system, say: is_file() raises instead of False
        raise ConfigError(f"recipe '{shown(recipe)}' cannot be opened: {exc.strerror or exc}") from None
    shipped = shipped_recipes()
    name = recipe.removesuffix(".yaml")
    if RECIPE_NAME.fullmatch(name) and name in shipped:
        return shipped[name]
    raise ConfigError(
        f"recipe '{shown(recipe)}' not found (looked for {shown(recipe)}, recipes/{shown(name)}.yaml and "
        f"the recipes shipped with raylm: {', '.join(sorted(shipped)) or 'none installed'})"
    )


def read_recipe(path: Path) -> dict[str, Any]:
    """The recipe's top-level mapping: at most MAX_RECIPE_BYTES of UTF-8 YAML."""
    name = shown(str(path))
    try:
        with path.open("rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)  # one byte past the limit: a huge file is never read whole
    except OSError as exc:
        raise ConfigError(f"recipe {name} cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise ConfigError(f"recipe {name} is larger than {MAX_RECIPE_BYTES} bytes; refusing it")
    try:
        text = data.decode("utf-8-sig")  # a UTF-8 byte order mark is harmless; PyYAML skips it anyway
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"recipe {name} is not UTF-8 text: byte 0x{data[exc.start]:02x} on line {line} (save it as UTF-8)"
        ) from None
    raw = parse_yaml(text, f"recipe {name}")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {name} must be a mapping of sections, got {type(raw).__name__}")
    return raw


def format_validation_error(exc: ValidationError) -> str:
    """One line per error, naming the dotted key; at most MAX_ERRORS lines and short quoted values."""
    lines = []
    errors = exc.errors()
    for err in errors[:MAX_ERRORS]:
        loc = shown(".".join(str(p) for p in err["loc"]) or "<recipe>")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in err and not isinstance(err["input"], dict):
            msg += f" (got {shown(repr(err['input']))})"
        lines.append(f"  {loc}: {shown(msg, 300)}")
    if len(errors) > MAX_ERRORS:
        lines.append(f"  ... and {len(errors) - MAX_ERRORS} more")
    return "invalid config:\n" + "\n".join(lines)


def build_config(raw: dict[str, Any]) -> PlatformConfig:
    try:
        return PlatformConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def load_config(recipe: str | os.PathLike, overrides: list[str] | None = None) -> PlatformConfig:
    """Load a recipe, apply overrides, validate. Raises ConfigError naming the bad key."""
    path = resolve_recipe(str(recipe))
    raw = deep_merge(read_recipe(path), parse_overrides(overrides or []))
    # Each part was bounded on its own; the merge can still nest deeper (a key like a.b.c.d...).
    _check_expanded_size(raw, "the recipe with its overrides")
    return build_config(raw)


def dump_config(cfg: Section) -> dict[str, Any]:
    """A JSON-ready dict of a config (for manifests and generated files)."""
    return cfg.model_dump(mode="json")
