"""`raylm compress RECIPE`: quantize, prune or distill the trained model, one Ray task per method
(distill: a Ray Train run, compression/distill.py).

Setup (the model, the curated splits, the output folder: checked before Ray starts where they exist),
compress (a Ray task per method and one scoring the reference model, each with compress.resources, so a
cluster runs them on its workers, not on the driver; every task writes into the staged output, which
must be reachable from the workers as train.data_dir is), cleanup (compare.json, the printed table,
manifest.json linking the model and the data).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from raylm.compression import distill
from raylm.compression.config import QUANTIZED, CompressConfig
from raylm.compression.distill import DISTILL
from raylm.compression.report import comparison, table
from raylm.core import lineage, outputs, storage, tracking
from raylm.core.artifacts import COMPRESS, EXPORT_ADAPTER, CompressDir, CuratedDir, ExportDir
from raylm.core.config import PlatformConfig, dump_config
from raylm.core.errors import ConfigError, InputError

log = logging.getLogger("raylm")


# ---- setup ---------------------------------------------------------------------------------------------


def check_model(c: CompressConfig) -> None:
    """A full HF model (not an adapter) whose Linear input sizes fit the methods asked for."""
    ExportDir(c.model).validate_model("compress.model")
    if os.path.isfile(os.path.join(c.model, "adapter_config.json")):
        raise InputError(
            f"compress.model {c.model} is a PEFT adapter ({EXPORT_ADAPTER}); compress a full model"
        )
    with open(os.path.join(c.model, "config.json")) as f:
        config = json.load(f)
    inputs = {config.get(k) for k in ("hidden_size", "intermediate_size")} - {None}
    group = c.gptq.group_size
    if "gptq_w4a16" in c.methods and group and any(n % group for n in inputs):
        raise ConfigError(
            f"compress.gptq.group_size {group} does not divide the model's layer input sizes "
            f"{sorted(inputs)}; pick a divisor (e.g. {min(inputs)}) or null (one scale per channel)"
        )
    if "sparse_2of4" in c.methods and any(n % 4 for n in inputs):
        raise ConfigError(
            f"compress.methods sparse_2of4: layer input sizes {sorted(inputs)} are not multiples of 4"
        )
    if DISTILL in c.methods:
        distill.check(c)


def check_data(c: CompressConfig) -> int:
    """The curated folder has the calibration and held-out splits; returns its row length."""
    curated = CuratedDir(c.data_dir)
    manifest = curated.validate("compress.data_dir", c.calibration.split)
    if not curated.shard_files(c.eval.split):
        raise InputError(f"compress.data_dir {c.data_dir} has no {c.eval.split} shards (compress.eval.split)")
    seq_len = int(manifest["seq_len"])
    if c.calibration.seq_len and c.calibration.seq_len > seq_len:
        raise ConfigError(
            f"compress.calibration.seq_len {c.calibration.seq_len} is longer than the curated rows ({seq_len})"
        )
    return seq_len


def preflight(cfg: PlatformConfig) -> None:
    """Checks that need no Ray: the output may be written; the model and the data, once they exist (a
    train or curate stage listed before compress in this recipe writes them later; run() checks them)."""
    c = cfg.compress
    inputs = {"compress.model": c.model, "compress.data_dir": c.data_dir}
    outputs.check_stage_output("compress.output", c.output, COMPRESS, cfg.run_dir, inputs)
    if os.path.isdir(c.model) or not _written_by_earlier_stage(cfg, "train"):
        check_model(c)
    if storage.exists(c.data_dir) or not _written_by_earlier_stage(cfg, "curate"):
        check_data(c)


def _written_by_earlier_stage(cfg: PlatformConfig, stage: str) -> bool:
    return (
        stage in cfg.stages
        and "compress" in cfg.stages
        and cfg.stages.index(stage) < cfg.stages.index("compress")
    )


# ---- compress ------------------------------------------------------------------------------------------


def run(cfg: PlatformConfig) -> dict[str, Any]:
    c = cfg.compress
    check_model(c)
    check_data(c)
    preflight(cfg)
    if storage.is_complete(c.output) and lineage.read_manifest(c.output).get("config") == dump_config(c):
        log.info("compression output %s is complete for this config; skipping", c.output)
        return lineage.read_manifest(c.output)
    seed = c.calibration.seed if c.calibration.seed is not None else cfg.seed
    outputs.claim_run_dir(cfg.run_dir, c.output)
    parents = [p for p in (ExportDir(c.model).manifest, CuratedDir(c.data_dir).manifest) if storage.exists(p)]
    with tracking.stage_run(cfg, COMPRESS, dump_config(c), parents, c.output) as tracker:
        manifest = _compress(c, seed, parents, tracker.ref_dict())
        out = CompressDir(c.output)
        tracker.log_metrics(_comparison_metrics(manifest["comparison"]))
        tracker.finish_stage(manifest, "methods", c.output, [out.compare_json])
    log.info("compression done: %s -> %s", ", ".join(c.methods), c.output)
    return manifest


def _comparison_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The comparison table as MLflow metrics: `<method>.perplexity_ratio`, `<method>.bytes`, ..."""
    return tracking.numbers({row["method"]: {k: v for k, v in row.items() if k != "method"} for row in rows})


def _compress(
    c: CompressConfig, seed: int, parents: list[str], tracking: dict[str, str] | None = None
) -> dict[str, Any]:
    """One Ray task per method and one scoring the reference, into the staged output (distill: a Ray
    Train run logging its steps to the `tracking` MLflow run, then a task scoring it); returns the
    manifest."""
    import ray

    from raylm.compression import worker

    task = {"num_cpus": c.resources.num_cpus, "num_gpus": c.resources.num_gpus}
    with outputs.staged_output(c.output, COMPRESS) as staging:
        out = CompressDir(staging)
        reference = ray.remote(worker.reference).options(**task).remote(c)
        runs = {
            m: ray.remote(worker.compress).options(**task).remote(c, m, seed, out.method(m).root)
            for m in c.methods
            if m != DISTILL
        }
        if DISTILL in c.methods:  # Ray Train from the driver, as `raylm train`, while the tasks run
            done = distill.distill(c, seed, out.method(DISTILL).root, tracking)
            score = ray.remote(worker.score_student).options(**task)
            runs[DISTILL] = score.remote(c, out.method(DISTILL).root, done["seconds"])
        ref_row = ray.get(reference)
        results = {m: ray.get(ref) for m, ref in runs.items()}
        if DISTILL in c.methods:
            results[DISTILL]["details"] = done["details"]
        rows = comparison(ref_row, [results[m]["row"] for m in c.methods])
        storage.write_json(out.compare_json, {"rows": rows})
        print(table(rows), flush=True)
        manifest = lineage.write_manifest(
            staging,
            COMPRESS,
            dump_config(c),
            parents=parents,
            seed=seed,
            methods={m: {"path": m, **results[m]["details"]} for m in c.methods},
            comparison=rows,
            serving=serving_notes(c.methods),
        )
    return manifest


def serving_notes(methods: list[str]) -> dict[str, str]:
    """How each output serves (README: Compression), recorded so the manifest says it too."""
    notes = {}
    for m in methods:
        if m in QUANTIZED:
            notes[m] = (
                "serve.engine vllm (compressed-tensors, detected from config.json); transformers loads it"
            )
        elif m == DISTILL:
            notes[m] = "any engine (a dense HF model with fewer layers)"
        else:
            notes[m] = "any engine (a dense model with zeros); no sparse kernels on CPU"
    return notes
