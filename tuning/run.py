"""`raylm tune RECIPE [--resume]`: sweep a LoRA (or full) fine-tune of a base model with Ray Tune.

Setup (the base model, the curated splits, the space against the model's layers, the output folder:
all before Ray starts where they exist), fit (Tuner, or Tuner.restore for --resume), cleanup
(trials.csv, plots, best_config.yaml, best_adapter/, adapters/, manifest.json linking the base model and
the data).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from raylm.core import lineage, outputs, storage, tracking
from raylm.core.artifacts import TUNE, CuratedDir, ExportDir, TuneDir
from raylm.core.config import PlatformConfig, dump_config
from raylm.core.errors import ConfigError, InputError, RaylmError
from raylm.core.session import sigint_restored
from raylm.tuning.config import TuneConfig
from raylm.tuning.spaces import check_modules, linear_module_groups

log = logging.getLogger("raylm")


class TuningFailed(RaylmError):
    """No trial of the sweep completed."""


# ---- setup ---------------------------------------------------------------------------------------------


def module_groups(t: TuneConfig) -> dict[str, list[str]]:
    """The base model's layer groups, with the space's target modules checked against them."""
    ExportDir(t.model).validate_model("tune.model")
    trust = bool(t.trial.model and t.trial.model.trust_remote_code)
    groups = linear_module_groups(t.model, trust_remote_code=trust)
    try:
        check_modules(t.sampled(), groups)
    except ValueError as exc:
        raise ConfigError(f"tune.{exc}") from None
    return groups


def check_sweep_state(t: TuneConfig) -> None:
    """--resume needs a sweep to continue; a fresh start refuses to bury an unfinished one."""
    experiment = TuneDir(t.output).experiment
    started = storage.exists(experiment)
    if t.resume and not started:
        raise InputError(f"tune.resume: {t.output} holds no sweep to resume (no {TuneDir.EXPERIMENT}/)")
    if not t.resume and started and not storage.is_complete(t.output):
        raise InputError(
            f"tune.output {t.output} holds an unfinished sweep: pass --resume (tune.resume=true) to "
            "continue it, or remove the folder to start over"
        )


def preflight(cfg: PlatformConfig) -> None:
    """Checks that need no Ray: the output may be written, the sweep state fits --resume, and (when the
    base model exists already) the space's modules are layers of it."""
    t = cfg.tune
    inputs = {"tune.model": t.model, "tune.data_dir": t.data_dir}
    outputs.check_stage_output("tune.output", t.output, TUNE, cfg.run_dir, inputs)
    check_sweep_state(t)
    if os.path.isdir(t.model):  # else an earlier stage of this run writes it; run() checks it then
        module_groups(t)


def trial_base(t: TuneConfig) -> dict[str, Any]:
    """The training config every trial starts from: tune.trial with the model and data filled in."""
    train = dump_config(t.trial)
    model = train.get("model") or {}
    train["model"] = {"path": t.model, "trust_remote_code": model.get("trust_remote_code", False)}
    train["data_dir"] = t.data_dir
    return train


# ---- the sweep ---------------------------------------------------------------------------------------


def run(cfg: PlatformConfig) -> dict[str, Any]:
    from raylm.training.run import read_curated
    from raylm.tuning.sweep import build_tuner, results_rows
    from raylm.tuning.tracking import TrialRuns
    from raylm.tuning.trainable import TrialSetup

    t = cfg.tune
    curated = read_curated(t.data_dir, t.trial.train_split, key="tune.data_dir")
    if not CuratedDir(t.data_dir).shard_files(t.trial.eval_split):
        raise InputError(
            f"tune.data_dir {t.data_dir} has no {t.trial.eval_split} shards: trials are scored on them "
            "(tune.trial.eval_split)"
        )
    groups = module_groups(t)
    preflight(cfg)
    if storage.is_complete(t.output) and lineage.read_manifest(t.output).get("config") == dump_config(t):
        log.info("tuning output %s is complete for this config; skipping", t.output)
        return lineage.read_manifest(t.output)
    outputs.claim_run_dir(cfg.run_dir, t.output)
    outputs.claim(t.output, TUNE)
    seed = t.trial.seed if t.trial.seed is not None else cfg.seed
    setup = TrialSetup(trial_base(t), groups, t.output, seed, int(curated["seq_len"]), curated, cfg.name)
    # A resumed sweep reopens its run; its trials' callback comes back with the Tuner (Tuner.restore).
    with tracking.stage_run(cfg, TUNE, dump_config(t), parents(t), t.output, resume=t.resume) as tracker:
        callbacks = [TrialRuns(tracker.ref)] if tracker.enabled and not t.resume else []
        tuner = build_tuner(
            t, setup, cfg.seed if t.search.seed is None else t.search.seed, cfg.name, callbacks
        )
        with sigint_restored():
            results = tuner.fit()
        rows = results_rows(results, t, setup)
        manifest = finish(cfg, rows, setup)
        out = TuneDir(t.output)
        files = [out.trials_csv, out.lr_plot, out.curves_plot]
        tracker.finish_stage(manifest, "summary", t.output, files, export=manifest.get("best"))
    return manifest


def parents(t: TuneConfig) -> list[str]:
    """The manifests a sweep was made from: the base model's (when it has one) and the data's."""
    return [p for p in (ExportDir(t.model).manifest, CuratedDir(t.data_dir).manifest) if storage.exists(p)]


def finish(cfg: PlatformConfig, rows, setup) -> dict[str, Any]:
    from raylm.tuning.best import publish_best
    from raylm.tuning.report import COMPLETED, STOPPED, ranked, table, write_report

    t = cfg.tune
    out = TuneDir(t.output)
    write_report(rows, out)
    print(table(rows), flush=True)
    best = ranked(rows)
    if not best:
        raise TuningFailed(f"no trial of the sweep completed ({len(rows)} trials); see {out.trials_csv}")
    published = publish_best(cfg, best, setup)
    summary = {
        "trials": len(rows),
        "completed": sum(r.status == COMPLETED for r in rows),
        "stopped_early": sum(r.status == STOPPED for r in rows),
        "errors": sum(r.status not in (COMPLETED, STOPPED) for r in rows),
        "steps": sum(r.steps for r in rows),
        "best_trial": best[0].trial_id,
        "best_eval_loss": best[0].eval_loss,
    }
    manifest = lineage.write_manifest(
        t.output,
        TUNE,
        dump_config(t),
        parents=parents(t),
        seed=setup.seed,
        summary=summary,
        **published,
    )
    log.info(
        "tuning done: %d trials (%d completed, %d stopped early, %d failed); best %s eval_loss %.4f -> %s",
        summary["trials"],
        summary["completed"],
        summary["stopped_early"],
        summary["errors"],
        summary["best_trial"],
        summary["best_eval_loss"],
        published["best"],
    )
    return manifest
