"""What a raylm command prints, and where everything else goes.

The console keeps raylm's own lines: a banner per stage, progress, the training step lines, the stages'
end-of-stage summaries and, after the stages, one summary of the whole pipeline. Every library's INFO
lines (Ray, Ray Data, Ray Train, MLflow, ...) go to <run_dir>/logs/raylm.log instead, and only their
errors reach the console. What Ray's worker processes write stays in Ray's session log folder
(worker-*.out/.err, ray-data/, ray-train-*.log); the console names both places when Ray starts.

Each source is quietened with its own knob: Ray's and Ray Data's driver loggers propagate to the root
logger (whose handlers are set here) instead of printing; Ray Data in worker processes logs to its
session file only (RAY_DATA_LOGGING_CONFIG); Ray Train logs at WARNING (RunConfig's LoggingConfig, in
training/run.py); MLflow's loggers, like Ray's, propagate to the root logger. Ray Data's
progress stays on the driver: its own bars on a terminal, and otherwise one line at most every
PROGRESS_EVERY_S seconds, made from the progress records Ray Data logs when stdout is not a terminal.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("raylm")

CONSOLE_HANDLER = "raylm-console"
CONSOLE_FORMAT = "%(asctime)s raylm %(levelname)s %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOGS = "logs"  # the folder under run_dir
LOG_FILE = "raylm.log"
PROGRESS_EVERY_S = 20.0  # at most one progress line this often when the console is not a terminal
# The logger Ray Data's non-terminal progress (LoggingExecutionProgressManager) writes to.
RAY_DATA_PROGRESS = "ray.data._internal.progress.logging_progress"
TOTAL_PROGRESS = re.compile(r"Total Progress: (\d+)/(\S+)")
# Ray Data in worker processes (a Ray task that iterates a dataset): its session log file only.
WORKER_RAY_DATA_LOGGING = """\
version: 1
disable_existing_loggers: false
formatters:
  ray: {format: "%(asctime)s\\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s"}
handlers:
  file: {class: ray.data._internal.logging.SessionFileHandler, formatter: ray, filename: ray-data.log}
loggers:
  ray.data: {level: DEBUG, handlers: [file], propagate: false}
"""

_stage = {"name": ""}  # the stage running now, named in progress lines


def _is_raylm(record: logging.LogRecord) -> bool:
    return record.name == "raylm" or record.name.startswith("raylm.")


class ConsoleFilter(logging.Filter):
    """raylm's records; other libraries' errors; Ray Data's total progress at most every `every_s`."""

    def __init__(self, every_s: float = PROGRESS_EVERY_S, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.every_s, self.clock, self.last = every_s, clock, -math.inf

    def filter(self, record: logging.LogRecord) -> bool:
        if _is_raylm(record) or record.levelno >= logging.ERROR:
            return True
        if record.name != RAY_DATA_PROGRESS:
            return False
        done = TOTAL_PROGRESS.match(record.getMessage())
        if not done or done.group(1) == "0" or self.clock() - self.last < self.every_s:
            return False
        self.last = self.clock()
        return True


class ConsoleFormatter(logging.Formatter):
    """raylm's line format; a Ray Data progress record becomes one short line naming the stage."""

    def __init__(self) -> None:
        super().__init__(CONSOLE_FORMAT, datefmt="%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        done = TOTAL_PROGRESS.match(record.getMessage()) if record.name == RAY_DATA_PROGRESS else None
        if done is None:
            return super().formatMessage(record)
        total = "" if done.group(2) == "?" else f" of {int(done.group(2)):,}"
        stage = _stage["name"] or "Ray Data"
        return f"{record.asctime} raylm INFO {stage}: {int(done.group(1)):,}{total} rows through the current dataset"


def setup_console() -> None:
    """The console handler on the root logger, unless the application (pytest, a notebook) has its own:
    raylm's INFO lines and other libraries' errors go to stderr."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.set_name(CONSOLE_HANDLER)
    handler.setFormatter(ConsoleFormatter())
    handler.addFilter(ConsoleFilter())
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def logs_dir(run_dir: str, claim: Callable[[], bool]) -> str:
    """<run_dir>/logs when run_dir is a local folder raylm may write (`claim` marks it as a run), else a
    new folder under the system's temporary folder."""
    from raylm.core import storage

    if not storage.is_remote(run_dir) and claim():
        path = os.path.join(run_dir, LOGS)
        os.makedirs(path, exist_ok=True)
        return path
    return tempfile.mkdtemp(prefix="raylm-logs-")


@contextlib.contextmanager
def detail_to_file(folder: str) -> Iterator[str]:
    """Every library's INFO lines into <folder>/raylm.log for the duration; Ray's and Ray Data's driver
    loggers propagate to the root logger instead of printing, and worker processes started meanwhile
    (a local Ray) keep Ray Data's lines in Ray's session log. Everything is restored afterwards."""
    path = os.path.join(folder, LOG_FILE)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    saved_level = root.level
    root.addHandler(handler)
    root.setLevel(min(saved_level or logging.INFO, logging.INFO))
    config = os.path.join(folder, "ray-data-workers-logging.yaml")
    with open(config, "w", encoding="utf-8") as f:
        f.write(WORKER_RAY_DATA_LOGGING)
    try:
        with _env("RAY_DATA_LOGGING_CONFIG", config), _propagating(["ray", "ray.data", "mlflow", "alembic"]):
            yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
        handler.close()


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """os.environ[name] = value while Ray starts its processes (they inherit it), restored afterwards."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


@contextlib.contextmanager
def _propagating(names: list[str]) -> Iterator[None]:
    """These loggers (Ray's, MLflow's) without their stderr handlers, propagating to the root logger's handlers
    (their file handlers, Ray Data's ray-data.log, stay)."""
    from ray._private.log import PlainRayHandler

    stderr_handlers = (PlainRayHandler, logging.StreamHandler)
    import ray.data  # noqa: F401  (importing sets up the "ray" and "ray.data" loggers)

    with contextlib.suppress(ImportError):  # MLflow gives its loggers a stderr handler on import
        import mlflow  # noqa: F401

    saved = {}
    for name in names:
        logger = logging.getLogger(name)
        streams = [h for h in logger.handlers if type(h) in stderr_handlers]
        saved[name] = (logger.propagate, streams)
        for h in streams:
            logger.removeHandler(h)
        logger.propagate = True
    try:
        yield
    finally:
        for name, (propagate, streams) in saved.items():
            logger = logging.getLogger(name)
            logger.propagate = propagate
            for h in streams:
                logger.addHandler(h)


def where_logs_are(raylm_log: str) -> None:
    """One console line naming raylm's log file and Ray's session log folder (after Ray started)."""
    log.info("logs: %s (every library); Ray's: %s", raylm_log, ray_logs_dir() or "(Ray not started here)")


def ray_logs_dir() -> str | None:
    """The logs folder of this node's Ray session: worker output, ray-data/, ray-train-*.log."""
    try:
        from ray._private import worker

        node = worker._global_node
        return node.get_logs_dir_path() if node is not None else None
    except (ImportError, AttributeError):  # a Ray without the private accessor: the line says so
        return None


def banner(stage: str, index: int, total: int) -> None:
    _stage["name"] = stage
    log.info("== stage %s (%d/%d) ==", stage, index, total)


def quiet_worker_dataset(ds: Any) -> Any:
    """A dataset iterated inside a Ray task: no progress bars (they would be forwarded to the driver's
    console line by line); the driver shows the stage's progress."""
    ds.context.enable_progress_bars = False
    return ds


def terminal_progress(context: Any) -> None:
    """On a terminal, Ray Data's bar for the whole dataset only, not one more per operator."""
    if sys.stdout.isatty():
        context.enable_operator_progress_bars = False


def _number(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def _stage_line(name: str, manifest: dict[str, Any]) -> str | None:
    """One line of a stage's results from its manifest; None for a stage without a summary here."""
    if name == "curate":
        c = manifest.get("counts", {})
        sequences = sum((c.get("sequences") or {}).values())
        return (
            f"curate: {_number(c.get('documents_read'), ',')} documents in, "
            f"{_number(c.get('after_near_dedup'), ',')} kept; {_number(c.get('packed_tokens'), ',')} tokens "
            f"in {sequences:,} sequences"
        )
    if name == "train":
        f = manifest.get("final") or {}
        return (
            f"train: {_number(f.get('step'), 'd')} steps, final loss {_number(f.get('loss'), '.4f')}, "
            f"eval loss {_number(f.get('eval_loss'), '.4f')}, eval perplexity {_number(f.get('eval_perplexity'), '.2f')}"
        )
    if name == "tune":
        s = manifest.get("summary") or {}
        return (
            f"tune: best trial {s.get('best_trial')} (eval loss {_number(s.get('best_eval_loss'), '.4f')}), "
            f"{s.get('completed')} of {s.get('trials')} trials completed; best adapter {manifest.get('best')}"
        )
    return None


def pipeline_summary(
    outputs: dict[str, str], manifests: dict[str, dict], served_url: str | None, logs: str
) -> str:
    """The block printed after the stages: one line per stage (its results and where they are), the
    served URL, and where the logs are."""
    lines = ["", "pipeline summary"]
    for name, output in outputs.items():
        line = _stage_line(name, manifests.get(name) or {})
        lines.append(f"  {line or name}")
        if output:
            lines.append(f"    -> {output}")
    if served_url:
        lines.append(f"  serve: {served_url} (OpenAI API; starting now, Ctrl-C stops)")
    lines.append(f"  logs: {logs}; Ray's: {ray_logs_dir() or 'n/a'}")
    return "\n".join(lines)


@contextlib.contextmanager
def run_logs(cfg: Any) -> Iterator[str]:
    """raylm.log for a command's stages: under <run_dir>/logs when run_dir may be written (it is then
    claimed as a run folder, as the stages would), and every library's detail routed into it."""
    from raylm.core import outputs
    from raylm.core.artifacts import RUN
    from raylm.core.errors import ConfigError

    def claim() -> bool:
        try:
            outputs.check_folder_of_outputs("run_dir", cfg.run_dir)
        except ConfigError:  # a folder holding files raylm did not write: logs go elsewhere
            return False
        outputs.claim(cfg.run_dir, RUN)
        return True

    with detail_to_file(logs_dir(cfg.run_dir, claim)) as path:
        yield path


def print_summary(cfg: Any, results: dict[str, Any], logs: str, serving: bool = False) -> None:
    """The pipeline summary after the stages in `results` (each stage's returned manifest, else the one
    in its output folder); with `serving`, the URL the serve stage is about to answer on."""
    from raylm.core import storage
    from raylm.core.lineage import read_manifest
    from raylm.core.stages import BY_NAME, output_of

    outs, manifests = {}, {}
    for name, result in results.items():
        outs[name] = output_of(BY_NAME[name], cfg)
        if isinstance(result, dict):
            manifests[name] = result
        elif outs[name] and storage.is_complete(outs[name]):
            manifests[name] = read_manifest(outs[name])
    url = None
    if serving:
        from raylm.serving.run import base_url

        url = base_url(cfg.serve)
    print(pipeline_summary(outs, manifests, url, logs), flush=True)
