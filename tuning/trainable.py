"""What one trial runs: the training loop of training/loop.py with the sampled point written into its
config, reporting to Ray Tune through the loop's `report(metrics, checkpoint)` seam.

A one-worker trial runs the loop inside the trial's own process (InProcess runtime): no second actor
to start, and its checkpoints go to Tune, which keeps the best per trial (by eval_loss) and hands the
latest back after a restart. A trial with more workers is the pattern Ray 2.60 documents for Ray Train
V2 under Tune: the trial function builds a TorchTrainer whose TuneReportCallback forwards the rank-0
metrics; Ray Train keeps those checkpoints under the trial's folder and resumes from them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

from raylm.core.artifacts import TrainDir, TuneDir
from raylm.training.config import TrainConfig
from raylm.tuning.spaces import apply_params

log = logging.getLogger("raylm")


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares (passed once with tune.with_parameters, not part of the searched config)."""

    train: dict[str, Any]
    """The trial's TrainConfig dump with model and data_dir filled in; output is set per trial."""
    groups: dict[str, list[str]]
    """attention / mlp / all layer names of the base model."""
    output: str
    """The tuning output folder (trials live under trials/<trial_id>/)."""
    seed: int
    seq_len: int
    curated: dict[str, Any]
    run_name: str


def trial_train_config(setup: TrialSetup, params: dict[str, Any], trial_id: str) -> TrainConfig:
    """The sampled point written into the trial's training config; its output is trials/<trial_id>/."""
    train = apply_params(setup.train, params, setup.groups)
    train["output"] = TuneDir(setup.output).trial(trial_id).root
    return TrainConfig.model_validate(train)


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """Ray Tune's function trainable."""
    from ray import tune

    from raylm.training.run import loop_config

    trial_id = tune.get_context().get_trial_id()
    t = trial_train_config(setup, params, trial_id)
    run_name = f"{setup.run_name}/{trial_id}"
    if t.num_workers == 1:
        from raylm.training.loop import train_in_process

        with resume_point() as resume_from, tempfile.TemporaryDirectory(prefix="raylm-trial-") as hold:
            config = loop_config(t, setup.seed, setup.curated, resume_from, run_name=run_name)
            report = TuneReporter(t, hold)
            history = train_in_process(config, report)
            report.flush(history, run_name)
    else:
        run_torch_trainer(t, setup, trial_id, run_name)


class resume_point:
    """The trial's latest Tune checkpoint as a local folder (after a restart or a resumed sweep)."""

    def __enter__(self) -> str | None:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        self._ctx = checkpoint.as_directory() if checkpoint is not None else None
        return self._ctx.__enter__() if self._ctx is not None else None

    def __exit__(self, *exc: Any) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


class TuneReporter:
    """The loop's report function inside a one-worker trial. Every evaluation and every checkpoint go to
    Tune (a tune.report waits for the controller to take it, so the steps in between are not sent).
    The last step's report is held until the trial has exported its adapter: Tune may end a trial at any
    report (ASHA does at max_t), and the export must exist for every trial that ran its budget."""

    def __init__(self, t: TrainConfig, hold_dir: str):
        self.t, self.hold_dir = t, hold_dir
        self.held: tuple[dict[str, Any], str | None] | None = None

    def __call__(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        from ray import tune

        step = metrics["step"]
        if step == self.t.max_steps:
            kept = None
            if checkpoint_dir is not None:  # the loop deletes its folder when this call returns
                kept = os.path.join(self.hold_dir, os.path.basename(checkpoint_dir))
                shutil.copytree(checkpoint_dir, kept)
            self.held = (metrics, kept)
            return
        if checkpoint_dir is None and step % self.t.eval_every:
            return
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    def flush(self, history: list[dict[str, Any]], run_name: str) -> None:
        """The held last report, after the export. A trial restored from its final checkpoint trained no
        step this time, so its last history row is reported instead."""
        from ray import tune

        from raylm.training import progress

        if self.held is None:
            if not history:
                return
            last = history[-1]
            self.held = (progress.reported_metrics(last, progress.latest_eval(history), run_name), None)
        metrics, kept = self.held
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(kept) if kept else None)


def run_torch_trainer(t: TrainConfig, setup: TrialSetup, trial_id: str, run_name: str) -> None:
    """A multi-worker trial: a TorchTrainer whose rank-0 reports reach Tune through TuneReportCallback.
    Its checkpoints stay with Ray Train under the trial's folder; a rerun of the trial (a resumed sweep)
    continues from the newest, because the run's name and storage path are the trial's. The last step
    is reported from here, after the workers have exported (see TuneReporter)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raylm.training import progress
    from raylm.training.plots import read_history
    from raylm.training.run import build_trainer, loop_config

    # Ray Train reports every report_every steps; one report per evaluation is what Tune needs.
    t = t.model_copy(update={"report_every": t.eval_every or t.report_every})
    t.checkpoint.run_name = trial_id
    t.checkpoint.storage_path = TuneDir(setup.output).trial(trial_id).checkpoints
    config = loop_config(t, setup.seed, setup.curated, None, run_name=run_name)
    os.makedirs(t.checkpoint.storage_path, exist_ok=True)
    build_trainer(t, config, callbacks=[TuneReportCallback()], loop=trial_loop_per_worker).fit()
    history = read_history(TrainDir(t.output).metrics_jsonl)
    tune.report(progress.reported_metrics(history[-1], progress.latest_eval(history), run_name))


def trial_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker of a multi-worker trial: the training loop, with its last step's report left
    to the trial (Tune may end a trial at any report, and this one comes before the export)."""
    from raylm.training.loop import train
    from raylm.training.runtime import RayTrain, ray_train_report

    t = config["train"]
    to_ray = ray_train_report(t["report_every"])

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if metrics["step"] < t["max_steps"]:
            to_ray(metrics, checkpoint_dir)

    train(config, RayTrain(), report)
