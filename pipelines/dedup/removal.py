"""Taking duplicates out of the documents, and the cluster table of every document that reached dedup.

Duplicates are named by id. When there are few (up to BROADCAST_LIMIT, the usual case) their ids go to
every task and each block drops them by a lookup, so the documents are never shuffled; beyond that an
anti-join on id does the same work with a shuffle.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from raylm.pipelines.dedup.exact import collect
from raylm.pipelines.dedup.near import OUTPUT_SCHEMA
from raylm.pipelines.unique_ids import BROADCAST_LIMIT

IDS = pa.schema([("id", pa.string())])


def _drop_ids(t: pa.Table, ids: pa.Array) -> pa.Table:
    return t.filter(pc.invert(pc.is_in(t.column("id"), value_set=ids)))


def _small_strings(t: pa.Table) -> pa.Table:
    """Ray Data's joins hand back large strings; the documents keep the reader's string columns."""
    fields = [f.with_type(pa.string()) if f.type == pa.large_string() else f for f in t.schema]
    return t.cast(pa.schema(fields))


def without(docs, ids, num_partitions: int):
    """`docs` less the rows whose id is in `ids` (a pa.Table, or a dataset when there are many)."""
    if isinstance(ids, pa.Table):
        if ids.num_rows == 0:
            return docs
        lookup = ids.column("id").combine_chunks()
        return docs.map_batches(_drop_ids, fn_kwargs={"ids": lookup}, batch_format="pyarrow")
    anti = docs.join(
        ids.select_columns(["id"]), join_type="left_anti", num_partitions=num_partitions, on=("id",)
    )
    return anti.map_batches(_small_strings, batch_format="pyarrow")


def _not_kept(t: pa.Table) -> pa.Table:
    return t.filter(pc.invert(t.column("kept"))).select(["id"])


def near_duplicate_ids(near) -> pa.Table | object:
    """Ids of the near-duplicates that are not kept: a pa.Table when few, else a materialized dataset."""
    dropped = near.map_batches(_not_kept, batch_format="pyarrow")
    first = collect(dropped.limit(BROADCAST_LIMIT + 1))
    if first is None:
        return IDS.empty_table()
    if first.num_rows <= BROADCAST_LIMIT:
        return first.cast(IDS)
    return dropped.materialize()


def _exact_in_clusters(t: pa.Table, dups: pa.Table) -> pa.Table:
    """Exact duplicates whose kept document is in this block of near-dedup rows, put in its cluster."""
    at = pc.index_in(dups.column("keep_id"), value_set=t.column("id").combine_chunks())
    found = pc.is_valid(at)
    ids, at = dups.column("id").filter(found), at.filter(found)
    kept = pa.array([False] * len(ids), pa.bool_())
    return pa.table([ids, t.column("cluster_id").take(at), kept], schema=OUTPUT_SCHEMA)


def _joined_rows(t: pa.Table) -> pa.Table:
    kept = pa.array([False] * t.num_rows, pa.bool_())
    return pa.table({"id": t.column("id"), "cluster_id": t.column("cluster_id"), "kept": kept}).cast(
        OUTPUT_SCHEMA
    )


def cluster_table(exact_dups, near, num_partitions: int):
    """Every document that reached dedup, materialized: the near clusters, plus each exact duplicate in
    the cluster of the document it duplicates (never kept)."""
    if isinstance(exact_dups, pa.Table):
        if exact_dups.num_rows == 0:
            return near
        dups = near.map_batches(_exact_in_clusters, fn_kwargs={"dups": exact_dups}, batch_format="pyarrow")
    else:
        keeper_cluster = near.select_columns(["id", "cluster_id"]).rename_columns({"id": "keep_id"})
        joined = exact_dups.join(
            keeper_cluster, join_type="inner", num_partitions=num_partitions, on=("keep_id",)
        )
        dups = joined.map_batches(_joined_rows, batch_format="pyarrow")
    return near.union(dups).materialize()
