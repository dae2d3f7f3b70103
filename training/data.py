"""Token shards -> per-rank micro batches, in an order fixed by the seed and independent of worker count.

The sampler works on global sample positions: epoch e is a permutation of all rows seeded by (seed, e);
optimizer step s takes the global batch at positions [s*G, (s+1)*G) of that order (a partial batch at an
epoch's end is dropped), and rank r of W takes the r-th contiguous 1/W of it. The data position is thus
just the step count, so a resumed run neither repeats nor skips a sample, also on a different W.

Every worker reads the rows of its own batches straight from the shard files (core/artifacts.py
ShardIndex: raw token ids, found by offset), locally or from s3:// / gs:// through pyarrow's
filesystems, whatever launched it (Ray Train, torchrun, one process). Nothing holds a whole split: a
worker's memory for data is one step's rows plus the next step's, read ahead in a background thread.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from raylm.core import storage
from raylm.core.artifacts import CuratedDir, ShardIndex

# Open shard files kept per reader (a corpus may have thousands of shards; each open file is a handle).
MAX_OPEN_FILES = 64
# Concurrent ranged reads against an object store, where each read is a request with its own latency.
REMOTE_READ_THREADS = 8


class TokenShards:
    """The [rows, seq_len] token ids of one split, read on demand: `len()`, `.shape`, and numpy-style
    row indexing (`shards[row_indices]`, `shards[a:b]`, `shards[:1, :32]`) that reads only those rows
    and returns int32. `prefetch(rows)` starts reading rows that a later `shards[rows]` takes."""

    def __init__(self, folder: str, index: ShardIndex):
        self.folder, self.seq_len = folder, index.seq_len
        self._files = [storage.join(folder, s["file"]) for s in index.shards]
        self._dtypes = [np.dtype(s["dtype"]).newbyteorder("<") for s in index.shards]
        self._starts = np.cumsum([0] + [int(s["rows"]) for s in index.shards])
        self._remote = storage.is_remote(folder)
        self._open: OrderedDict[int, object] = OrderedDict()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None  # the prefetch thread
        self._remote_pool: ThreadPoolExecutor | None = None
        self._pending: tuple[np.ndarray, Future] | None = None
        self.wait_s = 0.0  # time the caller spent waiting for rows (reads, or a prefetch not yet done)

    @classmethod
    def open(cls, data_dir: str, split: str) -> TokenShards | None:
        """The split's shards, or None when it has none (InputError for a folder of the old format)."""
        curated = CuratedDir(data_dir)
        index = curated.shard_index(split)
        return cls(curated.shards, index) if index and index.rows else None

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.seq_len

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):  # rows first, then the rest on the (small) result
            return self[key[0]][(slice(None), *key[1:])]
        if isinstance(key, (int, np.integer)):
            return self[np.array([key + len(self) if key < 0 else key])][0]
        if isinstance(key, slice):  # a range, not np.arange(len(self)): that would be 8 bytes a row
            r = range(len(self))[key]
            key = np.arange(r.start, r.stop, r.step)
        rows = np.asarray(key, dtype=np.int64)
        t0 = time.perf_counter()
        pending = self._pending
        if pending is not None and np.array_equal(pending[0], rows):
            self._pending = None
            out = pending[1].result()
        else:  # not what was read ahead (an evaluation, say): read now, keep the prefetch
            out = self._read(rows)
        self.wait_s += time.perf_counter() - t0
        return out

    def prefetch(self, rows: np.ndarray) -> None:
        """Read `rows` in the background; the next `self[rows]` with the same rows takes them."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="raylm-prefetch")
        rows = np.array(rows, dtype=np.int64)
        self._pending = (rows, self._pool.submit(self._read, rows))

    def close(self) -> None:
        for pool in (self._pool, self._remote_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._pool = self._remote_pool = self._pending = None
        with self._lock:
            self._open.clear()

    def _read(self, rows: np.ndarray) -> np.ndarray:
        """rows [n] -> int32 [n, seq_len], with one ranged read per run of consecutive rows of a shard."""
        out = np.empty((len(rows), self.seq_len), np.int32)
        if len(rows) == 0:
            return out
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError(f"rows {rows.min()}..{rows.max()} out of range for {len(self)} rows")
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        shard = np.searchsorted(self._starts, ordered, side="right") - 1
        breaks = np.flatnonzero((np.diff(ordered) != 1) | (np.diff(shard) != 0)) + 1
        runs = np.split(np.arange(len(rows)), breaks)

        def read_run(run: np.ndarray) -> None:
            s, n = int(shard[run[0]]), len(run)
            dtype = self._dtypes[s]
            width = self.seq_len * dtype.itemsize
            first = int(ordered[run[0]] - self._starts[s])
            data = self._file(s).read_at(n * width, first * width)
            out[order[run]] = np.frombuffer(data, dtype).reshape(n, self.seq_len)

        if self._remote and len(runs) > 1:  # object stores: requests in flight together
            if self._remote_pool is None:
                self._remote_pool = ThreadPoolExecutor(REMOTE_READ_THREADS, thread_name_prefix="raylm-read")
            list(self._remote_pool.map(read_run, runs))
        else:  # local files: a read is a pread, cheaper than handing it to a thread
            for run in runs:
                read_run(run)
        return out

    def _file(self, s: int):
        """Shard s opened for ranged reads (kept open, the least recently used dropped beyond
        MAX_OPEN_FILES; a dropped file closes once no read holds it)."""
        with self._lock:
            f = self._open.pop(s, None)
            if f is None:
                fs, path = storage.filesystem(self._files[s])
                f = fs.open_input_file(path)
                expected = (self._starts[s + 1] - self._starts[s]) * self.seq_len * self._dtypes[s].itemsize
                if f.size() != expected:
                    raise ValueError(f"{self._files[s]} has {f.size()} bytes, its index says {expected}")
            self._open[s] = f
            while len(self._open) > MAX_OPEN_FILES:
                self._open.popitem(last=False)
            return f


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
            self._perm = self.permutation(self.seed, self._epoch, self.num_rows)
        return self._perm[pos["offset"] : pos["offset"] + self.global_batch]

    @staticmethod
    def permutation(seed: int, epoch: int, num_rows: int) -> np.ndarray:
        """Generator.permutation(num_rows), shuffled in place in int32 where the rows fit: the same
        order at half the memory (4 bytes a row, the one per-worker cost that grows with the corpus)."""
        rng = np.random.default_rng([seed, epoch])
        order = np.arange(num_rows, dtype=np.int32 if num_rows < 2**31 else np.int64)
        rng.shuffle(order)
        return order

    def digest(self, step: int) -> str:
        """A short fingerprint of the set of samples in step's global batch (to compare runs' data)."""
        rows = np.sort(self.global_batch_rows(step)).astype(np.int64)
        return hashlib.blake2b(rows.tobytes(), digest_size=8).hexdigest()

    def rank_rows(self, step: int, rank: int, world: int) -> np.ndarray:
        rows = self.global_batch_rows(step)
        per = self.global_batch // world
        return rows[rank * per : (rank + 1) * per]
