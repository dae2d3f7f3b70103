"""`raylm VERB RECIPE [key=value ...]`: a dict of verbs, each mapped to one `run(cfg)` function.

The recipe is loaded and validated before anything imports Ray, so a bad key or value exits with code 2
and a message naming the key, without starting a cluster.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from core.config import STAGE_SECTIONS, PlatformConfig, dump_config, load_config, shown
from core.errors import ConfigError, RaylmError

# verb -> "module:function"; imported lazily so `raylm check` never pays for torch or Ray.
STAGE_VERBS = {
    "curate": "pipelines.run:run",
    "train": "training.run:run",
    "serve": "serving.run:run",
}
MAX_MESSAGE_LINES = 10  # an error is read at once; validation errors are already capped at five

HELP = {
    "run": "run every stage the recipe lists, in order",
    "curate": "curate the corpus (pipelines/)",
    "train": "train a model on the curated shards (training/)",
    "serve": "serve the trained model behind an OpenAI-compatible API (serving/)",
    "check": "validate the recipe and print the resolved config; starts nothing",
}


def short_message(message: str) -> str:
    """At most MAX_MESSAGE_LINES lines of at most 300 characters: whatever raised the error (a library
    message quoting a whole file, say), the user sees a few lines."""
    lines = [shown(line, 300) for line in message.splitlines()]
    if len(lines) > MAX_MESSAGE_LINES:
        lines = [*lines[: MAX_MESSAGE_LINES - 1], f"... ({len(lines) - MAX_MESSAGE_LINES + 1} more lines)"]
    return "\n".join(lines)


def stage_function(verb: str):
    module, func = STAGE_VERBS[verb].split(":")
    return getattr(importlib.import_module(module), func)


def preflight(cfg: PlatformConfig, stages: list[str]) -> None:
    """Stage checks that need no Ray (inputs exist, say), so they fail before a cluster starts."""
    for stage in stages:
        module = importlib.import_module(STAGE_VERBS[stage].split(":")[0])
        if hasattr(module, "preflight"):
            module.preflight(cfg)


def run_stages(cfg: PlatformConfig, stages: list[str]) -> None:
    from core.session import ray_session

    preflight(cfg, stages)
    with ray_session(cfg.ray):
        for stage in stages:
            logging.getLogger("raylm").info("== stage %s ==", stage)
            stage_function(stage)(cfg)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raylm", description="From a raw corpus to a served LLM on Ray.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, text in HELP.items():
        s = sub.add_parser(verb, help=text, description=text)
        s.add_argument("recipe", help="recipe YAML path, or a name in recipes/ (e.g. quickstart)")
        s.add_argument(
            "overrides", nargs="*", help="config overrides, e.g. train.max_steps=20 data.seq_len=256"
        )
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s raylm %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    args = parser().parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
        if args.verb == "check":
            print(json.dumps(dump_config(cfg), indent=2))
            return 0
        stages = cfg.stages if args.verb == "run" else [args.verb]
        for stage in stages:
            if getattr(cfg, STAGE_SECTIONS[stage]) is None:
                raise ConfigError(
                    f"`raylm {args.verb}` needs a '{STAGE_SECTIONS[stage]}' section in the recipe"
                )
        run_stages(cfg, stages)
        return 0
    except RaylmError as exc:
        print(f"raylm: error: {short_message(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("raylm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
