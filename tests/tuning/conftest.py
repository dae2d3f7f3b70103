"""Fixtures of the tuning tests: a tiny base model and a curated folder (tests/training/conftest.py's
builder), and a recipe for a tiny sweep: a grid of 6 LoRA points on a 2-layer Llama, 12 steps a trial,
an evaluation every 4, ASHA halving at each evaluation."""

from __future__ import annotations

from typing import Any

import pytest

from raylm.core.config import PlatformConfig, build_config, deep_merge
from tests.training.conftest import build_curated


@pytest.fixture(scope="session")
def tune_data(tiny_tokenizer_dir, tmp_path_factory):
    return build_curated(
        tiny_tokenizer_dir, tmp_path_factory.mktemp("tune-curated"), train_rows=64, eval_rows=16
    )


def tiny_sweep(model: str, data_dir: str, root, **tune: Any) -> PlatformConfig:
    return build_config(sweep_recipe(model, data_dir, root, **tune))


def sweep_recipe(model: str, data_dir: str, root, **tune: Any) -> dict[str, Any]:
    base = {
        "model": model,
        "data_dir": data_dir,
        "output": str(root / "tune"),
        "trial": {
            "micro_batch_size": 4,
            "global_batch_size": 8,
            "max_steps": 12,
            "eval_every": 4,
            "eval_batches": 4,
            "log_every": 100,
            "schedule": {"warmup_steps": 1},
            "checkpoint": {"every_steps": 4},
        },
        "space": {
            "lr": {"choice": [1e-5, 3e-3, 3e-2]},
            "rank": {"choice": [4]},
            "alpha": {"tied": 2},
            "target_modules": {"choice": ["attention", "all"]},
        },
        "search": {"algorithm": "grid", "max_concurrent": 2},
        "scheduler": {"type": "asha", "reduction_factor": 2},
        "resources": {"cpus": 1},
    }
    if "space" in tune:  # a test's space replaces the default one rather than merging into it
        base.pop("space")
    return {
        "name": "sweep",
        "run_dir": str(root),
        "seed": 0,
        "stages": ["tune"],
        "tune": deep_merge(base, tune),
    }
