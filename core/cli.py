"""`raylm VERB ...`: a table of verbs, each with its own arguments and its own `main(args) -> exit code`.

Every stage of core/stages.py is a verb taking `RECIPE [key=value ...]`; `run` runs the stages a recipe
lists; `check` validates a recipe and prints it resolved, as YAML that is itself a recipe; `recipes` lists
the recipes shipped with raylm and `init` copies one to edit. A verb with other arguments (`raylm cluster check FILE`,
say) is one more row of VERBS. A recipe is loaded and validated before anything imports Ray, so a bad
key or value exits with code 2 and a message naming the key, without starting a cluster.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import yaml

from raylm.cluster import check as cluster_check
from raylm.cluster import monitor, submit
from raylm.core import console, runs
from raylm.core.config import (
    SHIPPED_RECIPES,
    PlatformConfig,
    dump_config,
    load_config,
    recipe_description,
    resolve_recipe,
    shipped_recipes,
    shown,
)
from raylm.core.errors import ConfigError, RaylmError
from raylm.core.stages import BY_NAME, STAGES, Stage

MAX_MESSAGE_LINES = 10  # an error is read at once; validation errors are already capped at five
# What a shell reports for a command killed by SIGPIPE (128 + 13), as `yes | head -1` under pipefail: the
# reader stopped early and the output was not all delivered, which exit 0 would deny.
BROKEN_PIPE_EXIT = 141


def short_message(message: str) -> str:
    """At most MAX_MESSAGE_LINES lines of at most 300 characters: whatever raised the error (a library
    message quoting a whole file, say), the user sees a few lines."""
    lines = [shown(line, 300) for line in message.splitlines()]
    if len(lines) > MAX_MESSAGE_LINES:
        lines = [*lines[: MAX_MESSAGE_LINES - 1], f"... ({len(lines) - MAX_MESSAGE_LINES + 1} more lines)"]
    return "\n".join(lines)


@dataclass(frozen=True)
class Verb:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    main: Callable[[argparse.Namespace], int]
    """Runs the verb; raises RaylmError (or returns an exit code) on failure."""


def recipe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "recipe",
        help="recipe YAML path, or the name of a shipped recipe (e.g. quickstart; see `raylm recipes`)",
    )
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.max_steps=20 data.seq_len=256")


def stage_arguments(stage: Stage) -> Callable[[argparse.ArgumentParser], None]:
    """A stage verb's arguments: the recipe, overrides, and the stage's own switches."""

    def add(p: argparse.ArgumentParser) -> None:
        recipe_arguments(p)
        for flag in stage.flags:
            p.add_argument(
                flag.name,
                action="append_const",
                const=flag.override,
                dest="flag_overrides",
                help=f"{flag.help} (= {flag.override})",
            )

    return add


def preflight(cfg: PlatformConfig, stages: list[str]) -> None:
    """Stage checks that need no Ray (inputs exist, outputs may be written), before a cluster starts."""
    for name in stages:
        check = BY_NAME[name].function("preflight")
        if check is not None:
            check(cfg)


def run_stages(cfg: PlatformConfig, stages: list[str]) -> None:
    from raylm.core.session import ray_session

    for name in stages:
        if getattr(cfg, BY_NAME[name].section) is None:
            raise ConfigError(f"stage '{name}' needs a '{BY_NAME[name].section}' section in the recipe")
    preflight(cfg, stages)
    results: dict[str, object] = {}
    with console.run_logs(cfg) as logs, ray_session(cfg.ray):
        console.where_logs_are(logs)
        for index, name in enumerate(stages, 1):
            if name == "serve" and results:  # serving blocks until Ctrl-C: sum up what came before now
                console.print_summary(cfg, results, logs, serving=True)
            console.banner(name, index, len(stages))
            results[name] = BY_NAME[name].function()(cfg)
        console.print_summary(cfg, results, logs)


def _run_recipe(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, [*args.overrides, *(getattr(args, "flag_overrides", None) or [])])
    run_stages(cfg, cfg.stages if args.verb == "run" else [args.verb])
    return 0


def _check_recipe(args: argparse.Namespace) -> int:
    resolved = dump_config(load_config(args.recipe, args.overrides))
    print(f"# {shown(args.recipe)} resolved by `raylm check`: every default and linked path filled in")
    print(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True), end="")
    return 0


def _list_recipes(_args: argparse.Namespace) -> int:
    shipped = shipped_recipes()
    if not shipped:
        raise RaylmError(f"no recipes are installed with raylm (package {SHIPPED_RECIPES}): reinstall raylm")
    width = max(map(len, shipped), default=0)
    for name, path in sorted(shipped.items()):
        print(f"{name:<{width}}  {recipe_description(path)}")
    return 0


def init_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a shipped recipe's name (see `raylm recipes`) or a recipe YAML path")
    p.add_argument("dest", nargs="?", help="file or existing folder to write; default ./RECIPE.yaml")


def _init_recipe(args: argparse.Namespace) -> int:
    source = resolve_recipe(args.recipe)
    dest = Path(args.dest or ".")
    if dest.is_dir():
        dest = dest / f"{source.stem}.yaml"
    try:
        with dest.open("xb") as f:  # "x": never overwrite a file the user may have edited
            f.write(source.read_bytes())
    except FileExistsError:
        raise ConfigError(
            f"{shown(str(dest))} already exists; not overwriting it (pass another DEST)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot write {shown(str(dest))}: {exc.strerror or exc}") from None
    print(f"wrote {dest} (from {source.stem}); edit it, then: raylm check {dest}")
    return 0


VERBS: tuple[Verb, ...] = (
    Verb("run", "run every stage the recipe lists, in order", recipe_arguments, _run_recipe),
    *(Verb(s.name, s.help, stage_arguments(s), _run_recipe) for s in STAGES),
    Verb(
        "check",
        "validate the recipe and print the resolved config as YAML (itself a recipe); starts nothing",
        recipe_arguments,
        _check_recipe,
    ),
    Verb("recipes", "list the recipes shipped with raylm", lambda p: None, _list_recipes),
    Verb(
        "init",
        "copy a shipped recipe into the current folder (or DEST) to edit",
        init_arguments,
        _init_recipe,
    ),
    Verb(
        "runs",
        "list the runs under a folder (default ./runs): each stage's status, when, and key figures",
        runs.runs_arguments,
        runs.runs_main,
    ),
    Verb(
        "show",
        "print an artifact's lineage: its manifest, then its parents' back to the corpus snapshot",
        runs.show_arguments,
        runs.show_main,
    ),
    Verb(
        "submit",
        "run a stage as a Ray job on a cluster: validates the recipe and checks its paths first",
        submit.add_arguments,
        submit.main,
    ),
    Verb(
        "cluster",
        "cluster definitions: `cluster check FILE...` validates launcher YAMLs and KubeRay manifests",
        cluster_check.add_arguments,
        cluster_check.main,
    ),
    Verb(
        "monitor",
        "run Prometheus (alert rules included) against the running Ray cluster; Ctrl-C stops it",
        monitor.add_arguments,
        monitor.main,
    ),
)


def version() -> str:
    try:
        return metadata.version("raylm")
    except metadata.PackageNotFoundError:  # imported from a checkout that was never installed
        return "unknown (not installed)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raylm", description="From a raw corpus to a served LLM on Ray.")
    p.add_argument("--version", action="version", version=f"raylm {version()}")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        verb.add_arguments(sub.add_parser(verb.name, help=verb.help, description=verb.help))
        sub.choices[verb.name].set_defaults(main=verb.main)
    return p


def run_verb(args: argparse.Namespace) -> int:
    try:
        return args.main(args)
    except RaylmError as exc:
        print(f"raylm: error: {short_message(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # Ctrl-C; SIGTERM and SIGHUP arrive as core.session.Interrupted
        by = f" by {exc}" if hasattr(exc, "signum") else ""
        print(f"raylm: interrupted{by}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)  # 128 + the signal's number, as a shell reports it


def main(argv: list[str] | None = None) -> int:
    console.setup_console()  # raylm's lines on the console; libraries' detail goes to raylm.log (run_stages)
    try:
        code = run_verb(parser().parse_args(argv))
        sys.stdout.flush()  # output still buffered for a pipe is written here, where a closed pipe is caught
        return code
    except BrokenPipeError:  # `raylm check quickstart | head -1`: the reader stopped, which is no error
        # Python writes what is left in stdout's buffer again at exit; pointing stdout at /dev/null makes
        # that write succeed instead of printing a second BrokenPipeError (the recipe in Python's docs).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE_EXIT


if __name__ == "__main__":
    sys.exit(main())
