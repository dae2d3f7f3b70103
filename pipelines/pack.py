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

SPLITS = ("train", "eval")


DOCS_PER_BUCKET = 4096


def num_buckets(n_docs: int) -> int:
    return max(1, -(-n_docs // DOCS_PER_BUCKET))


def add_bucket(batch: pa.Table, buckets: int) -> pa.Table:
    import xxhash

    ids = batch.column("id").to_pylist()
    return batch.append_column(
        "bucket", pa.array([xxhash.xxh64_intdigest(i.encode()) % buckets for i in ids], pa.int64())
    )


def eval_split(ids: pa.ChunkedArray | pa.Array, eval_fraction: float) -> pa.Array:
    """'eval' for a stable pseudo-random fraction of ids (by a hash of the id), else 'train'."""
    import xxhash

    cutoff = int(eval_fraction * 2**32)
    return pa.array(
        ["eval" if xxhash.xxh32_intdigest(i.encode("utf-8")) < cutoff else "train" for i in ids.to_pylist()],
        pa.string(),
    )


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
