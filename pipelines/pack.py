"""Pack tokenized documents into fixed-length training sequences, deterministically.

Each document goes to a pack bucket chosen by a hash of its id; within a bucket, documents (already
ending in the eos separator) are concatenated per split in id order and cut into rows of exactly
`seq_len` tokens. The same documents therefore give the same sequences whatever the block layout or
worker count. Each bucket's last partial row is dropped: with thousands of documents per bucket that
is well under 1% of tokens, and the manifest reports the exact count.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raylm.core.artifacts import SPLITS

HASH_RANGE = 2**32  # xxh32 of the id, the one hash every split decision reads
# The splits in the order their shares follow each other along the hash range (see split_bounds).
SPLITS_BY_HASH = ("eval", "finetune_eval", "finetune", "train")

DOCS_PER_BUCKET = 4096


def num_buckets(n_docs: int) -> int:
    return max(1, -(-n_docs // DOCS_PER_BUCKET))


def add_bucket(batch: pa.Table, buckets: int) -> pa.Table:
    import xxhash

    ids = batch.column("id").to_pylist()
    return batch.append_column(
        "bucket", pa.array([xxhash.xxh64_intdigest(i.encode()) % buckets for i in ids], pa.int64())
    )


def split_bounds(eval_fraction: float, finetune_fraction: float, finetune_eval_fraction: float) -> list[int]:
    """Where each split's share of the hash range ends: [0, a) eval, [a, b) finetune_eval,
    [b, c) finetune, [c, 2**32) train. The held-apart region [a, c) directly follows eval, so with
    finetune_fraction 0 the eval cut-off and every other document's split are what they always were."""
    eval_end = int(eval_fraction * HASH_RANGE)
    held_end = eval_end + int(finetune_fraction * HASH_RANGE)
    finetune_eval_end = eval_end + int(finetune_fraction * finetune_eval_fraction * HASH_RANGE)
    return [eval_end, min(finetune_eval_end, held_end), held_end]


def assign_split(
    ids: pa.ChunkedArray | pa.Array,
    eval_fraction: float,
    finetune_fraction: float = 0.0,
    finetune_eval_fraction: float = 0.1,
) -> pa.Array:
    """Each id's split, chosen by where a hash of the id falls in the hash range (see split_bounds):
    stable across runs, machines and block layouts, and independent of the other documents."""
    import xxhash

    hashes = np.fromiter(
        (xxhash.xxh32_intdigest(i.encode("utf-8")) for i in ids.to_pylist()), np.int64, count=len(ids)
    )
    bounds = split_bounds(eval_fraction, finetune_fraction, finetune_eval_fraction)
    # side="right": a hash equal to a bound belongs to the region that starts there (h < bound is inside).
    region = np.searchsorted(np.asarray(bounds, np.int64), hashes, side="right")
    return pc.take(pa.array(SPLITS_BY_HASH, pa.string()), pa.array(region))


def pack_rows(token_lists: list[np.ndarray], seq_len: int) -> np.ndarray:
    if not token_lists:
        return np.zeros((0, seq_len), dtype=np.int32)
    flat = np.concatenate(token_lists)
    n = len(flat) // seq_len
    return flat[: n * seq_len].reshape(n, seq_len)


def pack_group(batch: pa.Table, seq_len: int) -> pa.Table:
    """Ray Data group stage: one bucket's (id, split, input_ids per document) -> rows of
    (split, bucket, seq_index, input_ids of length seq_len); (bucket, seq_index) orders them globally."""
    batch = batch.sort_by("id")
    out_split, out_rows = [], []
    for split in SPLITS:
        part = batch.filter(pc.equal(batch.column("split"), split))
        docs = [
            np.asarray(x, dtype=np.int32) for x in part.column("input_ids").to_numpy(zero_copy_only=False)
        ]
        rows = pack_rows(docs, seq_len)
        out_split += [split] * len(rows)
        out_rows.append(rows)
    rows = np.concatenate(out_rows)
    bucket = batch.column("bucket")[0].as_py() if "bucket" in batch.column_names and batch.num_rows else 0
    flat = pa.array(rows.reshape(-1), pa.int32())
    return pa.table(
        {
            "split": pa.array(out_split, pa.string()),
            "bucket": pa.array([bucket] * len(rows), pa.int64()),
            "seq_index": pa.array(np.arange(len(rows)), pa.int64()),
            "input_ids": pa.FixedSizeListArray.from_arrays(flat, seq_len).cast(pa.list_(pa.int32())),
        }
    )
