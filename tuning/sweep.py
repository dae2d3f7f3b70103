"""The Ray Tune side of a sweep: searcher, scheduler, resources, the Tuner (or Tuner.restore), and the
rows of trials.csv from its results.

Searchers: Optuna's TPE through OptunaSearch (behind a ConcurrencyLimiter), or Ray's
BasicVariantGenerator for random and grid search; all seeded. ASHA (one bracket) stops trials by the
validation loss they report at each evaluation, with the budget counted in steps or tokens. Tune keeps
one checkpoint per trial, the best by eval_loss (and the latest, which a restart needs).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from raylm.core.artifacts import TuneDir
from raylm.tuning.config import TuneConfig
from raylm.tuning.report import TrialLines, TrialRow, ended, trial_row
from raylm.tuning.spaces import apply_params, grid_size, to_param_space
from raylm.tuning.trainable import TrialSetup, run_trial

log = logging.getLogger("raylm")

METRIC, MODE = "eval_loss", "min"
DEFAULT_SAMPLES = 8
TRIAL_DRIVER_CPUS = 0.01
# Tune snapshots the experiment (trials, searcher) at most this often; a killed driver loses at most the
# trials that ended since, and those resume from their checkpoints rather than train again.
EXPERIMENT_CHECKPOINT_S = "2"


def num_trials(t: TuneConfig) -> int:
    if t.search.algorithm == "grid":
        return grid_size(t.sampled())
    return t.search.num_samples or DEFAULT_SAMPLES


def searcher(t: TuneConfig, seed: int):
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if t.search.algorithm != "tpe":
        return BasicVariantGenerator(random_state=seed, max_concurrent=t.search.max_concurrent)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tpe = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed), metric=METRIC, mode=MODE)
    return ConcurrencyLimiter(tpe, max_concurrent=t.search.max_concurrent)


def tokens_per_step(t: TuneConfig, seq_len: int) -> int:
    return t.trial.global_batch_size * seq_len


def scheduler(t: TuneConfig, seq_len: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = t.scheduler
    if s.type == "none":
        return FIFOScheduler()
    unit = tokens_per_step(t, seq_len) if s.budget == "tokens" else 1
    grace = s.grace_period or t.trial.eval_every * unit
    return ASHAScheduler(
        time_attr="tokens" if s.budget == "tokens" else "step",
        max_t=t.trial.max_steps * unit,
        grace_period=grace,
        reduction_factor=s.reduction_factor,
        brackets=1,
    )


def trainable(t: TuneConfig, setup: TrialSetup):
    """run_trial with the shared setup, reserving a trial's resources: all of them for a one-worker trial
    (it trains in its own process), next to nothing for a multi-worker one (its TorchTrainer's workers
    reserve theirs)."""
    from ray import tune

    fn = tune.with_parameters(run_trial, setup=setup)
    if t.trial.num_workers > 1:  # Tune refuses an empty request; the trial's driver thread needs little
        return tune.with_resources(fn, {"cpu": TRIAL_DRIVER_CPUS})
    return tune.with_resources(fn, {"cpu": t.resources.cpus, "gpu": t.resources.gpus})


def build_tuner(t: TuneConfig, setup: TrialSetup, seed: int, run: str, callbacks=()):
    """A new Tuner, or the killed sweep's (Tuner.restore: finished trials stay finished, unfinished ones
    continue from their latest checkpoint, the searcher continues from its saved state, and the callbacks
    are the ones the sweep started with). `callbacks`: more Tune callbacks (tuning/tracking.py's)."""
    from ray import tune

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", EXPERIMENT_CHECKPOINT_S)
    # Each trial checkpoint forces a snapshot (num_to_keep=1), which is what a resume needs; Tune warns
    # about the frequency every time.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    fn = trainable(t, setup)
    out = TuneDir(t.output)
    if t.resume:
        log.info("resuming the sweep in %s", out.experiment)
        return tune.Tuner.restore(out.experiment, trainable=fn, resume_unfinished=True, resume_errored=True)
    total = num_trials(t)
    log.info(
        "sweep of %d trials (%s, %s), %d at a time",
        total,
        t.search.algorithm,
        t.scheduler.type,
        t.search.max_concurrent,
    )
    return tune.Tuner(
        fn,
        param_space=to_param_space(t.sampled(), t.search.algorithm),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=searcher(t, seed),
            scheduler=scheduler(t, setup.seq_len),
            num_samples=1 if t.search.algorithm == "grid" else total,
            # A trial process imports torch, transformers and DeepSpeed (about 10 s on 2 cores) once and
            # runs trial after trial: training/runtime.py's InProcess runtime keeps its group for reuse.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=TuneDir.EXPERIMENT,
            storage_path=t.output,
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=METRIC, checkpoint_score_order=MODE
            ),
            failure_config=tune.FailureConfig(max_failures=t.trial.checkpoint.max_failures),
            callbacks=[TrialLines(total, t.trial.max_steps, t.scheduler.type, run), *callbacks],
            verbose=0,
        ),
    )


def effective(setup: TrialSetup, params: dict[str, Any]) -> dict[str, Any]:
    """The trial's training config as it ran, plus the module set's name as the space wrote it."""
    train = apply_params(setup.train, params, setup.groups)
    train["target_set"] = params.get("target_modules") or ",".join(train["lora"]["target_modules"])
    return train


def results_rows(results, t: TuneConfig, setup: TrialSetup) -> list[TrialRow]:
    """One TrialRow per trial of the ResultGrid (every trial of a resumed sweep too)."""
    rows = []
    for result in results:
        last = dict(result.metrics or {})
        history = result.metrics_dataframe
        curve: list[tuple[int, float]] = []
        if history is not None and METRIC in history:
            curve = [(int(s), float(v)) for s, v in zip(history["step"], history[METRIC], strict=True)]
        params = dict(result.config or {})
        trial_id = last.get("trial_id") or os.path.basename(result.path).split("_")[1]
        status = ended(last, result.error, t.trial.max_steps, t.scheduler.type)
        rows.append(trial_row(trial_id, last, curve, effective(setup, params), status))
    return sorted(rows, key=lambda r: r.trial_id)
