"""LSH: band/row math against datasketch, band keys, and star candidate edges."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from datasketch.lsh import _optimal_param

from raylm.pipelines.dedup.lsh import (
    band_keys,
    candidate_probability,
    optimal_bands_rows,
    shared_buckets,
    star_edges,
)
from raylm.pipelines.dedup.minhash import permutations, signatures


@pytest.mark.parametrize(
    ("threshold", "num_perm"), [(0.5, 128), (0.8, 128), (0.9, 128), (0.7, 64), (0.85, 256)]
)
def test_bands_rows_match_datasketch(threshold, num_perm):
    assert optimal_bands_rows(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.5, 0.5)


def test_recall_weighting_moves_the_s_curve_left():
    balanced = optimal_bands_rows(0.8, 128)
    recall_first = optimal_bands_rows(0.8, 128, fp_weight=0.05, fn_weight=0.95)
    assert recall_first[0] * recall_first[1] <= 128
    assert candidate_probability(0.8, *recall_first) > candidate_probability(0.8, *balanced) + 0.3
    assert candidate_probability(0.3, *recall_first) < 0.01


def test_candidate_probability_is_an_s_curve():
    probs = [candidate_probability(s, 9, 13) for s in np.linspace(0, 1, 21)]
    assert probs[0] == 0 and probs[-1] == 1
    assert all(x <= y for x, y in itertools.pairwise(probs))


def test_empirical_candidate_rate_follows_the_s_curve():
    # Sets of 400 hashes sharing k: Jaccard k / (800 - k); measure how often some band matches.
    rng = np.random.default_rng(0)
    a, b = permutations(128, seed=3)
    bands, rows = 16, 8
    for similarity in (0.6, 0.8):
        shared = round(800 * similarity / (1 + similarity))
        hits = 0
        trials = 300
        for _ in range(trials):
            common = rng.integers(0, 2**64, shared, dtype=np.uint64)
            x = np.concatenate([common, rng.integers(0, 2**64, 400 - shared, dtype=np.uint64)])
            y = np.concatenate([common, rng.integers(0, 2**64, 400 - shared, dtype=np.uint64)])
            sig = signatures(np.array([0, 400, 800]), np.concatenate([x, y]), a, b)
            keys = band_keys(sig, bands, rows)
            hits += bool(np.any(keys[0] == keys[1]))
        expected = candidate_probability(shared / (800 - shared), bands, rows)
        assert abs(hits / trials - expected) < 4 * np.sqrt(expected * (1 - expected) / trials) + 0.01


def test_band_keys_separate_bands_and_values():
    sig = np.zeros((3, 12), dtype=np.uint32)
    sig[1, 0] = 7  # differs from row 0 in band 0 only
    keys = band_keys(sig, bands=3, rows=4)
    assert keys[0, 0] != keys[1, 0]
    assert np.array_equal(keys[0, 1:], keys[1, 1:])
    assert np.array_equal(keys[0], keys[2])
    assert len(set(keys[0].tolist())) == 3  # equal values in different bands: different buckets


def test_star_edges_are_linear_in_the_bucket_size():
    bucket = np.array([5] * 1000 + [9, 9, 3], dtype=np.uint64)
    node = np.concatenate([np.arange(1000, 0, -1), [50, 40, 77]]).astype(np.uint64)
    centre, member = star_edges(bucket, node)
    assert len(centre) == 999 + 1  # 1000-member bucket: 999 edges; bucket 9: one; bucket 3 alone: none
    assert set(centre.tolist()) == {1, 40}
    assert np.all(centre < member)


def test_star_edges_deduplicate_repeated_rows_and_pairs():
    bucket = np.array([1, 1, 1, 2, 2], dtype=np.uint64)
    node = np.array([4, 4, 6, 4, 6], dtype=np.uint64)
    centre, member = star_edges(bucket, node)
    assert list(zip(centre.tolist(), member.tolist())) == [(4, 6)]
    b, n = shared_buckets(np.array([1, 1, 2, 3, 3], np.uint64), np.array([5, 5, 6, 7, 8], np.uint64))
    assert b.tolist() == [3, 3] and n.tolist() == [7, 8]
