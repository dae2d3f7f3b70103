"""Exact dedup and the removal of duplicates give the same result by lookup (few duplicates) and by
join (many: BROADCAST_LIMIT forced to 0), so the path a large corpus takes is tested too."""

import pyarrow as pa
import pytest

from raylm.pipelines.dedup import exact, removal
from raylm.pipelines.dedup.exact import collect, exact_duplicates, mark_group

# Texts "a" x3, "b" x1, "c" x2: d3 and d5 duplicate d1 ("a"), d6 duplicates d2 ("c").
ROWS = [("d3", "a"), ("d1", "a"), ("d2", "c"), ("d4", "b"), ("d5", "a"), ("d6", "c")]
EXPECTED = [("d3", "d1"), ("d5", "d1"), ("d6", "d2")]
NEAR = pa.table(  # near-dedup rows of the survivors d1, d2, d4: d4 is a near-duplicate of d1
    {"id": ["d1", "d2", "d4"], "cluster_id": ["d1", "d2", "d1"], "kept": [True, True, False]}
)


def _docs(ray_cluster):
    import ray.data

    return ray.data.from_arrow(
        pa.table({"id": [r[0] for r in ROWS], "text": [r[1] for r in ROWS]})
    ).repartition(3)


def _rows(table_or_ds, *columns) -> list[tuple]:
    table = table_or_ds if isinstance(table_or_ds, pa.Table) else collect(table_or_ds)
    return sorted(zip(*(table.column(c).to_pylist() for c in columns)))


def test_mark_group_lists_duplicates_with_smallest_id():
    hashes, _ = exact.text_hashes([t for _, t in ROWS])
    group = pa.table({"id": [i for i, _ in ROWS], "text_hash": hashes})
    assert _rows(mark_group(group), "id", "keep_id") == EXPECTED


@pytest.mark.parametrize("limit", [exact.BROADCAST_LIMIT, 0])
def test_exact_dedup_and_removal_by_lookup_or_join(ray_cluster, monkeypatch, limit):
    import ray.data

    monkeypatch.setattr(exact, "BROADCAST_LIMIT", limit)
    monkeypatch.setattr(removal, "BROADCAST_LIMIT", limit)
    docs = _docs(ray_cluster)
    dups = exact_duplicates(docs, 2)
    assert isinstance(dups, pa.Table) == (limit > 0)
    assert _rows(dups, "id", "keep_id") == EXPECTED
    survivors = removal.without(docs, dups, 2)
    assert _rows(survivors, "id") == [("d1",), ("d2",), ("d4",)]
    near = ray.data.from_arrow(NEAR).materialize()
    clusters = removal.cluster_table(dups, near, 2)
    assert _rows(clusters, "id", "cluster_id", "kept") == [
        ("d1", "d1", True),
        ("d2", "d2", True),
        ("d3", "d1", False),
        ("d4", "d1", False),
        ("d5", "d1", False),
        ("d6", "d2", False),
    ]
    final = removal.without(survivors, removal.near_duplicate_ids(near), 2)
    assert _rows(final, "id", "text") == [("d1", "a"), ("d2", "c")]
    assert collect(final).schema.field("id").type == pa.string()  # joins hand back large strings
