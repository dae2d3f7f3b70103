"""What a training step tells the outside world: the metrics row given to `report`, the gauges of
core/metrics.py (tagged with the run's name), and the log lines of rank 0.

A row of the history (metrics.jsonl, and trainer_state.json in checkpoints) holds what happened at that
step: `eval_loss` only on the steps that evaluated. The reported metrics also carry the latest
evaluation on every later step, so a Ray Tune scheduler that compares trials at any step sees it.
"""

from __future__ import annotations

import math
from typing import Any

from raylm.core import metrics

EVAL_KEYS = ("eval_loss", "eval_perplexity")

GAUGES = {  # reported metric -> the gauge it sets
    "loss": metrics.TRAIN_LOSS,
    "lr": metrics.TRAIN_LEARNING_RATE,
    "grad_norm": metrics.TRAIN_GRAD_NORM,
    "tokens_per_s": metrics.TRAIN_TOKENS_PER_SECOND,
    "mfu": metrics.TRAIN_MFU,
    "eval_loss": metrics.TRAIN_EVAL_LOSS,
    "eval_perplexity": metrics.TRAIN_EVAL_PERPLEXITY,
}


def latest_eval(history: list[dict[str, Any]]) -> dict[str, float]:
    """The last evaluation in a history (so a resumed run reports it before its own next one)."""
    for row in reversed(history):
        if "eval_loss" in row:
            return {k: row[k] for k in EVAL_KEYS if k in row}
    return {}


def reported_metrics(row: dict[str, Any], last_eval: dict[str, float], run_name: str) -> dict[str, Any]:
    """The scalars of a history row, the latest evaluation, and the run's name."""
    scalars = {k: v for k, v in row.items() if isinstance(v, (int, float, str))}
    return last_eval | scalars | {"run": run_name}


def emit_metrics(reported: dict[str, Any], rank: int) -> None:
    """Set the gauges and count the step, once per step (rank 0)."""
    if rank != 0:
        return
    tags = {"run": reported["run"]}
    for key, metric in GAUGES.items():
        if key in reported and math.isfinite(reported[key]):
            metrics.record(metric, reported[key], tags)
    if not math.isfinite(reported["loss"]):  # cluster/monitoring/alerts.yml: RaylmTrainingLossNaN
        metrics.record(metrics.TRAIN_NONFINITE_LOSS_STEPS, 1, tags)
    metrics.record(metrics.TRAIN_STEPS, 1, tags)
    metrics.record(metrics.TRAIN_STEP_SECONDS, reported["step_time_s"], tags)
    _remember_last_step(reported["run"], int(reported["step"]))


def emit_restart(run_name: str, attempt: int, resumed_step: int, rank: int) -> None:
    """On a restart (attempt > 0, rank 0): count it, and the steps the previous attempt took past the
    checkpoint it resumed from, which this attempt redoes."""
    if rank != 0 or attempt == 0:
        return
    tags = {"run": run_name}
    metrics.record(metrics.TRAIN_RESTARTS, 1, tags)
    last = _recall_last_step(run_name)
    if last is not None:
        metrics.record(metrics.TRAIN_STEPS_LOST, max(0, last - resumed_step), tags)


# The last step a run reached lives in the cluster's key-value store (GCS), so the next attempt, in new
# worker processes, can tell how far the previous one got past its checkpoint. Outside Ray: nowhere.
def _kv_key(run_name: str) -> bytes:
    return f"raylm/train/{run_name}/last_step".encode()


def _remember_last_step(run_name: str, step: int) -> None:
    if metrics.ray_ready():
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(_kv_key(run_name), str(step).encode(), overwrite=True)


def _recall_last_step(run_name: str) -> int | None:
    if not metrics.ray_ready():
        return None
    from ray.experimental import internal_kv

    value = internal_kv._internal_kv_get(_kv_key(run_name))
    return int(value) if value else None


def log_step(row: dict[str, Any], max_steps: int, log_every: int) -> None:
    """A metrics line on rank 0 every log_every steps and at the last step."""
    if row["step"] % log_every and row["step"] != max_steps:
        return
    metrics.log_rank0(
        "step %d/%d loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f MFU %.2f%% step %.3fs%s",
        row["step"],
        max_steps,
        row["loss"],
        row["lr"],
        row["grad_norm"],
        row["tokens_per_s"],
        100 * row["mfu"],
        row["step_time_s"],
        f" eval_loss {row['eval_loss']:.4f}" if "eval_loss" in row else "",
    )
