"""LSH banding: bands/rows for a threshold, band keys of signatures, and bucket -> candidate edges.

A pair whose signatures agree on all `rows` values of at least one of the `bands` bands becomes a
candidate; with Jaccard s that happens with probability 1 - (1 - s^rows)^bands (the S-curve).
"""

from __future__ import annotations

import numpy as np

from raylm.pipelines.dedup.minhash import mix64


def _integrate(f, lo: float, hi: float, steps: int = 1000) -> float:
    """Midpoint rule; smooth integrands on [0, 1], so 1000 steps is plenty."""
    xs = lo + (np.arange(steps) + 0.5) * (hi - lo) / steps
    return float(np.sum(f(xs)) * (hi - lo) / steps)


def false_positive_area(threshold: float, bands: int, rows: int) -> float:
    """Probability mass of candidates below the threshold (pairs that LSH links but should not)."""
    return _integrate(lambda s: 1 - (1 - s**rows) ** bands, 0.0, threshold)


def false_negative_area(threshold: float, bands: int, rows: int) -> float:
    """Probability mass of non-candidates above the threshold (pairs that LSH misses)."""
    return _integrate(lambda s: 1 - (1 - (1 - s**rows) ** bands), threshold, 1.0)


def optimal_bands_rows(
    threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5
) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimizing the weighted FP + FN areas of the
    S-curve; the same objective as datasketch's `_optimal_param`."""
    best, best_err = (1, 1), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            err = fp_weight * false_positive_area(threshold, bands, rows) + fn_weight * false_negative_area(
                threshold, bands, rows
            )
            if err < best_err:
                best, best_err = (bands, rows), err
    return best


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
    """Probability that two documents with this Jaccard share at least one bucket."""
    return 1 - (1 - similarity**rows) ** bands


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """64-bit bucket key of each (document, band): shape (docs, bands), uint64.

    The band index is hashed in, so equal values in different bands never share a bucket.
    """
    n = sig.shape[0]
    keys = np.empty((n, bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            h = np.full(n, np.uint64(band + 1) * np.uint64(0xD6E8FEB86659FD93), dtype=np.uint64)
            for value in sig[:, band * rows : (band + 1) * rows].T.astype(np.uint64):
                h = mix64(h ^ value)
            keys[:, band] = h
    return keys


def star_edges(bucket: np.ndarray, node: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidate edges of bucket members: a star from each bucket's smallest node to every other member
    (k - 1 edges for a bucket of k, never the k(k-1)/2 pairs). Returns (centre, member), deduplicated."""
    if len(bucket) == 0:
        empty = np.zeros(0, dtype=np.uint64)
        return empty, empty
    order = np.lexsort((node, bucket))
    bucket, node = bucket[order], node[order]
    starts = np.flatnonzero(np.concatenate([[True], bucket[1:] != bucket[:-1]]))
    centre = np.repeat(node[starts], np.diff(np.append(starts, len(node))))
    linked = node != centre
    return dedup_pairs(centre[linked], node[linked])


def dedup_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (a, b) pairs, sorted by a then b."""
    if len(a) == 0:
        return a, b
    order = np.lexsort((b, a))
    a, b = a[order], b[order]
    first = np.concatenate([[True], (a[1:] != a[:-1]) | (b[1:] != b[:-1])])
    return a[first], b[first]


def shared_buckets(bucket: np.ndarray, node: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (bucket, node) rows of buckets with two or more distinct nodes, sorted by bucket then node."""
    bucket, node = dedup_pairs(bucket, node)
    if len(bucket) == 0:
        return bucket, node
    starts = np.flatnonzero(np.concatenate([[True], bucket[1:] != bucket[:-1]]))
    sizes = np.diff(np.append(starts, len(bucket)))
    shared = np.repeat(sizes >= 2, sizes)
    return bucket[shared], node[shared]
