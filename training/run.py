"""`raylm train RECIPE`: check the inputs, build the TorchTrainer, fit, write the manifest.

Setup (inputs and resume checks, all before a worker starts), fit (Ray Train + DeepSpeed, restarts from
the latest checkpoint on worker failure), cleanup (manifest.json linking the export to the curated data).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from raylm.core import lineage, outputs, storage, tracking
from raylm.core.artifacts import TRAIN, CuratedDir, TrainDir
from raylm.core.config import PlatformConfig, dump_config
from raylm.core.errors import InputError, RaylmError
from raylm.core.session import sigint_restored
from raylm.training import checkpoint as ckpt
from raylm.training.config import TrainConfig

log = logging.getLogger("raylm")


class TrainingFailed(RaylmError):
    """The training run ended with an error after its restarts were used up."""


def read_curated(data_dir: str, split: str = "train", key: str = "train.data_dir") -> dict[str, Any]:
    """The curated folder's manifest, checked for what training needs (shards of the split it trains on)."""
    return CuratedDir(data_dir).validate(key, split)


def check_resume(resume_from: str | None, global_batch_size: int | None = None) -> str | None:
    """An explicit resume must find a readable checkpoint: an error naming the path, never a fresh start."""
    if resume_from is None:
        return None
    if storage.is_remote(resume_from):
        ckpt.remote_resume_exists(resume_from)
        return resume_from
    path = os.path.abspath(resume_from)
    state = ckpt.read_state(path)
    if (
        global_batch_size is not None
        and state.get("global_batch_size", global_batch_size) != global_batch_size
    ):
        raise ckpt.CheckpointReadError(
            f"train.checkpoint.resume_from {path} was trained with global_batch_size "
            f"{state['global_batch_size']}, but train.global_batch_size is {global_batch_size}"
        )
    return path


def storage_path(t: TrainConfig) -> str:
    path = t.checkpoint.storage_path or TrainDir(t.output).checkpoints
    return path if storage.is_remote(path) else os.path.abspath(path)


def loop_config(
    t: TrainConfig,
    seed: int,
    curated: dict[str, Any],
    resume_from: str | None,
    backend: str = "ray",
    storage_dir: str | None = None,
    run_name: str | None = None,
    tracking: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The plain-data config of training/loop.py's train() (also what a Ray Tune trial passes).
    run_name tags the run's metrics; without it the loop uses train.checkpoint.run_name. tracking: the
    MLflow run rank 0 logs each step to (core/tracking.py's Tracker.ref_dict())."""
    return {
        "train": dump_config(t),
        "seed": seed,
        "seq_len": int(curated["seq_len"]),
        "curated_manifest": {
            k: curated.get(k) for k in ("kind", "created_at", "seq_len", "vocab_size", "counts")
        },
        "resume_from": resume_from,
        "backend": backend,
        "storage_dir": storage_dir,
        "run_name": run_name,
        "tracking": tracking,
    }


def build_trainer(t: TrainConfig, config: dict[str, Any], callbacks=(), loop=None):
    """The TorchTrainer of a training run. A tuning trial passes Tune's report callback and its own
    per-worker function (`loop`, default training/loop.py's train_loop_per_worker).

    No Ray Data dataset goes with it: every worker reads the rows of its own batches from the curated
    folder (config["train"]["data_dir"], a path or URI every node reaches; training/data.py), so the
    driver never reads token data and no worker holds a whole split."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from raylm.training.loop import train_loop_per_worker

    return TorchTrainer(
        loop or train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=t.checkpoint.run_name,
            storage_path=storage_path(t),
            failure_config=ray.train.FailureConfig(max_failures=t.checkpoint.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.checkpoint.keep_last),
            callbacks=list(callbacks),
            # Ray Train's own INFO lines (resources requested, worker group started) go to its log files
            # in Ray's session folder only; the console keeps the loop's step lines (core/console.py).
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def preflight(cfg: PlatformConfig) -> None:
    """Checks that need no Ray, called by the CLI before Ray starts: the base model is a local folder, and
    the output folder may be written (see core/outputs.py). The curated data may not exist yet (`raylm
    run` curates first), so it is checked in run()."""
    t = cfg.train
    if t.model.path is not None and not os.path.isdir(t.model.path):
        raise InputError(
            f"train.model.path {t.model.path} is not a local folder (models are never downloaded)"
        )
    inputs = {"train.data_dir": t.data_dir, "train.model.path": t.model.path or ""}
    outputs.check_stage_output("train.output", t.output, TRAIN, cfg.run_dir, inputs)
    storage_dir = t.checkpoint.storage_path
    if storage_dir and storage.exists(storage_dir) and not storage.is_dir(storage_dir):
        raise InputError(f"train.checkpoint.storage_path: {storage_dir} is an existing file, not a folder")


def run(cfg: PlatformConfig) -> dict[str, Any]:
    t = cfg.train
    seed = t.seed if t.seed is not None else cfg.seed
    curated = read_curated(t.data_dir, t.train_split)
    resume_from = check_resume(t.checkpoint.resume_from, t.global_batch_size)
    preflight(cfg)  # again: run() is also called without the CLI (tests, notebooks)
    if storage.is_complete(t.output) and lineage.read_manifest(t.output).get("config") == dump_config(t):
        log.info("training output %s is complete for this config; skipping", t.output)
        return lineage.read_manifest(t.output)
    outputs.claim_run_dir(cfg.run_dir, t.output)
    outputs.claim(t.output, TRAIN)
    parents = [CuratedDir(t.data_dir).manifest]
    with tracking.stage_run(cfg, TRAIN, dump_config(t), parents, t.output) as tracker:
        # Metrics carry the recipe's name, as curation's do, so one dashboard filter follows a run.
        config = loop_config(t, seed, curated, resume_from, run_name=cfg.name, tracking=tracker.ref_dict())
        result = fit(t, config)
        manifest = write_train_manifest(t, seed, result, parents)
        export = TrainDir(t.output).export.root if t.export else None
        out = TrainDir(t.output)
        tracker.finish_stage(manifest, "final", t.output, [out.loss_curve, out.metrics_jsonl], export=export)
    return manifest


def fit(t: TrainConfig, config: dict[str, Any]):
    """trainer.fit(), with a checkpoint that cannot be read kept a ConfigError naming its path (exit 2)."""
    trainer = build_trainer(t, config)
    from ray.train import TrainingFailedError

    try:
        with sigint_restored():
            return trainer.fit()
    except TrainingFailedError as exc:
        for failure in getattr(exc, "worker_failures", {}).values():
            cause = failure if isinstance(failure, ckpt.CheckpointReadError) else failure.__cause__
            if isinstance(cause, ckpt.CheckpointReadError):
                raise ckpt.CheckpointReadError(str(cause)) from None
        raise TrainingFailed(f"training failed after {t.checkpoint.max_failures} restarts: {exc}") from None


def write_train_manifest(t: TrainConfig, seed: int, result, parents: list[str]) -> dict[str, Any]:
    final = dict(result.metrics or {})
    summary = {
        k: final.get(k) for k in ("step", "loss", "eval_loss", "eval_perplexity", "tokens_per_s", "mfu")
    }
    checkpoint = result.checkpoint.path if result.checkpoint else None
    manifest = lineage.write_manifest(
        t.output,
        TRAIN,
        dump_config(t),
        parents=parents,
        seed=seed,
        final=summary,
        checkpoint=checkpoint,
        storage_path=storage_path(t),
        export=TrainDir(t.output).export.root if t.export else None,
    )
    log.info(
        "training done: step %s loss %s eval_loss %s; checkpoint %s",
        summary["step"],
        summary["loss"],
        summary["eval_loss"],
        checkpoint,
    )
    return manifest
