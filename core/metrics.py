"""One place for metrics: Ray's metrics API (scraped by Prometheus, shown in the dashboard) plus logs.

Stages call `gauge`/`counter`/`histogram` with a name and tags; metric objects are created once per
process and reused. Outside a Ray worker or driver (plain torchrun, unit tests) the Ray metric calls are
skipped, so the same code runs everywhere. `log_rank0` prints a line only on rank 0 of a training run.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from typing import Any

log = logging.getLogger("raylm")
PREFIX = "raylm_"


def _ray_ready() -> bool:
    try:
        import ray

        return ray.is_initialized()
    except ImportError:
        return False


@cache
def _metric(
    kind: str, name: str, tag_keys: tuple[str, ...], description: str, boundaries: tuple[float, ...] | None
) -> Any:
    from ray.util import metrics

    full = PREFIX + name
    if kind == "gauge":
        return metrics.Gauge(full, description=description, tag_keys=tag_keys)
    if kind == "counter":
        return metrics.Counter(full, description=description, tag_keys=tag_keys)
    return metrics.Histogram(
        full, description=description, boundaries=list(boundaries or ()), tag_keys=tag_keys
    )


def gauge(name: str, value: float, tags: dict[str, str] | None = None, description: str = "") -> None:
    if _ray_ready():
        tags = tags or {}
        _metric("gauge", name, tuple(sorted(tags)), description, None).set(float(value), tags=tags)


def counter(name: str, value: float = 1.0, tags: dict[str, str] | None = None, description: str = "") -> None:
    if _ray_ready() and value > 0:
        tags = tags or {}
        _metric("counter", name, tuple(sorted(tags)), description, None).inc(float(value), tags=tags)


DEFAULT_LATENCY_BOUNDARIES = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def histogram(
    name: str,
    value: float,
    tags: dict[str, str] | None = None,
    description: str = "",
    boundaries: tuple[float, ...] = DEFAULT_LATENCY_BOUNDARIES,
) -> None:
    if _ray_ready():
        tags = tags or {}
        _metric("histogram", name, tuple(sorted(tags)), description, boundaries).observe(
            float(value), tags=tags
        )


def rank() -> int:
    """Global rank of this training worker (0 outside distributed training)."""
    return int(os.environ.get("RANK", "0"))


def log_rank0(msg: str, *args: Any) -> None:
    if rank() == 0:
        log.info(msg, *args)
