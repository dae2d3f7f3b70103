"""The loop in one process (training/runtime.py's InProcess, what a Ray Tune trial calls), with a Python
list as its report function: a report every step, the latest eval_loss on every report after the first
evaluation, the run's name on the rows and the metric tags; the same losses as torchrun bit for bit; and
a SIGTERM that stops at a step boundary with a checkpoint, from which a rerun continues bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from train_helpers import tiny_run

from raylm.core import metrics
from raylm.core.artifacts import TrainDir
from raylm.training import checkpoint as ckpt
from raylm.training.loop import Preempted, train_in_process
from raylm.training.run import loop_config, read_curated

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def in_process_config(curated_dir: str, root) -> dict:
    """A one-worker version of the tiny run (12 steps, eval at 6 and 12, checkpoints every 4)."""
    cfg = tiny_run(curated_dir, root, num_workers=1)
    return loop_config(
        cfg.train,
        cfg.seed,
        read_curated(curated_dir),
        None,
        backend="in_process",
        storage_dir=TrainDir(str(root)).checkpoints,
        run_name=cfg.name,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ListReport:
    """report(metrics, checkpoint_dir) into a list; notes whether each checkpoint was complete."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def __call__(self, metrics_: dict, checkpoint_dir: str | None) -> None:
        row = dict(metrics_, checkpoint_dir=checkpoint_dir)
        if checkpoint_dir is not None:
            row["complete"] = ckpt.latest_complete(os.path.dirname(checkpoint_dir)) == checkpoint_dir
        self.rows.append(row)


@pytest.fixture(scope="module")
def in_process_run(curated_dir, tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("inprocess")
    config = in_process_config(curated_dir, root)
    recorded = []
    real_record = metrics.record

    def record(metric, value, tags):
        real_record(metric, value, tags)  # still checks that the metric is declared and the tags fit
        recorded.append((metric.name, tags))

    monkeypatch_module.setattr(metrics, "record", record)
    report = ListReport()
    before = signal.getsignal(signal.SIGTERM)
    history = train_in_process(config, report)
    assert signal.getsignal(signal.SIGTERM) is before  # the runtime put the handler back
    return config, report.rows, history, recorded


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_in_process_reports_every_step_with_latest_eval_and_run_name(in_process_run):
    config, rows, history, recorded = in_process_run
    assert [r["step"] for r in rows] == list(range(1, 13))  # one report per step, in one process
    assert [r["world_size"] for r in rows] == [1] * 12
    assert all(r["run"] == "t" for r in rows)
    # eval at 6 and 12; every report from the first evaluation on carries the latest one
    assert ["eval_loss" in r for r in rows] == [False] * 5 + [True] * 7
    assert all(r["eval_loss"] == rows[5]["eval_loss"] for r in rows[5:11])
    assert rows[11]["eval_loss"] != rows[5]["eval_loss"]
    assert all("eval_perplexity" in r for r in rows[5:])
    # checkpoints at 4, 8 and 12, complete (trainer_state.json written) when reported
    saved = [r for r in rows if r["checkpoint_dir"]]
    assert [r["checkpoint_step"] for r in saved] == [4, 8, 12] and all(r["complete"] for r in saved)
    # the history keeps eval_loss on the steps that evaluated; the losses are the reported ones
    assert [r["step"] for r in history if "eval_loss" in r] == [6, 12]
    assert [r["loss"] for r in history] == [r["loss"] for r in rows]
    assert history[-1]["loss"] < history[0]["loss"]
    # every metric is tagged with the run's name, and the eval gauge is set on every step after 6
    assert recorded and all(tags == {"run": "t"} for _, tags in recorded)
    names = [name for name, _ in recorded]
    assert names.count(metrics.TRAIN_STEPS.name) == 12
    assert names.count(metrics.TRAIN_EVAL_LOSS.name) == 7
    assert names.count(metrics.TRAIN_CHECKPOINT_SECONDS.name) == 3
    assert os.path.exists(TrainDir(config["train"]["output"]).metrics_jsonl)


def test_in_process_equals_torchrun_bitwise(in_process_run, tmp_path):
    """`torchrun --nproc-per-node 1 -m training.loop` on the same config gives the same losses, bit for
    bit: the launcher changes where the loop runs, not what it computes."""
    config, rows, _, _ = in_process_run
    out = tmp_path / "train"
    config = dict(config, train=dict(config["train"], output=str(out), export=False))
    config["storage_dir"] = TrainDir(str(tmp_path)).checkpoints
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(torch.get_num_threads()))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=1",
        f"--master-port={free_port()}",
    ]
    subprocess.run([*cmd, "-m", "raylm.training.loop", str(path)], cwd=ROOT, env=env, check=True, timeout=300)
    with open(TrainDir(str(out)).metrics_jsonl) as f:
        theirs = [json.loads(line) for line in f]
    assert [r["loss"] for r in theirs] == [r["loss"] for r in rows]
    assert [r["eval_loss"] for r in theirs if "eval_loss" in r] == [
        rows[5]["eval_loss"],
        rows[11]["eval_loss"],
    ]
    # torchrun's report keeps the last 3 checkpoints (keep_last=3), all complete
    kept = sorted(os.listdir(TrainDir(str(tmp_path)).checkpoints))
    assert kept == ["step_00000004", "step_00000008", "step_00000012"]


def test_in_process_sigterm_stops_at_a_checkpoint_and_a_rerun_continues_bitwise(
    in_process_run, curated_dir, tmp_path
):
    """A SIGTERM during step 5's report stops the run after step 6 with a checkpoint (Preempted); the
    same call again continues from it, and the losses equal the uninterrupted run's."""
    _, ref, _, _ = in_process_run
    config = in_process_config(curated_dir, tmp_path)
    config["train"]["export"] = False
    first = ListReport()

    def report(metrics_: dict, checkpoint_dir: str | None) -> None:
        first(metrics_, checkpoint_dir)
        if metrics_["step"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Preempted, match="step 6 by SIGTERM"):
        train_in_process(config, report)
    assert [r["step"] for r in first.rows] == list(range(1, 7))
    assert first.rows[-1]["checkpoint_step"] == 6 and first.rows[-1]["complete"]
    second = ListReport()
    history = train_in_process(config, second)
    assert [r["step"] for r in second.rows] == list(range(7, 13))
    assert second.rows[0]["eval_loss"] == first.rows[-1]["eval_loss"]  # the latest eval survives a restart
    assert [r["attempt"] for r in history] == [0] * 6 + [1] * 6
    assert [r["loss"] for r in history] == [r["loss"] for r in ref]
