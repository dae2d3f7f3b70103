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
    metrics.record(metrics.TRAIN_STEPS, 1, tags)
    metrics.record(metrics.TRAIN_STEP_SECONDS, reported["step_time_s"], tags)


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
