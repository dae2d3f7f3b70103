"""Exact-Jaccard check of LSH candidates, done where the buckets are.

A bucket's star (smallest member -> every other member) is only as good as its centre: if the centre
is a hard negative (say Jaccard 0.75 with the others) all its edges fail the check and the true
duplicates among the other members would be lost. So members that fail against the centre form the
next star around their own smallest member, for up to `max_rounds` rounds. Each round is linear in
the bucket size, so a bucket of k members costs at most max_rounds * k comparisons, never k^2 / 2.

Shingle sets travel to the bucket partitions that need them (only documents in a shared bucket), as
packs {"node": uint64, "start": int64, "stop": int64, "values": uint64}: node k's set (sorted, no
repeats) is values[start[k]:stop[k]]. Merged packs are sorted by node for look-ups, but their values
are left where they are, which saves a copy of the largest array.
"""

from __future__ import annotations

import numpy as np

from raylm.pipelines.dedup.lsh import dedup_pairs


def ranges(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), without a Python loop."""
    total = int(sizes.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    first = np.repeat(starts - np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes)
    return first + np.arange(total)


def pack_from_offsets(node: np.ndarray, offsets: np.ndarray, values: np.ndarray) -> dict:
    """A pack from list-style offsets (set k is values[offsets[k]:offsets[k + 1]])."""
    return {
        "node": node,
        "start": offsets[:-1].astype(np.int64),
        "stop": offsets[1:].astype(np.int64),
        "values": values,
    }


def take_sets(pack: dict, rows: np.ndarray) -> dict:
    """A compact pack of the given rows (in that order), e.g. to send to another task."""
    sizes = pack["stop"][rows] - pack["start"][rows]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return pack_from_offsets(pack["node"][rows], offsets, pack["values"][ranges(pack["start"][rows], sizes)])


def merge_packs(packs: list[dict]) -> dict:
    """One pack, sorted by node, from several packs holding distinct nodes."""
    if not packs:
        return pack_from_offsets(np.zeros(0, np.uint64), np.zeros(1, np.int64), np.zeros(0, np.uint64))
    shifts = np.concatenate([[0], np.cumsum([len(p["values"]) for p in packs])[:-1]])
    node = np.concatenate([p["node"] for p in packs])
    order = np.argsort(node, kind="stable")
    return {
        "node": node[order],
        "start": np.concatenate([p["start"] + shift for p, shift in zip(packs, shifts)])[order],
        "stop": np.concatenate([p["stop"] + shift for p, shift in zip(packs, shifts)])[order],
        "values": np.concatenate([p["values"] for p in packs]),
    }


def set_slices(pack: dict, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, stop) of each node's set in pack["values"]; every node must be in the pack."""
    row = np.searchsorted(pack["node"], nodes)
    if len(nodes) and (row.max() >= len(pack["node"]) or np.any(pack["node"][row] != nodes)):
        raise KeyError("a node has no shingle set in the pack")
    return pack["start"][row], pack["stop"][row]


def passes(pack: dict, a: np.ndarray, b: np.ndarray, threshold: float) -> np.ndarray:
    """Whether each pair (a[k], b[k]) has exact Jaccard >= threshold."""
    a_lo, a_hi = set_slices(pack, a)
    b_lo, b_hi = set_slices(pack, b)
    values = pack["values"]
    ok = np.zeros(len(a), dtype=bool)
    for k in range(len(a)):
        sa, sb = values[a_lo[k] : a_hi[k]], values[b_lo[k] : b_hi[k]]
        inter = len(np.intersect1d(sa, sb, assume_unique=True))
        union = len(sa) + len(sb) - inter
        ok[k] = union > 0 and inter / union >= threshold  # the same float test as the ground truth
    return ok


def verified_star_edges(
    bucket: np.ndarray, node: np.ndarray, pack: dict, threshold: float, max_rounds: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Edges (centre, member) with exact Jaccard >= threshold, from repeated stars inside each bucket.

    `bucket`, `node` must be sorted by bucket then node without repeats (see lsh.shared_buckets).
    """
    edges_a, edges_b = [], []
    checked: dict[tuple[int, int], bool] = {}  # the same pair shows up in many bands
    for _ in range(max_rounds):
        if len(bucket) < 2:
            break
        starts = np.flatnonzero(np.concatenate([[True], bucket[1:] != bucket[:-1]]))
        sizes = np.diff(np.append(starts, len(bucket)))
        centre = np.repeat(node[starts], sizes)
        member = centre != node
        shared = np.repeat(sizes >= 2, sizes) & member
        a, b = centre[shared], node[shared]
        keys = list(zip(a.tolist(), b.tolist()))
        todo = [k for k in dict.fromkeys(keys) if k not in checked]
        if todo:
            arr = np.array(todo, dtype=np.uint64)
            checked.update(zip(todo, passes(pack, arr[:, 0], arr[:, 1], threshold).tolist()))
        ok = np.fromiter((checked[k] for k in keys), dtype=bool, count=len(keys))
        edges_a.append(a[ok])
        edges_b.append(b[ok])
        # Members that failed their centre try again around the smallest of themselves.
        retry = np.flatnonzero(shared)[~ok]
        bucket, node = bucket[retry], node[retry]
    if not edges_a:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    return dedup_pairs(np.concatenate(edges_a), np.concatenate(edges_b))
