"""Token shards -> per-rank micro batches, in an order fixed by the seed and independent of worker count.

The sampler works on global sample positions: epoch e is a permutation of all rows seeded by (seed, e);
optimizer step s takes the global batch at positions [s*G, (s+1)*G) of that order (a partial batch at an
epoch's end is dropped), and rank r of W takes the r-th contiguous 1/W of it. The data position is thus
just the step count, so a resumed run neither repeats nor skips a sample, also on a different W.

Rows arrive through Ray Data (`ray.train.get_dataset_shard`, unsplit, order preserved) under Ray Train,
or straight from the parquet files under torchrun; both give the same array, so both runs see the same
batches. Each worker holds the token array of its split (int32: 4 bytes per token).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow.parquet as pq

from raylm.core import storage
from raylm.core.artifacts import CuratedDir


def shard_files(data_dir: str, split: str) -> list[str]:
    return CuratedDir(data_dir).shard_files(split)


def tokens_from_files(files: list[str]) -> np.ndarray:
    """[rows, seq_len] int32 from parquet shards, in file then row order."""
    parts = []
    for f in files:
        fs, path = storage.filesystem(f)
        col = pq.read_table(path, columns=["input_ids"], filesystem=fs).column("input_ids").combine_chunks()
        parts.append(_to_matrix(col))
    if not parts:
        raise ValueError("no shards")
    return np.concatenate(parts)


def tokens_from_ray(iterator) -> np.ndarray:
    """[rows, seq_len] int32 from a Ray Data iterator over the same shards (order preserved)."""
    parts = [
        np.asarray(
            np.stack(list(b["input_ids"])) if b["input_ids"].dtype == object else b["input_ids"],
            dtype=np.int32,
        )
        for b in iterator.iter_batches(batch_size=4096, batch_format="numpy", prefetch_batches=1)
    ]
    return np.concatenate(parts)


def _to_matrix(col) -> np.ndarray:
    lengths = col.value_lengths().to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        raise ValueError(
            f"rows of input_ids have different lengths ({lengths.min()}..{lengths.max()}); "
            "shards must hold packed sequences of exactly seq_len tokens"
        )
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    return flat.reshape(len(lengths), -1)


class GlobalSampler:
    """Row indices of each optimizer step's global batch, and of one rank's share of it."""

    def __init__(self, num_rows: int, global_batch: int, seed: int):
        if num_rows < global_batch:
            raise ValueError(
                f"the train split has {num_rows} sequences, fewer than global_batch_size ({global_batch})"
            )
        self.num_rows, self.global_batch, self.seed = num_rows, global_batch, seed
        self.steps_per_epoch = num_rows // global_batch
        self._epoch, self._perm = -1, None

    def position(self, step: int) -> dict[str, int]:
        """Where step `step` (0-based) reads: epoch and offset into that epoch's order."""
        return {
            "epoch": step // self.steps_per_epoch,
            "offset": (step % self.steps_per_epoch) * self.global_batch,
        }

    def global_batch_rows(self, step: int) -> np.ndarray:
        pos = self.position(step)
        if pos["epoch"] != self._epoch:
            self._epoch = pos["epoch"]
            self._perm = np.random.default_rng([self.seed, self._epoch]).permutation(self.num_rows)
        return self._perm[pos["offset"] : pos["offset"] + self.global_batch]

    def digest(self, step: int) -> str:
        """A short fingerprint of the set of samples in step's global batch (to compare runs' data)."""
        rows = np.sort(self.global_batch_rows(step)).astype(np.int64)
        return hashlib.blake2b(rows.tobytes(), digest_size=8).hexdigest()

    def rank_rows(self, step: int, rank: int, world: int) -> np.ndarray:
        rows = self.global_batch_rows(step)
        per = self.global_batch // world
        return rows[rank * per : (rank + 1) * per]
