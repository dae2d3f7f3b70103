"""What a sweep tells a person: one line per trial as it ends, the table of all trials at the end,
trials.csv, and two plots (validation loss against learning rate per rank; every trial's learning
curve, the ones stopped early marked).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ray.tune import Callback

from raylm.core import metrics, storage
from raylm.core.artifacts import TuneDir

log = logging.getLogger("raylm")

COMPLETED, STOPPED, ERROR = "completed", "stopped early", "error"


@dataclass
class TrialRow:
    """One line of trials.csv: the trial's point, how it ended, and what it reached."""

    trial_id: str
    status: str
    stop_reason: str
    steps: int
    tokens: int
    wall_s: float
    eval_loss: float
    best_eval_loss: float
    lr: float
    rank: int | None
    alpha: int | None
    dropout: float | None
    target_modules: str | None
    rslora: bool | None
    dora: bool | None
    quantize_4bit: bool | None
    curve: list[tuple[int, float]] = field(default_factory=list, repr=False)
    """(step, eval_loss) of every report: for the learning-curve plot, not for the CSV."""
    train: dict[str, Any] = field(default_factory=dict, repr=False)
    """The trial's training config as it ran (for best_config.yaml), not for the CSV."""

    def point(self) -> str:
        parts = [f"lr={self.lr:.3g}"]
        if self.rank is not None:
            parts += [f"r={self.rank}", f"alpha={self.alpha}", f"modules={self.target_modules}"]
            if self.dropout:
                parts.append(f"dropout={self.dropout:.3g}")
            parts += [name for name in ("rslora", "dora", "quantize_4bit") if getattr(self, name)]
        return " ".join(parts)


CSV_FIELDS = [f for f in TrialRow.__dataclass_fields__ if f not in ("curve", "train")]


def ended(metrics_: dict[str, Any], error: Any, max_steps: int, scheduler: str) -> tuple[str, str]:
    """(status, stop reason) of a trial from its last reported metrics."""
    step = int(metrics_.get("step", 0))
    if error is not None:
        return ERROR, (str(error).strip().splitlines() or [type(error).__name__])[-1][:200]
    if step >= max_steps:
        return COMPLETED, f"ran its budget ({max_steps} steps)"
    by = "ASHA" if scheduler == "asha" else "the scheduler"
    return STOPPED, f"stopped by {by} at step {step}"


def trial_row(
    trial_id: str,
    last: dict[str, Any],
    curve: list[tuple[int, float]],
    effective: dict[str, Any],
    status: tuple[str, str],
) -> TrialRow:
    losses = [loss for _, loss in curve if math.isfinite(loss)]
    lora = effective["lora"]
    tuned_lora = lora.get("enabled", False)
    return TrialRow(
        trial_id=trial_id,
        status=status[0],
        stop_reason=status[1],
        steps=int(last.get("step", 0)),
        tokens=int(last.get("tokens", 0)),
        wall_s=round(float(last.get("time_total_s", 0.0)), 2),
        eval_loss=float(last.get("eval_loss", math.nan)),
        best_eval_loss=min(losses) if losses else math.nan,
        lr=effective["schedule"]["lr"],
        rank=lora["r"] if tuned_lora else None,
        alpha=lora["alpha"] if tuned_lora else None,
        dropout=lora["dropout"] if tuned_lora else None,
        target_modules=effective.get("target_set") if tuned_lora else None,
        rslora=lora["use_rslora"] if tuned_lora else None,
        dora=lora["use_dora"] if tuned_lora else None,
        quantize_4bit=lora["quantize_4bit"] if tuned_lora else None,
        curve=curve,
        train=effective,
    )


def ranked(rows: list[TrialRow]) -> list[TrialRow]:
    """Completed trials, best (lowest final validation loss) first."""
    done = [r for r in rows if r.status == COMPLETED and math.isfinite(r.eval_loss)]
    return sorted(done, key=lambda r: (r.eval_loss, r.trial_id))


def write_csv(rows: list[TrialRow], uri: str) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: v for k, v in asdict(row).items() if k in CSV_FIELDS})
    storage.write_text(uri, buf.getvalue())


def table(rows: list[TrialRow]) -> str:
    """The end-of-sweep table, best first, then stopped and failed trials."""
    order = ranked(rows) + [r for r in rows if r not in ranked(rows)]
    head = f"{'trial':<14} {'status':<14} {'steps':>5} {'eval_loss':>9} {'wall_s':>7}  point"
    lines = [head, "-" * len(head)]
    for r in order:
        lines.append(
            f"{r.trial_id:<14} {r.status:<14} {r.steps:>5} {r.eval_loss:>9.4f} {r.wall_s:>7.1f}  {r.point()}"
        )
    return "\n".join(lines)


class TrialLines(Callback):
    """A Ray Tune callback: one log line per trial that ends (completed, stopped early, failed), and the
    trial counters and best-loss gauge of core/metrics.py."""

    def __init__(self, total: int, max_steps: int, scheduler: str, run: str):
        self.total, self.max_steps, self.scheduler, self.run = total, max_steps, scheduler, run
        self.done, self.best = 0, math.inf
        self.started: dict[str, float] = {}
        self.running: set[str] = set()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.setdefault(trial.trial_id, time.time())
        self.running.add(trial.trial_id)
        metrics.record(metrics.TUNE_TRIALS_RUNNING, len(self.running), {"run": self.run})

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial, trial.error_file or "error")

    def _ended(self, trial, error) -> None:
        self.done += 1
        self.running.discard(trial.trial_id)
        metrics.record(metrics.TUNE_TRIALS_RUNNING, len(self.running), {"run": self.run})
        last = trial.last_result or {}
        status, reason = ended(last, error, self.max_steps, self.scheduler)
        loss = float(last.get("eval_loss", math.nan))
        if status == COMPLETED and loss < self.best:
            self.best = loss
            metrics.record(metrics.TUNE_BEST_EVAL_LOSS, loss, {"run": self.run})
        metrics.record(metrics.TUNE_TRIALS, 1, {"run": self.run, "status": status})
        wall = time.time() - self.started.get(trial.trial_id, time.time())
        metrics.record(metrics.TUNE_TRIAL_SECONDS, wall, {"run": self.run})
        point = " ".join(f"{k}={_short(v)}" for k, v in sorted(trial.config.items()))
        log.info(
            "trial %d/%d %s %s: eval_loss %.4f at step %s, %.1fs (%s) | %s",
            self.done,
            self.total,
            trial.trial_id,
            status,
            loss,
            last.get("step", 0),
            wall,
            reason,
            point,
        )


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# ---- plots ---------------------------------------------------------------------------------------------


def plot_lr(rows: list[TrialRow], uri: str) -> None:
    """Final validation loss against learning rate, one series per LoRA rank; stopped trials hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ranks = sorted({r.rank for r in rows}, key=lambda x: (x is None, x))
    for i, rank in enumerate(ranks):
        color = f"C{i % 10}"
        for status, fill in ((COMPLETED, color), (STOPPED, "none")):
            pts = [(r.lr, r.eval_loss) for r in rows if r.rank == rank and r.status == status]
            if pts:
                label = (f"r={rank}" if rank is not None else "full") + (
                    "" if status == COMPLETED else " (stopped)"
                )
                ax.scatter(*zip(*pts, strict=True), facecolors=fill, edgecolors=color, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation loss (last report)")
    ax.set_title("validation loss against learning rate")
    ax.legend(fontsize=8)
    _save(fig, uri)


def plot_curves(rows: list[TrialRow], uri: str) -> None:
    """Every trial's validation loss against steps; the trials stopped early end in an x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        if not r.curve:
            continue
        steps, losses = zip(*r.curve, strict=True)
        stopped = r.status != COMPLETED
        ax.plot(steps, losses, color="0.6" if stopped else None, lw=1 if stopped else 1.5, alpha=0.9)
        if stopped:
            ax.plot(steps[-1], losses[-1], "x", color="C3")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"learning curves ({sum(r.status == STOPPED for r in rows)} stopped early: x)")
    _save(fig, uri)


def _save(fig, uri: str) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())


def write_report(rows: list[TrialRow], out: TuneDir) -> None:
    write_csv(rows, out.trials_csv)
    plot_lr(rows, out.lr_plot)
    plot_curves(rows, out.curves_plot)
