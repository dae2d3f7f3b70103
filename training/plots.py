"""The per-step history as metrics.jsonl and a loss-curve PNG in the training output folder."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from raylm.core import storage
from raylm.core.artifacts import TrainDir


def write_history(history: list[dict[str, Any]], output: str) -> None:
    lines = "".join(json.dumps(row) + "\n" for row in history)
    storage.write_text(TrainDir(output).metrics_jsonl, lines)
    loss_curve(history, TrainDir(output).loss_curve)


def read_history(uri: str) -> list[dict[str, Any]]:
    """metrics.jsonl back as rows (json writes NaN as NaN, which json.loads reads)."""
    return [json.loads(line) for line in storage.read_text(uri).splitlines() if line.strip()]


def loss_curve(history: list[dict[str, Any]], uri: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train loss")
    ev = [r for r in history if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval loss")
    for r in history:
        if r.get("attempt") and r.get("first_step_wall"):
            ax.axvline(r["step"], color="grey", ls=":", lw=1)  # a resume
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "loss.png")
        fig.savefig(local, dpi=100)
        plt.close(fig)
        fs, path = storage.filesystem(uri)
        with open(local, "rb") as src, fs.open_output_stream(path) as dst:
            dst.write(src.read())
