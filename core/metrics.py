"""Every metric raylm emits, declared once: name, kind, unit, tag keys, description.

Names follow one convention, `raylm_<stage>_<quantity>[_<unit>]` (Prometheus style: seconds, bytes,
`_total` for counters), and the tests fail on a metric that breaks it or on code that emits a metric not
declared here. Stages call `record(METRIC, value, tags)`; the tags must be exactly the declared keys.

The values go to Ray's metrics API (scraped by Prometheus, shown in the Ray dashboard). Outside a Ray
worker or driver (plain torchrun, unit tests) `record` does nothing, so the same code runs everywhere.
`log_rank0` prints a line only on rank 0 of a training run.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

log = logging.getLogger("raylm")

NAME = re.compile(r"^raylm_(curate|train|tune|serve)_[a-z0-9]+(_[a-z0-9]+)*$")
UNIT_SUFFIX = {"seconds": "_seconds", "bytes": "_bytes"}  # the unit must end the name
LATENCY_BOUNDARIES = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Half-integer edges: Ray 2.60 exports a histogram's _sum from bucket midpoints, which these make exact
# for batches of 1 and 2 (and close above); integer edges put a batch of 1 at 0.5.
BATCH_SIZE_BOUNDARIES = (0.5, 1.5, 2.5, 4.5, 8.5, 16.5, 32.5, 64.5, 128.5)


@dataclass(frozen=True)
class Metric:
    name: str
    kind: Literal["counter", "gauge", "histogram"]
    unit: str
    tag_keys: tuple[str, ...]
    description: str
    boundaries: tuple[float, ...] = ()


REGISTRY: dict[str, Metric] = {}


def declare(
    name: str,
    kind: Literal["counter", "gauge", "histogram"],
    unit: str,
    tag_keys: tuple[str, ...],
    description: str,
    boundaries: tuple[float, ...] = (),
) -> Metric:
    if name in REGISTRY:
        raise ValueError(f"metric {name} is declared twice")
    REGISTRY[name] = metric = Metric(name, kind, unit, tuple(sorted(tag_keys)), description, boundaries)
    return metric


# ---- curation ------------------------------------------------------------------------------------------
CURATE_DOCUMENTS_IN = declare(
    "raylm_curate_documents_in", "gauge", "documents", ("run",), "documents read by the last curation"
)
CURATE_DOCUMENTS_OUT = declare(
    "raylm_curate_documents_out", "gauge", "documents", ("run",), "documents kept by the last curation"
)
CURATE_TOKENS = declare("raylm_curate_tokens", "gauge", "tokens", ("run",), "packed tokens written")
CURATE_RUNS = declare("raylm_curate_runs_total", "counter", "runs", ("run",), "curation runs completed")
CURATE_STAGE_DOCUMENTS_IN = declare(
    "raylm_curate_stage_documents_in", "gauge", "documents", ("run", "stage"), "documents into each stage"
)
CURATE_STAGE_DOCUMENTS_OUT = declare(
    "raylm_curate_stage_documents_out", "gauge", "documents", ("run", "stage"), "documents out of each stage"
)
CURATE_STAGE_SECONDS = declare(
    "raylm_curate_stage_seconds", "gauge", "seconds", ("run", "stage"), "wall time of each timed phase"
)
CURATE_DROPPED_DOCUMENTS = declare(
    "raylm_curate_dropped_documents",
    "gauge",
    "documents",
    ("run", "stage", "reason"),
    "documents dropped by the last curation, by the stage and reason that dropped them",
)
CURATE_DUPLICATE_RATIO = declare(
    "raylm_curate_duplicate_ratio",
    "gauge",
    "ratio",
    ("run",),
    "exact and near duplicates removed over the documents that reached dedup",
)
CURATE_MEGABYTES_PER_SECOND = declare(
    "raylm_curate_megabytes_per_second", "gauge", "MB/s", ("run",), "input MB over the run's wall time"
)

# ---- training ------------------------------------------------------------------------------------------
TRAIN_LOSS = declare("raylm_train_loss", "gauge", "nats", ("run",), "training loss of the last step")
TRAIN_EVAL_LOSS = declare("raylm_train_eval_loss", "gauge", "nats", ("run",), "latest held-out loss")
TRAIN_EVAL_PERPLEXITY = declare(
    "raylm_train_eval_perplexity", "gauge", "ratio", ("run",), "latest held-out perplexity"
)
TRAIN_LEARNING_RATE = declare(
    "raylm_train_learning_rate", "gauge", "ratio", ("run",), "current learning rate"
)
TRAIN_GRAD_NORM = declare("raylm_train_grad_norm", "gauge", "ratio", ("run",), "global gradient norm")
TRAIN_TOKENS_PER_SECOND = declare(
    "raylm_train_tokens_per_second", "gauge", "tokens/s", ("run",), "training throughput, all workers"
)
TRAIN_MFU = declare("raylm_train_mfu", "gauge", "ratio", ("run",), "model FLOPs utilization")
TRAIN_STEPS = declare("raylm_train_steps_total", "counter", "steps", ("run",), "optimizer steps taken")
TRAIN_STEP_SECONDS = declare(
    "raylm_train_step_seconds", "histogram", "seconds", ("run",), "optimizer step time", LATENCY_BOUNDARIES
)
TRAIN_CHECKPOINT_SECONDS = declare(
    "raylm_train_checkpoint_seconds",
    "histogram",
    "seconds",
    ("run",),
    "checkpoint save time",
    LATENCY_BOUNDARIES,
)

TRAIN_NONFINITE_LOSS_STEPS = declare(
    "raylm_train_nonfinite_loss_steps_total",
    "counter",
    "steps",
    ("run",),
    "steps whose training loss was NaN or infinite (Ray does not export a gauge set to NaN)",
)
TRAIN_RESTARTS = declare(
    "raylm_train_restarts_total", "counter", "restarts", ("run",), "attempts that resumed from a checkpoint"
)
TRAIN_STEPS_LOST = declare(
    "raylm_train_steps_lost_total",
    "counter",
    "steps",
    ("run",),
    "steps redone after a restart: the previous attempt's last step minus the resumed step",
)

# ---- tuning --------------------------------------------------------------------------------------------
TUNE_TRIALS = declare(
    "raylm_tune_trials_total",
    "counter",
    "trials",
    ("run", "status"),
    "trials that ended, by status (completed, stopped early, error)",
)
TUNE_BEST_EVAL_LOSS = declare(
    "raylm_tune_best_eval_loss", "gauge", "nats", ("run",), "best validation loss of a completed trial so far"
)
TUNE_TRIALS_RUNNING = declare(
    "raylm_tune_trials_running", "gauge", "trials", ("run",), "trials started and not yet ended"
)
TUNE_TRIAL_SECONDS = declare(
    "raylm_tune_trial_seconds",
    "histogram",
    "seconds",
    ("run",),
    "wall time of a trial, start to end",
    (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)

# ---- serving -------------------------------------------------------------------------------------------
SERVE_QUEUE_WAIT_SECONDS = declare(
    "raylm_serve_queue_wait_seconds",
    "histogram",
    "seconds",
    ("model",),
    "request arrival to admission",
    LATENCY_BOUNDARIES,
)
SERVE_TIME_TO_FIRST_TOKEN_SECONDS = declare(
    "raylm_serve_time_to_first_token_seconds",
    "histogram",
    "seconds",
    ("model",),
    "request arrival to its first token",
    LATENCY_BOUNDARIES,
)
SERVE_BATCH_SIZE = declare(
    "raylm_serve_batch_size",
    "histogram",
    "sequences",
    ("model",),
    "sequences per decoding forward pass",
    BATCH_SIZE_BOUNDARIES,
)
SERVE_TOKENS_GENERATED = declare(
    "raylm_serve_tokens_generated_total", "counter", "tokens", ("model",), "completion tokens generated"
)
SERVE_REQUESTS = declare(
    "raylm_serve_requests_total",
    "counter",
    "requests",
    ("route", "status"),
    "HTTP requests, by route and status",
)
SERVE_INTER_TOKEN_LATENCY_SECONDS = declare(
    "raylm_serve_inter_token_latency_seconds",
    "histogram",
    "seconds",
    ("model",),
    "time between two tokens of one sequence",
    LATENCY_BOUNDARIES,
)
SERVE_TOKENS_PER_SECOND = declare(
    "raylm_serve_tokens_per_second",
    "gauge",
    "tokens/s",
    ("model",),
    "tokens per second of the last decode step",
)
SERVE_ADAPTER_LOADS = declare(
    "raylm_serve_adapter_loads_total", "counter", "loads", ("model",), "LoRA adapter loads, by adapter id"
)


def exported_name(metric: Metric) -> str:
    """The name Prometheus sees: Ray's metrics agent prefixes every application metric with `ray_`."""
    return "ray_" + metric.name


def ray_ready() -> bool:
    """Whether this process is a Ray driver or worker (else record() does nothing)."""
    try:
        import ray

        return ray.is_initialized()
    except ImportError:
        return False


@cache
def _ray_metric(metric: Metric) -> Any:
    from ray.util import metrics

    if metric.kind == "gauge":
        return metrics.Gauge(metric.name, description=metric.description, tag_keys=metric.tag_keys)
    if metric.kind == "counter":
        return metrics.Counter(metric.name, description=metric.description, tag_keys=metric.tag_keys)
    return metrics.Histogram(
        metric.name,
        description=metric.description,
        boundaries=list(metric.boundaries),
        tag_keys=metric.tag_keys,
    )


def record(metric: Metric, value: float, tags: dict[str, str]) -> None:
    """Set a gauge, add to a counter or observe a histogram value; tags must be the declared keys."""
    if REGISTRY.get(metric.name) is not metric:
        raise ValueError(f"metric {metric.name} is not declared in core/metrics.py")
    if tuple(sorted(tags)) != metric.tag_keys:
        raise ValueError(f"metric {metric.name} takes tags {metric.tag_keys}, got {tuple(sorted(tags))}")
    if not ray_ready():
        return
    handle = _ray_metric(metric)
    if metric.kind == "gauge":
        handle.set(float(value), tags=tags)
    elif metric.kind == "counter":
        if value > 0:
            handle.inc(float(value), tags=tags)
    else:
        handle.observe(float(value), tags=tags)


def rank() -> int:
    """Global rank of this training worker (0 outside distributed training)."""
    return int(os.environ.get("RANK", "0"))


def log_rank0(msg: str, *args: Any) -> None:
    if rank() == 0:
        log.info(msg, *args)
