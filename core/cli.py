"""`raylm VERB ...`: a table of verbs, each with its own arguments and its own `main(args) -> exit code`.

Every stage of core/stages.py is a verb taking `RECIPE [key=value ...]`; `run` runs the stages a recipe
lists; `check` validates a recipe and prints it. A verb with other arguments (`raylm cluster check FILE`,
say) is one more row of VERBS. A recipe is loaded and validated before anything imports Ray, so a bad
key or value exits with code 2 and a message naming the key, without starting a cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

from raylm.cluster import check as cluster_check
from raylm.cluster import monitor, submit
from raylm.core.config import PlatformConfig, dump_config, load_config, shown
from raylm.core.errors import ConfigError, RaylmError
from raylm.core.stages import BY_NAME, STAGES, Stage

MAX_MESSAGE_LINES = 10  # an error is read at once; validation errors are already capped at five


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
    p.add_argument("recipe", help="recipe YAML path, or a name in recipes/ (e.g. quickstart)")
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
    with ray_session(cfg.ray):
        for name in stages:
            logging.getLogger("raylm").info("== stage %s ==", name)
            BY_NAME[name].function()(cfg)


def _run_recipe(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, [*args.overrides, *(getattr(args, "flag_overrides", None) or [])])
    run_stages(cfg, cfg.stages if args.verb == "run" else [args.verb])
    return 0


def _check_recipe(args: argparse.Namespace) -> int:
    print(json.dumps(dump_config(load_config(args.recipe, args.overrides)), indent=2))
    return 0


VERBS: tuple[Verb, ...] = (
    Verb("run", "run every stage the recipe lists, in order", recipe_arguments, _run_recipe),
    *(Verb(s.name, s.help, stage_arguments(s), _run_recipe) for s in STAGES),
    Verb(
        "check",
        "validate the recipe and print the resolved config; starts nothing",
        recipe_arguments,
        _check_recipe,
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raylm", description="From a raw corpus to a served LLM on Ray.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        verb.add_arguments(sub.add_parser(verb.name, help=verb.help, description=verb.help))
        sub.choices[verb.name].set_defaults(main=verb.main)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s raylm %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    args = parser().parse_args(argv)
    try:
        return args.main(args)
    except RaylmError as exc:
        print(f"raylm: error: {short_message(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("raylm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
