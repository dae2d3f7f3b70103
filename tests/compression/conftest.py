"""Fixtures of the compression tests: a tiny curated folder (tests/training/conftest.py's builder) and a
tiny Llama with 32-wide heads (vLLM's CPU kernels take it) trained on it for a few hundred steps, so its
weights carry structure that quantization can damage (a random-init model scores the same either way)."""

from __future__ import annotations

from typing import Any

import pytest

from raylm.core import lineage
from raylm.core.artifacts import EXPORT_MODEL, CuratedDir
from raylm.core.config import PlatformConfig, build_config
from tests.conftest import build_tiny_llama
from tests.training.conftest import build_curated

METHODS = ["gptq_w4a16", "w8a8", "sparse_2of4", "sparse_unstructured"]
TRAIN_STEPS = 100  # eval perplexity is near its lowest here; more steps overfit the 192 rows


def train_briefly(model_dir: str, data_dir: str, steps: int = TRAIN_STEPS) -> None:
    """Fit the model to the curated train rows with plain AdamW and save it back in place."""
    import torch
    from transformers import AutoModelForCausalLM

    from raylm.training.data import TokenShards

    rows = torch.from_numpy(TokenShards.open(data_dir, "train")[:]).long()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        batch = rows[torch.randint(len(rows), (16,))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.save_pretrained(model_dir, safe_serialization=True)


@pytest.fixture(scope="session")
def compress_data(tiny_tokenizer_dir, tmp_path_factory) -> str:
    return build_curated(
        tiny_tokenizer_dir, tmp_path_factory.mktemp("compress-curated"), train_rows=192, eval_rows=32
    )


@pytest.fixture(scope="session")
def trained_model(tiny_tokenizer_dir, compress_data, tmp_path_factory) -> str:
    """The head-32 tiny Llama (hidden 64, 2 layers), trained briefly, with an export manifest."""
    out = build_tiny_llama(
        tiny_tokenizer_dir,
        tmp_path_factory.mktemp("compress-model"),
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    train_briefly(out, compress_data)
    lineage.write_manifest(out, EXPORT_MODEL, {}, parents=[CuratedDir(compress_data).manifest])
    return out


def compress_recipe(model: str, data_dir: str, root, **compress: Any) -> dict[str, Any]:
    section = {
        "model": model,
        "data_dir": data_dir,
        "output": str(root / "compress"),
        "calibration": {"num_samples": 32},
        "gptq": {"group_size": 32},  # divides the tiny model's 64 and 128
        "eval": {"max_rows": 32},
        **compress,
    }
    return {"name": "c", "run_dir": str(root), "seed": 0, "stages": ["compress"], "compress": section}


def compress_config(model: str, data_dir: str, root, **compress: Any) -> PlatformConfig:
    return build_config(compress_recipe(model, data_dir, root, **compress))


@pytest.fixture(scope="session")
def compressed(ray_cluster, trained_model, compress_data, tmp_path_factory):
    """The stage run once on the trained tiny model with every method (unstructured at 0.75)."""
    from raylm.compression.run import run

    root = tmp_path_factory.mktemp("compress-run")
    cfg = compress_config(trained_model, compress_data, root, methods=METHODS, prune={"sparsity": 0.75})
    manifest = run(cfg)
    return cfg, manifest
