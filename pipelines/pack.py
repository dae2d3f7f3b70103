"""Pack tokenized documents into fixed-length training sequences.

Documents (already ending in the eos separator) are concatenated per split in id order and cut into
rows of exactly `seq_len` tokens. A batch's last partial row is dropped; with batches of thousands of
documents that loses well under 1% of tokens, and the manifest reports the exact count.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SPLITS = ("train", "eval")


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


class Pack:
    """Ray Data stage: (id, split, input_ids per document) -> (split, input_ids of length seq_len)."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch = batch.sort_by("id")
        out_split, out_rows = [], []
        for split in SPLITS:
            part = batch.filter(pc.equal(batch.column("split"), split))
            docs = [
                np.asarray(x, dtype=np.int32) for x in part.column("input_ids").to_numpy(zero_copy_only=False)
            ]
            rows = pack_rows(docs, self.seq_len)
            out_split += [split] * len(rows)
            out_rows.append(rows)
        rows = np.concatenate(out_rows) if out_rows else np.zeros((0, self.seq_len), np.int32)
        flat = pa.array(rows.reshape(-1), pa.int32())
        return pa.table(
            {
                "split": pa.array(out_split, pa.string()),
                "input_ids": pa.FixedSizeListArray.from_arrays(flat, self.seq_len).cast(pa.list_(pa.int32())),
            }
        )
