"""Exact deduplication: documents whose normalized text is byte-identical form a group; the one with
the smallest id survives (a rule that does not depend on block layout or worker count).

Only (id, text hash) rows travel, never the text, and without a Ray Data shuffle (whose start-up was
most of this stage's time on small corpora): one Ray task per block hashes the texts and splits the rows
by hash into P parts, and one task per part lists the duplicates among its rows. Duplicates come back as
a pa.Table when they are few (up to BROADCAST_LIMIT, the usual case), else as a dataset.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
import xxhash

from raylm.pipelines.unique_ids import BROADCAST_LIMIT

DUPLICATES = pa.schema([("id", pa.string()), ("keep_id", pa.string())])


def text_hashes(texts: list[str]) -> tuple[pa.Array, np.ndarray]:
    """128-bit xxh3 of each text (collisions are negligible: ~1e-20 for a billion documents), as 16-byte
    values, and its low 64 bits for partitioning."""
    digests = [xxhash.xxh3_128_intdigest(t.encode("utf-8")) for t in texts]
    low = np.fromiter((d & 0xFFFFFFFFFFFFFFFF for d in digests), dtype=np.uint64, count=len(digests))
    return pa.array([d.to_bytes(16, "little") for d in digests], pa.binary(16)), low


def mark_group(group: pa.Table) -> pa.Table:
    """Rows (id, text_hash) -> (id, keep_id) for each duplicate, keep_id being the smallest id with the
    same text (the kept document itself is not listed); sorted by id."""
    if group.num_rows == 0:
        return DUPLICATES.empty_table()
    keep = group.group_by("text_hash").aggregate([("id", "min"), ("id", "count")])
    keep = keep.filter(pc.greater(keep.column("id_count"), 1)).select(["text_hash", "id_min"])
    rows = group.select(["id", "text_hash"]).join(keep.rename_columns(["text_hash", "keep_id"]), "text_hash")
    rows = rows.filter(pc.not_equal(rows.column("id"), rows.column("keep_id")))
    return rows.select(["id", "keep_id"]).cast(DUPLICATES).sort_by("id")


@ray.remote
def _split_block(block: pa.Table, num_partitions: int) -> tuple | pa.Table:
    """One block of documents -> P tables of (id, text_hash), split by hash."""
    hashes, low = text_hashes(block.column("text").to_pylist())
    rows = pa.table({"id": block.column("id").combine_chunks().cast(pa.string()), "text_hash": hashes})
    part = low % np.uint64(num_partitions)
    parts = [rows.filter(pa.array(part == p)) for p in range(num_partitions)]
    return parts[0] if num_partitions == 1 else tuple(parts)


@ray.remote(num_returns=2)
def _duplicates_in(*parts: pa.Table) -> tuple[pa.Table, int]:
    """Every row of some hashes -> their duplicates, and how many there are."""
    found = mark_group(pa.concat_tables(parts))
    return found, found.num_rows


def exact_duplicates(docs, num_partitions: int):
    """docs (id, text, ...) -> (id, keep_id) for every exact duplicate: a pa.Table when there are few,
    else a dataset. Rows not listed survive."""
    P = num_partitions
    split = [
        _split_block.options(num_returns=P).remote(block, P)
        for bundle in docs.select_columns(["id", "text"]).iter_internal_ref_bundles()
        for block in bundle.block_refs
    ]
    split = [s if isinstance(s, list) else [s] for s in split]
    if not split:
        return DUPLICATES.empty_table()
    found = [_duplicates_in.remote(*[s[p] for s in split]) for p in range(P)]
    del split
    if sum(ray.get([n for _, n in found])) <= BROADCAST_LIMIT:
        return pa.concat_tables(ray.get([t for t, _ in found])).sort_by("id")
    return ray.data.from_arrow_refs([t for t, _ in found])


def collect(ds) -> pa.Table | None:
    """A small dataset as one table on the driver (callers bound its size first); None when empty."""
    tables = list(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    return pa.concat_tables(tables) if tables else None
