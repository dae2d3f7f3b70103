"""A sweep in MLflow: the tune stage's run (core/tracking.py) is the parent, each trial a nested child run
with the trial's sampled point as params, the metrics of every report it makes to Tune, and its status.

Logged from Tune's driver (a LoggerCallback), so one process writes and trials need no store access.
Ray's own MLflowLoggerCallback is not used: it sets mlflow's process-wide tracking URI and active run,
sends one request per metric, and raises in setup() when the server is down, failing the sweep.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.logger import LoggerCallback

from raylm.core import tracking

# What a trial's report holds that is worth a curve (training/progress.py's reported metrics).
TRIAL_KEYS = ("loss", "lr", "eval_loss", "eval_perplexity", "tokens", "tokens_per_s", "grad_norm")


class TrialRuns(LoggerCallback):
    """One child run per trial under the sweep's run. Tune pickles its callbacks with the experiment
    (what --resume restores), so this holds plain data and opens clients lazily; a restored trial finds
    its child run again by its trial id."""

    def __init__(self, parent: tracking.RunRef):
        self.parent = parent
        self._runs: dict[str, tracking.Tracker] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"parent": self.parent, "_runs": {}}

    def _run(self, trial) -> tracking.Tracker:
        if trial.trial_id not in self._runs:
            key = {"raylm.trial_id": trial.trial_id, "raylm.stage": "tune.trial"}
            self._runs[trial.trial_id] = tracking.start_child(self.parent, str(trial), trial.config, key)
        return self._runs[trial.trial_id]

    def log_trial_start(self, trial) -> None:
        self._run(trial)

    def log_trial_result(self, iteration: int, trial, result: dict[str, Any]) -> None:
        values = {
            k: float(result[k])
            for k in TRIAL_KEYS
            if isinstance(result.get(k), (int, float)) and math.isfinite(result[k])
        }
        self._run(trial).log_metrics(values, step=int(result.get("step", iteration)))

    def log_trial_end(self, trial, failed: bool = False) -> None:
        self._run(trial).end(tracking.FAILED if failed else tracking.FINISHED)
        self._runs.pop(trial.trial_id, None)
