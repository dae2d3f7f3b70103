"""Writing curated outputs: balanced, predictably named token shards, and single-file parquet tables.

A split's token shards are `<split>-00000.bin ...`: raw little-endian token ids, row-major
[rows, seq_len], uint16 when the ids fit, uint32 otherwise; `<split>.index.json` (core/artifacts.py
ShardIndex) gives each shard's rows and dtype, so a reader finds any row without reading token data.
Ray Data writes the shards from its own tasks (TokenShardSink), never through the driver.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
from ray.data.datasource import Datasink

from raylm.core import storage
from raylm.core.artifacts import CuratedDir, ShardIndex, token_dtype


def token_matrix(table: pa.Table) -> np.ndarray:
    """The `input_ids` column of a block of packed rows as a [rows, seq_len] integer matrix."""
    col = table.column("input_ids").combine_chunks()
    lengths = col.value_lengths().to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        raise ValueError(
            f"rows of input_ids have different lengths ({lengths.min()}..{lengths.max()}); "
            "token shards hold packed sequences of exactly seq_len tokens"
        )
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(lengths), -1 if len(lengths) else 0)


def write_token_file(path: str, rows: np.ndarray, dtype: str | None = None) -> dict[str, Any]:
    """One shard file: `rows` [n, seq_len] as raw little-endian ids of `dtype` (default: the narrowest
    that holds them). Returns what the index records of it (file name, rows, seq_len, dtype)."""
    if rows.ndim != 2 or len(rows) == 0:
        raise ValueError(f"a token shard holds a non-empty [rows, seq_len] matrix, got shape {rows.shape}")
    if rows.min() < 0:
        raise ValueError("token ids must not be negative")
    dtype = dtype or token_dtype(int(rows.max()))
    if rows.max() > np.iinfo(dtype).max:
        raise ValueError(f"token id {int(rows.max())} does not fit in {dtype}")
    data = np.ascontiguousarray(rows, dtype=np.dtype(dtype).newbyteorder("<"))
    fs, p = storage.filesystem(path)
    with fs.open_output_stream(p) as f:
        f.write(memoryview(data).cast("B"))
    return {"file": path.rsplit("/", 1)[-1], "rows": len(rows), "seq_len": rows.shape[1], "dtype": dtype}


def write_index(folder: str, split: str, written: list[dict[str, Any]]) -> None:
    """<folder>/<split>.index.json for the shards in `written` (in row order); written last, atomically,
    so a reader never finds an index naming a shard that is not complete."""
    seq_lens = {w["seq_len"] for w in written}
    if len(seq_lens) != 1:
        raise ValueError(f"{split} shards have different row lengths {sorted(seq_lens)}")
    shards = [{"file": w["file"], "rows": w["rows"], "dtype": w["dtype"]} for w in written]
    index = ShardIndex(seq_lens.pop(), shards)
    storage.write_json(storage.join(folder, CuratedDir.index_name(split)), index.to_json())


class TokenShardSink(Datasink):
    """Ray Data sink: each write task writes its block(s) as one shard file <tmp>/<task index>.bin and
    returns the file's index entry; the driver sees only those entries (write_returns)."""

    def __init__(self, tmp_dir: str, dtype: str | None):
        self.tmp_dir, self.dtype = tmp_dir, dtype
        self.written: list[dict[str, Any]] = []

    def on_write_start(self, schema=None) -> None:
        fs, path = storage.filesystem(self.tmp_dir)
        fs.create_dir(path, recursive=True)

    def write(self, blocks, ctx) -> dict[str, Any] | None:
        from ray.data.block import BlockAccessor

        parts = [token_matrix(BlockAccessor.for_block(b).to_arrow()) for b in blocks]
        parts = [p for p in parts if len(p)]
        if not parts:
            return None
        path = storage.join(self.tmp_dir, f"{ctx.task_idx:06d}.bin")
        return {"task": ctx.task_idx, **write_token_file(path, np.concatenate(parts), self.dtype)}

    def on_write_complete(self, write_result) -> None:
        self.written = sorted((w for w in write_result.write_returns if w), key=lambda w: w["task"])


def write_shards(
    ds, folder: str, prefix: str, rows_per_shard: int, vocab_size: int | None = None
) -> list[dict]:
    """Write `ds` (an `input_ids` column of packed rows) as <folder>/<prefix>-00000.bin ... and
    <prefix>.index.json; shards hold equal row counts (within one row), in the dataset's order.

    Token ids are stored as uint16 when `vocab_size` fits (< 65536), uint32 otherwise; without a
    vocab_size each shard takes the narrowest dtype that holds its own ids. Returns
    [{"file": name, "rows": n}, ...]. An empty dataset writes no shard and no index.
    """
    rows = ds.count()
    if rows == 0:
        return []
    n_shards = math.ceil(rows / rows_per_shard)
    tmp = storage.join(folder, f"_tmp_{prefix}")
    sink = TokenShardSink(tmp, token_dtype(vocab_size - 1) if vocab_size else None)
    # Split-based repartition (no shuffle) gives exactly n_shards blocks of near-equal size, in order;
    # write task i gets block i (Ray numbers a write's tasks in the order of their input blocks).
    ds.repartition(n_shards, shuffle=False).write_datasink(sink)
    if len(sink.written) != n_shards or sum(w["rows"] for w in sink.written) != rows:
        raise RuntimeError(
            f"expected {n_shards} shards of {rows} rows in all in {tmp}, got "
            f"{[(w['file'], w['rows']) for w in sink.written]}"
        )
    names = [CuratedDir.shard_name(prefix, i) for i in range(n_shards)]
    _move_written(tmp, [storage.join(tmp, w["file"]) for w in sink.written], names, folder)
    for w, name in zip(sink.written, names):
        w["file"] = name
    write_index(folder, prefix, sink.written)
    return [{"file": w["file"], "rows": w["rows"]} for w in sink.written]


def write_token_split(
    folder: str,
    split: str,
    rows: np.ndarray,
    rows_per_shard: int | None = None,
    vocab_size: int | None = None,
) -> list[dict]:
    """Write an in-memory [rows, seq_len] array as one split's token shards + index, balanced as
    write_shards balances them: for tests, benchmarks and tools that build a curated folder by hand."""
    rows = np.asarray(rows)
    if len(rows) == 0:
        return []
    n_shards = math.ceil(len(rows) / (rows_per_shard or len(rows)))
    dtype = token_dtype(vocab_size - 1) if vocab_size else None
    storage.filesystem(folder)[0].create_dir(storage.filesystem(folder)[1], recursive=True)
    written = [
        write_token_file(storage.join(folder, CuratedDir.shard_name(split, i)), part, dtype)
        for i, part in enumerate(np.array_split(rows, n_shards))
    ]
    write_index(folder, split, written)
    return [{"file": w["file"], "rows": w["rows"]} for w in written]


def _move_written(tmp_dir: str, sources: list[str], final_names: list[str], folder: str) -> None:
    """Move the files a write left in tmp_dir to <folder>/<final name>, in order, then drop tmp_dir."""
    if len(sources) != len(final_names):
        raise RuntimeError(f"expected {len(final_names)} files in {tmp_dir}, found {len(sources)}")
    fs, _ = storage.filesystem(folder)
    for src, name in zip(sources, final_names):
        fs.move(storage.filesystem(src)[1], storage.filesystem(storage.join(folder, name))[1])
    storage.remove(tmp_dir)


def write_table(ds, folder: str, name: str) -> int:
    """Write a whole dataset as the single file <folder>/<name> (for tables the contract names as one file)."""
    tmp = f"{folder.rstrip('/')}/_tmp_{name}"
    ds.repartition(1, shuffle=False).write_parquet(tmp, min_rows_per_file=1)
    _move_written(tmp, storage.list_files(tmp, ".parquet"), [name], folder)
    return ds.count()
