"""Calibration samples from the curated token shards, and held-out perplexity.

Both read rows straight from the shard files (training/data.py's TokenShards), so nothing loads a split
whole: calibration draws num_samples rows by a seeded choice, perplexity scores the first max_rows rows
of the held-out split, the same rows for every method.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from raylm.compression.config import CalibrationConfig, EvalConfig
from raylm.core.errors import InputError
from raylm.training.data import TokenShards


def open_split(data_dir: str, split: str, key: str) -> TokenShards:
    shards = TokenShards.open(data_dir, split)
    if shards is None:
        raise InputError(f"{key}: {data_dir} has no {split} shards")
    return shards


def calibration_batches(data_dir: str, cal: CalibrationConfig, seed: int) -> list[torch.Tensor]:
    """num_samples rows (all of them when the split is smaller), first seq_len tokens, in batches."""
    shards = open_split(data_dir, cal.split, "compress.calibration.split")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(shards), size=min(cal.num_samples, len(shards)), replace=False))
    ids = torch.from_numpy(shards[rows][:, : cal.seq_len or shards.seq_len]).long()
    return list(ids.split(cal.batch_size))


def eval_batches(data_dir: str, ev: EvalConfig) -> list[torch.Tensor]:
    shards = open_split(data_dir, ev.split, "compress.eval.split")
    ids = torch.from_numpy(shards[: min(ev.max_rows, len(shards))]).long()
    return list(ids.split(ev.batch_size))


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """exp of the mean next-token negative log-likelihood over every predicted token of the batches."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids in batches:
        ids = ids.to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += ids[:, 1:].numel()
    return math.exp(total / count)
