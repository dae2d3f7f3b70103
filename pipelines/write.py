"""Writing curated outputs: balanced, predictably named parquet shards and single-file tables."""

from __future__ import annotations

import math

import pyarrow.parquet as pq

from raylm.core import storage
from raylm.core.artifacts import CuratedDir


def _move_written(tmp_dir: str, final_names: list[str], folder: str) -> list[str]:
    fs, _ = storage.filesystem(folder)
    written = storage.list_files(tmp_dir, ".parquet")
    if len(written) != len(final_names):
        raise RuntimeError(f"expected {len(final_names)} parquet files in {tmp_dir}, found {len(written)}")
    paths = []
    for src, name in zip(written, final_names):
        dst = f"{folder.rstrip('/')}/{name}"
        fs.move(storage.filesystem(src)[1], storage.filesystem(dst)[1])
        paths.append(dst)
    storage.remove(tmp_dir)
    return paths


def write_shards(ds, folder: str, prefix: str, rows_per_shard: int) -> list[dict]:
    """Write `ds` as <folder>/<prefix>-00000.parquet ...; shards hold equal row counts (within one row).

    Returns [{"file": name, "rows": n}, ...]. An empty dataset writes no shard.
    """
    rows = ds.count()
    if rows == 0:
        return []
    n_shards = math.ceil(rows / rows_per_shard)
    tmp = f"{folder.rstrip('/')}/_tmp_{prefix}"
    # Split-based repartition (no shuffle) gives exactly n_shards blocks of near-equal size, one file each.
    ds.repartition(n_shards, shuffle=False).write_parquet(tmp, min_rows_per_file=1)
    names = [CuratedDir.shard_name(prefix, i) for i in range(n_shards)]
    paths = _move_written(tmp, names, folder)
    return [{"file": name, "rows": _num_rows(p)} for name, p in zip(names, paths)]


def _num_rows(path: str) -> int:
    fs, p = storage.filesystem(path)
    with fs.open_input_file(p) as f:
        return pq.ParquetFile(f).metadata.num_rows


def write_table(ds, folder: str, name: str) -> int:
    """Write a whole dataset as the single file <folder>/<name> (for tables the contract names as one file)."""
    tmp = f"{folder.rstrip('/')}/_tmp_{name}"
    ds.repartition(1, shuffle=False).write_parquet(tmp, min_rows_per_file=1)
    _move_written(tmp, [name], folder)
    return ds.count()
