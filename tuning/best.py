"""What a sweep hands on: best_config.yaml (a recipe that trains the best trial again), best_adapter/
(or best_model/ for a full fine-tune sweep) and adapters/NN-<trial_id>/, the best keep_adapters
adapters, best first, which `raylm serve` serves by folder name (serve.adapters.dirs).
"""

from __future__ import annotations

from typing import Any

import yaml

from raylm.core import outputs, storage
from raylm.core.artifacts import EXPORT_ADAPTER, EXPORT_MODEL, ExportDir, TuneDir
from raylm.core.config import PlatformConfig
from raylm.tuning.report import TrialRow
from raylm.tuning.trainable import TrialSetup


def best_recipe(cfg: PlatformConfig, row: TrialRow, seed: int) -> str:
    """A runnable recipe (`raylm train best_config.yaml`) with the best trial's training config: the
    same base model, data, point, seed and steps. Its outputs go to runs/<name>-best by default."""
    train = {k: v for k, v in row.train.items() if k not in ("output", "target_set")}
    train["checkpoint"] = {
        k: v for k, v in train["checkpoint"].items() if k not in ("storage_path", "resume_from")
    }
    recipe = {"name": f"{cfg.name}-best", "seed": seed, "stages": ["train"], "train": train}
    header = (
        f"# The best trial of sweep {cfg.name}: {row.trial_id}, eval_loss {row.eval_loss:.4f} at step "
        f"{row.steps} ({row.point()}).\n# Train it again: raylm train best_config.yaml\n"
    )
    return header + yaml.safe_dump(recipe, sort_keys=False)


def copy_export(src: ExportDir, dst: str, kind: str) -> None:
    """A trial's export into dst, replacing a previous sweep's copy (raylm's own output only)."""
    with outputs.staged_output(dst, kind) as staging:
        storage.copy_tree(src.root, staging)


def publish_best(cfg: PlatformConfig, best: list[TrialRow], setup: TrialSetup) -> dict[str, Any]:
    t = cfg.tune
    out = TuneDir(t.output)
    lora = t.trial.lora.enabled
    kind = EXPORT_ADAPTER if lora else EXPORT_MODEL
    exports = [out.trial(row.trial_id).export for row in best]
    best_dir = out.best_adapter.root if lora else storage.join(t.output, "best_model")
    copy_export(exports[0], best_dir, kind)
    adapters = []
    if lora:
        for rank, (row, export) in enumerate(zip(best[: t.keep_adapters], exports, strict=False), start=1):
            dst = storage.join(out.adapters, f"{rank:02d}-{row.trial_id}")
            copy_export(export, dst, kind)
            adapters.append(dst)
    storage.write_text(out.best_config, best_recipe(cfg, best[0], setup.seed))
    return {"best": best_dir, "adapters": adapters, "best_config": out.best_config}
