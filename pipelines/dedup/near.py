"""Near-duplicate clusters: MinHash LSH candidates, optional exact-Jaccard check, connected components.

Data flow (P = number of hash partitions; nothing but object refs and per-partition counts reaches the
driver):

  docs --map_batches--> signature blocks (id, node, band keys, shingle set)      [Ray Data, streaming]
       --split task per block--> doc parts by node % P, bucket parts by key % P   [Ray tasks]
       --per bucket partition--> buckets with 2+ members; star edges if not cfg.verify, else:
       --per node partition--> shingle sets of those members, sent to the bucket partitions
       --per bucket partition--> star edges whose exact Jaccard >= threshold (verify.py)
       --connected_components--> (node, root) per node partition
       --per node partition--> singletons, and (root, id) rows sent to partition of root
       --per root partition--> cluster_id = smallest id of the cluster, kept = (id == cluster_id)

A document's node is the xxh3-64 hash of its id (UTF-8). Two ids with the same 64-bit hash would be
treated as one node; for a billion documents the chance of any collision is about 3%, for a million
about 3e-8.

Keep rule: in every cluster the document with the smallest id (Python string order, i.e. Unicode code
points) is kept, and `cluster_id` is that id. It depends only on the ids in the cluster, so the same
documents survive whatever the number of workers, blocks or partitions.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray
import xxhash

from raylm.pipelines.config import NearDedupConfig
from raylm.pipelines.dedup.components import concat_pairs, connected_components, partition_of, split_pairs
from raylm.pipelines.dedup.lsh import band_keys, optimal_bands_rows, shared_buckets, star_edges
from raylm.pipelines.dedup.minhash import permutations, shingle_hashes, signatures, unique_per_text
from raylm.pipelines.dedup.verify import merge_packs, pack_from_offsets, take_sets, verified_star_edges

OUTPUT_SCHEMA = pa.schema([("id", pa.string()), ("cluster_id", pa.string()), ("kept", pa.bool_())])


# With the exact check, an LSH false positive only costs one Jaccard computation while a false negative
# is a missed duplicate, so the S-curve is tuned for recall (at 0.8 and 128 permutations: 16 bands x 8
# rows, a pair at Jaccard 0.8 becomes a candidate with probability 0.95 instead of 0.40 with datasketch's
# 9 x 13). Without it, false positives and false negatives weigh the same, as in datasketch.
FALSE_NEGATIVE_WEIGHT_VERIFIED = 0.95
FALSE_NEGATIVE_WEIGHT_UNVERIFIED = 0.5


def bands_and_rows(cfg: NearDedupConfig) -> tuple[int, int]:
    """The configured (bands, rows), or the ones minimizing the weighted FP + FN mass of the S-curve."""
    if cfg.bands is not None and cfg.rows is not None:
        return cfg.bands, cfg.rows
    fn_weight = FALSE_NEGATIVE_WEIGHT_VERIFIED if cfg.verify else FALSE_NEGATIVE_WEIGHT_UNVERIFIED
    return optimal_bands_rows(cfg.threshold, cfg.num_perm, fp_weight=1 - fn_weight, fn_weight=fn_weight)


def node_keys(ids: pa.Array) -> np.ndarray:
    return np.fromiter(
        (xxhash.xxh3_64_intdigest(i.encode()) for i in ids.to_pylist()), dtype=np.uint64, count=len(ids)
    )


def signature_batch(
    batch: pa.Table,
    *,
    id_col: str,
    text_col: str,
    ngram: int,
    a: np.ndarray,
    b: np.ndarray,
    bands: int,
    rows: int,
    keep_shingles: bool,
) -> pa.Table:
    """Ray Data stage: (id, text) rows -> (id, node, n_shingles, bands[, shingles]) rows."""
    ids = batch.column(id_col).combine_chunks().cast(pa.string())
    offsets, hashes = shingle_hashes(batch.column(text_col), ngram)
    keys = band_keys(signatures(offsets, hashes, a, b), bands, rows)
    columns = {
        "id": ids,
        "node": pa.array(node_keys(ids)),
        "n_shingles": pa.array(np.diff(offsets)),
        "bands": pa.FixedSizeListArray.from_arrays(pa.array(keys.ravel()), bands),
    }
    if keep_shingles:
        set_offsets, set_values = unique_per_text(offsets, hashes)
        columns["shingles"] = pa.LargeListArray.from_arrays(pa.array(set_offsets), pa.array(set_values))
    return pa.table(columns)


def _doc_part(node: np.ndarray, ids: pa.Array, shingles: pa.Array | None) -> dict:
    part = {"node": node, "id": ids}
    if shingles is not None:
        offsets = np.asarray(shingles.offsets) - shingles.offsets[0].as_py()
        part.update(pack_from_offsets(node, offsets, shingles.flatten().to_numpy()))
    return part


@ray.remote
def _split_block(block: pa.Table, num_partitions: int, bands: int) -> tuple:
    """One signature block -> P doc parts (by node) followed by P bucket parts (by bucket key)."""
    node = block.column("node").to_numpy()
    ids = block.column("id").combine_chunks()
    shingles = block.column("shingles").combine_chunks() if "shingles" in block.column_names else None
    part = partition_of(node, num_partitions)
    docs = []
    for p in range(num_partitions):
        rows = np.flatnonzero(part == p)
        docs.append(
            _doc_part(node[rows], ids.take(rows), shingles.take(rows) if shingles is not None else None)
        )
    # Documents without shingles have no signature and join no bucket.
    has_shingles = block.column("n_shingles").to_numpy() > 0
    keys = block.column("bands").combine_chunks().flatten().to_numpy().reshape(-1, bands)[has_shingles]
    buckets = split_pairs(keys.ravel(), np.repeat(node[has_shingles], bands), num_partitions)
    return (*docs, *buckets)


@ray.remote(num_returns=2)
def _merge_docs(*parts: dict) -> tuple[dict, dict | None]:
    """All doc parts of one node partition, sorted by node: ({"node", "id"}, shingle-set pack or None).
    Two objects, so the sets can be freed once the check is done while the ids wait for the end."""
    node = np.concatenate([p["node"] for p in parts])
    order = np.argsort(node, kind="stable")
    ids = {"node": node[order], "id": pa.concat_arrays([p["id"] for p in parts]).take(order)}
    return ids, merge_packs(list(parts)) if "values" in parts[0] else None


@ray.remote
def _group_buckets(num_partitions: int, verify: bool, *parts: dict) -> tuple | dict:
    """One bucket partition -> star edges split by centre (no check), or its shared buckets followed
    by P requests for the shingle sets of their members (split by the member's node partition)."""
    bucket, node = shared_buckets(*concat_pairs(parts))
    if not verify:
        return _returns(split_pairs(*star_edges(bucket, node), num_partitions))
    wanted = np.unique(node)
    return ({"bucket": bucket, "node": node}, *split_pairs(wanted, wanted, num_partitions))


@ray.remote
def _fetch_sets(num_partitions: int, docs: dict, *requests: dict) -> tuple | dict:
    """Shingle sets of one node partition, one pack per bucket partition that asked."""
    packs = [take_sets(docs, np.searchsorted(docs["node"], r["key"])) for r in requests]
    return _returns(packs)


@ray.remote
def _verified_edges(num_partitions: int, threshold: float, buckets: dict, *packs: dict) -> tuple | dict:
    pack = merge_packs(list(packs))
    centre, member = verified_star_edges(buckets["bucket"], buckets["node"], pack, threshold)
    return _returns(split_pairs(centre, member, num_partitions))


def _returns(values: list):
    """Ray hands back a single return value as itself, several as a tuple."""
    return values[0] if len(values) == 1 else tuple(values)


@ray.remote
def _attach_roots(num_partitions: int, docs: dict, labels: np.ndarray) -> tuple:
    """Documents of one node partition -> their singleton rows, then P parts of (root, id) rows."""
    labelled_nodes, roots = (labels[0], labels[1]) if labels.size else (np.zeros(0, np.uint64),) * 2
    order = np.argsort(labelled_nodes)
    labelled_nodes, roots = labelled_nodes[order], roots[order]
    row = np.minimum(np.searchsorted(labelled_nodes, docs["node"]), max(len(labelled_nodes) - 1, 0))
    in_cluster = (labelled_nodes[row] == docs["node"]) if len(labelled_nodes) else np.zeros(len(row), bool)
    alone = docs["id"].filter(pa.array(~in_cluster))
    singletons = pa.table([alone, alone, pa.array(np.ones(len(alone), dtype=bool))], schema=OUTPUT_SCHEMA)
    members = split_pairs(roots[row[in_cluster]], np.flatnonzero(in_cluster), num_partitions)
    ids = docs["id"]
    parts = [{"root": m["key"], "id": ids.take(pa.array(m["value"]))} for m in members]
    return (singletons, *parts)


@ray.remote
def _keep_smallest_id(*parts: dict) -> pa.Table:
    """Rows of whole clusters (all members of a root are in this partition): keep the smallest id."""
    table = pa.table(
        {"root": np.concatenate([p["root"] for p in parts]), "id": pa.concat_arrays([p["id"] for p in parts])}
    ).sort_by([("root", "ascending"), ("id", "ascending")])
    root = table.column("root").to_numpy()
    first = np.concatenate([[True], root[1:] != root[:-1]]) if len(root) else np.zeros(0, bool)
    group = np.cumsum(first) - 1
    ids = table.column("id").combine_chunks()
    cluster_id = ids.take(pa.array(np.flatnonzero(first)[group])) if len(root) else ids
    return pa.table([ids, cluster_id, pa.array(first)], schema=OUTPUT_SCHEMA)


def near_duplicate_clusters(
    docs: ray.data.Dataset,
    cfg: NearDedupConfig,
    id_col: str = "id",
    text_col: str = "text",
    *,
    num_partitions: int | None = None,
    batch_size: int = 1024,
    concurrency: int | None = None,
) -> ray.data.Dataset:
    """One output row per input row: columns `id` (string), `cluster_id` (string), `kept` (bool).

    Documents with no near-duplicate are their own cluster (cluster_id == id, kept True). In a cluster
    of near-duplicates the document with the smallest id is kept and is the cluster_id (see module
    docstring). Shingles are defined in pipelines/dedup/minhash.py.

    Args:
        num_partitions: hash partitions of the shuffles; default the cluster's CPU count.
        batch_size: rows per signature batch.
        concurrency: maximum concurrent signature tasks (None lets Ray Data decide).
    """
    bands, rows = bands_and_rows(cfg)
    if num_partitions is None:
        num_partitions = max(1, int(ray.cluster_resources().get("CPU", 1)))
    P = num_partitions
    a, b = permutations(cfg.num_perm, cfg.seed)
    sigs = docs.select_columns([id_col, text_col]).map_batches(
        signature_batch,
        batch_format="pyarrow",
        batch_size=batch_size,
        concurrency=concurrency,
        fn_kwargs={
            "id_col": id_col,
            "text_col": text_col,
            "ngram": cfg.ngram,
            "a": a,
            "b": b,
            "bands": bands,
            "rows": rows,
            "keep_shingles": cfg.verify,
        },
    )
    # Blocks are shuffled as Ray Data produces them; the driver only sees their refs.
    doc_parts, bucket_parts = [], []
    for bundle in sigs.iter_internal_ref_bundles():
        for block in bundle.block_refs:
            out = _split_block.options(num_returns=2 * P).remote(block, P, bands)
            doc_parts.append(out[:P])
            bucket_parts.append(out[P:])
    if not doc_parts:
        return ray.data.from_arrow(OUTPUT_SCHEMA.empty_table())
    merged = [_merge_docs.remote(*[parts[p] for parts in doc_parts]) for p in range(P)]
    ids_by_node, sets_by_node = [m[0] for m in merged], [m[1] for m in merged]
    del merged
    grouped = [
        _as_list(
            _group_buckets.options(num_returns=1 + P if cfg.verify else P).remote(
                P, cfg.verify, *[bp[p] for bp in bucket_parts]
            )
        )
        for p in range(P)
    ]
    edges = _edges(grouped, sets_by_node, cfg, P)
    # Dropping the driver's refs lets Ray free each intermediate as soon as its consumers are done.
    del doc_parts, bucket_parts, grouped, sets_by_node
    labels = connected_components(edges, P)
    del edges
    attached = [
        _as_list(_attach_roots.options(num_returns=P + 1).remote(P, ids_by_node[p], labels[p]))
        for p in range(P)
    ]
    clusters = [_keep_smallest_id.remote(*[out[1 + q] for out in attached]) for q in range(P)]
    return ray.data.from_arrow_refs([out[0] for out in attached] + clusters)


def _as_list(ret) -> list:
    return ret if isinstance(ret, list) else [ret]


def _edges(grouped: list[list], sets_by_node: list, cfg: NearDedupConfig, P: int) -> list[list]:
    """Per bucket partition, the star edges to link: all of them without the exact check, else only
    those whose exact Jaccard on the shingles reaches the threshold."""
    if not cfg.verify:
        return grouped
    # Route each shared bucket member's shingle set to the bucket partitions that hold it.
    sets = [
        _as_list(_fetch_sets.options(num_returns=P).remote(P, sets_by_node[q], *[g[1 + q] for g in grouped]))
        for q in range(P)
    ]
    return [
        _as_list(
            _verified_edges.options(num_returns=P).remote(
                P, cfg.threshold, grouped[p][0], *[s[p] for s in sets]
            )
        )
        for p in range(P)
    ]
