"""`raylm submit VERB RECIPE [overrides]`: run a stage as a Ray job on a cluster.

Top to bottom: validate the recipe here (a bad recipe exits 2 and never becomes a FAILED job), check
that every path the stage reads or writes is reachable from the cluster's nodes, submit
`raylm VERB RECIPE overrides...` with the current directory as the job's working_dir, and with
--follow / --retries wait for the result, resubmitting a job that failed because the cluster lost a
node. The stages resume by themselves (curate skips complete outputs, train resumes from its latest
checkpoint under the same storage_path and run_name), so a retry is the same command submitted again.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import get_args

from raylm.cluster import jobs
from raylm.core import storage
from raylm.core.config import (
    PlatformConfig,
    deep_merge,
    load_config,
    parse_overrides,
    read_recipe,
    resolve_recipe,
)
from raylm.core.errors import ConfigError
from raylm.core.schema import Section, absolute
from raylm.core.stages import BY_NAME, STAGES
from raylm.training.config import TrainConfig

VERBS = ("run", *(s.name for s in STAGES))
# Never uploaded with the job: the local virtualenv, outputs, benchmark results, git history.
EXCLUDES = ["/.venv", "/runs", "/.bench", "/.git"]
SHARED_ENV = "RAYLM_SHARED_PREFIXES"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=VERBS, metavar="VERB", help=f"what the job runs: {', '.join(VERBS)}")
    p.add_argument(
        "recipe",
        help="recipe YAML path, or a name in ./recipes/, inside the current directory, which is uploaded with the job "
        "(`raylm init NAME` copies a shipped recipe here)",
    )
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.max_steps=20")
    p.add_argument("--address", help=f"Ray dashboard URL (default: RAY_ADDRESS, else {jobs.DEFAULT_ADDRESS})")
    p.add_argument("--follow", action="store_true", help="stream the job's logs; exit with its result")
    p.add_argument(
        "--retries",
        type=int,
        default=0,
        help="resubmit a job that failed because the cluster lost a node, up to this many times",
    )
    p.add_argument(
        "--shared-prefix",
        action="append",
        default=[],
        metavar="DIR",
        help=f"a folder every node mounts (repeatable; also {SHARED_ENV}, separated by ':')",
    )


def main(args: argparse.Namespace) -> int:
    if args.retries < 0:
        raise ConfigError("--retries must be 0 or more")
    address = jobs.resolve_address(args.address)
    cfg, stages, recipe = validate(args.recipe, args.overrides, args.stage)
    paths = recipe_paths(cfg, stages)
    if jobs.is_loopback(address):  # the cluster shares this machine's file system: check inputs here too
        from raylm.core.cli import preflight

        preflight(cfg, stages)
    client = jobs.connect(address)
    shared = [*args.shared_prefix, *filter(None, os.environ.get(SHARED_ENV, "").split(os.pathsep))]
    check_reachable(paths, jobs.alive_nodes(address), shared)
    overrides = [*args.overrides, *pinned_overrides(args.recipe, args.overrides, cfg, paths)]
    job = jobs.Job(
        entrypoint=shlex.join(["raylm", args.stage, recipe, *overrides]),
        runtime_env=runtime_env(cfg, stages),
        metadata={"raylm_verb": args.stage, "raylm_recipe": recipe, "raylm_name": cfg.name},
    )
    base = jobs.submission_id(args.stage, cfg.name)
    return jobs.attempts(client, address, job, base, args.retries, args.follow)


def validate(recipe: str, overrides: list[str], verb: str) -> tuple[PlatformConfig, list[str], str]:
    """The validated config, the stages the job runs, and the recipe's path inside the working dir."""
    cfg = load_config(recipe, overrides)
    stages = cfg.stages if verb == "run" else [verb]
    for name in stages:
        if getattr(cfg, BY_NAME[name].section) is None:
            raise ConfigError(f"stage '{name}' needs a '{BY_NAME[name].section}' section in the recipe")
    path = resolve_recipe(recipe).resolve()
    try:
        inside = path.relative_to(Path.cwd().resolve())
    except ValueError:
        inside = None
    if inside is None or f"/{inside.parts[0]}" in EXCLUDES:
        raise ConfigError(
            f"recipe {path} is not uploaded with the job: the job's working directory is a copy of the "
            f"current directory without {', '.join(e[1:] for e in EXCLUDES)}; copy the recipe into it"
        )
    return cfg, stages, str(PurePosixPath(inside))


@dataclass(frozen=True)
class RecipePath:
    """One path the job reads or writes: its dotted key in the recipe and its resolved value."""

    parts: tuple[str | int, ...]
    value: str

    @property
    def key(self) -> str:
        return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in self.parts).lstrip(".")

    @property
    def is_local(self) -> bool:
        """A path on one machine's disk; URIs (s3://, gs://, ...) and builtin: sources are everywhere."""
        return not storage.is_remote(self.value) and not self.value.startswith("builtin:")


def _is_path_type(annotation, metadata=()) -> bool:
    """Whether a field's type is (or holds) PathOrUri: its validators include schema.absolute."""
    if any(
        getattr(m, "func", None) is absolute for m in (*metadata, *getattr(annotation, "__metadata__", ()))
    ):
        return True
    return any(_is_path_type(arg) for arg in get_args(annotation))


def _walk(value, parts: tuple, is_path: bool) -> Iterator[RecipePath]:
    if isinstance(value, Section):
        for name, info in type(value).model_fields.items():
            yield from _walk(
                getattr(value, name), (*parts, name), _is_path_type(info.annotation, info.metadata)
            )
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk(item, (*parts, i), is_path)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, (*parts, key), is_path)
    elif is_path and isinstance(value, str):
        yield RecipePath(parts, value)


def recipe_paths(cfg: PlatformConfig, stages: list[str]) -> list[RecipePath]:
    """run_dir and every path field (PathOrUri) in the sections of the stages the job runs: the stage
    table names the sections, the field types name the paths, so a new stage or field is covered."""
    paths = [RecipePath(("run_dir",), cfg.run_dir)]
    for name in stages:
        section = BY_NAME[name].section
        paths += _walk(getattr(cfg, section), (section,), False)
    return paths


def is_multi_node(nodes: list[dict]) -> bool:
    """Several alive nodes, or a head that offers no CPUs (the usual cluster YAML): its work then runs on
    worker nodes that the autoscaler adds, even if none is up yet."""
    if len(nodes) > 1:
        return True
    return any(n["is_head_node"] and not (n.get("resources_total") or {}).get("CPU") for n in nodes)


def under(path: str, prefix: str) -> bool:
    return PurePosixPath(os.path.normpath(path)).is_relative_to(os.path.normpath(absolute(prefix)))


def unreachable(paths: list[RecipePath], nodes: list[dict], shared: list[str]) -> list[RecipePath]:
    """The local paths that some node of a multi-node cluster cannot see (not under a shared prefix)."""
    if not is_multi_node(nodes):
        return []
    return [p for p in paths if p.is_local and not any(under(p.value, s) for s in shared)]


def check_reachable(paths: list[RecipePath], nodes: list[dict], shared: list[str]) -> None:
    """Exit 2 when the cluster has several nodes and a path the job uses exists on one machine only."""
    bad = unreachable(paths, nodes, shared)
    if bad:
        keys = ", ".join(f"{p.key}={p.value}" for p in bad[:5])
        raise ConfigError(
            f"{keys}: local path(s), but the cluster has {len(nodes)} alive node(s) and a job's tasks run "
            "on any of them. Put them on shared storage: an s3:// or gs:// URI, or a folder every node "
            f"mounts, declared with --shared-prefix DIR (or {SHARED_ENV})"
        )


def pinned_overrides(
    recipe: str, overrides: list[str], cfg: PlatformConfig, paths: list[RecipePath]
) -> list[str]:
    """Overrides that fix local paths to the absolute form they have here.

    The job runs in a temporary copy of the current directory, so a relative path would land there
    (and vanish with it). run_dir is always pinned (its default, runs/<name>, is relative); any other
    path is pinned when the recipe or an override spelled it relatively (or with ~). A path inside a
    list (data.sources[0].path) pins the whole list.
    """
    raw = deep_merge(read_recipe(resolve_recipe(recipe)), parse_overrides(overrides))
    pins: dict[str, str] = {}
    for p in paths:
        spelled = _lookup(raw, p.parts)
        if p.is_local and (spelled != p.value if p.key == "run_dir" else spelled not in (None, p.value)):
            index = next((i for i, part in enumerate(p.parts) if isinstance(part, int)), None)
            if index is None:
                pins[p.key] = p.value
            else:
                key = ".".join(str(part) for part in p.parts[:index])
                pins[key] = json.dumps(_lookup(cfg.model_dump(mode="json"), p.parts[:index]))
    return [f"{key}={value}" for key, value in pins.items()]


def _lookup(tree, parts: tuple):
    for part in parts:
        try:
            tree = tree[part]
        except (KeyError, IndexError, TypeError):
            return None
    return tree


def runtime_env(cfg: PlatformConfig, stages: list[str]) -> dict:
    """The job's runtime env: this directory as working_dir, and the env vars the stages need.
    The Ray token is not in it: the cluster's processes have their own."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    trainings = [t for name in stages for t in _trainings(getattr(cfg, BY_NAME[name].section))]
    if any(not t.use_gpu for t in trainings):
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would probe for CUDA and fail on CPU-only nodes
    return {"working_dir": ".", "excludes": list(EXCLUDES), "env_vars": env}


def _trainings(section: Section | None) -> Iterator[TrainConfig]:
    """The training runs a stage's section describes: `train:` itself, a sweep's `tune.trial`, ..."""
    if isinstance(section, TrainConfig):
        yield section
    elif isinstance(section, Section):
        for name in type(section).model_fields:
            value = getattr(section, name)
            if isinstance(value, Section):
                yield from _trainings(value)
