"""Document ids are unique downstream of the reader.

Rule: when several documents claim one id, the first by (source path, position in the source) keeps it,
and every later one is set aside as `duplicate_id`, naming where the id was claimed first. The rule
depends only on the inputs, never on block layout or worker count. It counts as a read-time reject
(the id is a property of the input), so a later duplicate is set aside even if its text would have been
filtered anyway, and the first claimant goes on as if the others did not exist.

Why it matters: exact dedup, near dedup and the cluster table all join on id, so two documents with one
id would match each other's rows, and a stage's count could grow along the pipeline.

Cost: one shuffle of (id, source, pos) rows, a few dozen bytes per document, to count ids. When no id
repeats (the usual case) that is all. Otherwise the claims of the repeated ids are picked out by a
lookup in each task and ordered in one process when they are few (up to BROADCAST_LIMIT repeated ids),
and the later claims are marked by a lookup table sent to every task. Beyond that, both steps are
distributed: a join and a group-by on id, then a hash join with the corpus.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from raylm.pipelines.filters import reason_kind
from raylm.pipelines.readers import DUPLICATE_ID, READ_REASONS, SCHEMA

BROADCAST_LIMIT = 100_000
LATER = pa.schema([("source", pa.string()), ("pos", pa.int64()), ("first", pa.string())])


def _documents(t: pa.Table) -> pa.Table:
    """(id, source, pos) of the rows that were read as documents (filter rejects included)."""
    read_reject = pc.is_in(reason_kind(t.column("reject")), pa.array(sorted(READ_REASONS)))
    is_document = pc.invert(pc.fill_null(read_reject, False))
    return t.filter(is_document).select(["id", "source", "pos"])


def _repeated(t: pa.Table) -> pa.Table:
    return t.filter(pc.greater(t.column("count()"), 1)).select(["id"])


def _with_ids(t: pa.Table, ids: pa.Array) -> pa.Table:
    return t.filter(pc.is_in(t.column("id"), value_set=ids))


def _later_claims(claims: pa.Table) -> pa.Table:
    """Claims of repeated ids (one id's group, or all of them) -> every claim but the first of its id (by
    source, pos), with where the first is."""
    claims = claims.sort_by([("id", "ascending"), ("source", "ascending"), ("pos", "ascending")])
    ids, sources, positions = (claims[c].to_pylist() for c in ("id", "source", "pos"))
    rows, first, previous = [], "", None
    for doc_id, source, pos in zip(ids, sources, positions):
        if doc_id != previous:
            first, previous = f"{source}:{pos}", doc_id
        else:
            rows.append({"source": source, "pos": pos, "first": first})
    return pa.Table.from_pylist(rows, schema=LATER)


def _collect(ds) -> pa.Table:
    return pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow")))


def later_claims(rows, num_partitions: int):
    """(source, pos, first) for every document whose id an earlier one claimed: a pa.Table when there are
    few (the usual case: found without a second shuffle), else a materialized dataset; None when every
    id is unique."""
    docs = rows.map_batches(_documents, batch_format="pyarrow").materialize()
    repeated = (
        docs.groupby("id", num_partitions=num_partitions)
        .count()
        .map_batches(_repeated, batch_format="pyarrow")
        .materialize()
    )
    n_repeated = repeated.count()
    if n_repeated == 0:
        return None
    if n_repeated <= BROADCAST_LIMIT:
        ids = _collect(repeated)["id"]
        claims = docs.map_batches(_with_ids, fn_kwargs={"ids": ids}, batch_format="pyarrow").materialize()
        if claims.count() <= 2 * BROADCAST_LIMIT:
            return _later_claims(_collect(claims))
    claims = docs.join(repeated, join_type="inner", num_partitions=num_partitions, on=("id",))
    return (
        claims.groupby("id", num_partitions=num_partitions)
        .map_groups(_later_claims, batch_format="pyarrow")
        .materialize()
    )


def _reject_where(t: pa.Table, first: pa.Array) -> pa.Table:
    """Set `reject` to duplicate_id on rows whose `first` is set (aligned with t's rows)."""
    first = pc.cast(first, pa.string())
    reason = pc.binary_join_element_wise(f"{DUPLICATE_ID}: id first claimed at ", first, "")
    reject = pc.if_else(pc.is_valid(first), reason, pc.cast(t.column("reject"), pa.string()))
    return t.set_column(t.schema.get_field_index("reject"), "reject", reject)


def _mark_from_table(t: pa.Table, later: pa.Table) -> pa.Table:
    keys = pc.binary_join_element_wise(t.column("source"), pc.cast(t.column("pos"), pa.string()), "\0")
    later_keys = pc.binary_join_element_wise(later["source"], pc.cast(later["pos"], pa.string()), "\0")
    index = pc.index_in(keys, value_set=later_keys)
    return _reject_where(t, pc.take(later["first"], index))


def _mark_joined(t: pa.Table) -> pa.Table:
    """After the join: the reader's columns and types again (the join hands back large strings)."""
    return _reject_where(t, t.column("first")).select(SCHEMA.names).cast(SCHEMA)


def set_aside_later_claims(rows, num_partitions: int):
    """`rows` with every later claim of an id rejected as duplicate_id; `rows` itself when ids are unique."""
    later = later_claims(rows, num_partitions)
    if later is None:
        return rows
    if isinstance(later, pa.Table) or later.count() <= BROADCAST_LIMIT:
        table = later if isinstance(later, pa.Table) else _collect(later)
        return rows.map_batches(_mark_from_table, fn_kwargs={"later": table}, batch_format="pyarrow")
    joined = rows.join(later, join_type="left_outer", num_partitions=num_partitions, on=("source", "pos"))
    return joined.map_batches(_mark_joined, batch_format="pyarrow")
