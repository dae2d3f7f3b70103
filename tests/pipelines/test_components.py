"""Distributed connected components on adversarial graphs, checked against scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as scipy_components

from raylm.pipelines.dedup.components import connected_components, split_pairs
from raylm.pipelines.dedup.lsh import star_edges


def run_components(
    ray, a: np.ndarray, b: np.ndarray, num_partitions: int, sources: int = 3
) -> dict[int, int]:
    """Feed the edges as `sources` tasks' partitioned outputs; return node -> root."""
    a, b = a.astype(np.uint64), b.astype(np.uint64)
    chunks = np.array_split(np.arange(len(a)), sources)
    edge_parts = [[ray.put(p) for p in split_pairs(a[c], b[c], num_partitions)] for c in chunks]
    labels = ray.get(connected_components(edge_parts, num_partitions))
    assert len(labels) == num_partitions
    nodes = np.concatenate([lab[0] for lab in labels])
    roots = np.concatenate([lab[1] for lab in labels])
    assert len(nodes) == len(np.unique(nodes)), "a node is labelled twice"
    for p, lab in enumerate(labels):
        assert np.all(lab[0] % num_partitions == p), "labels are not partitioned by node"
    return dict(zip(nodes.tolist(), roots.tolist()))


def expected_roots(a: np.ndarray, b: np.ndarray) -> dict[int, int]:
    """Smallest node of each component, by scipy on a relabelled graph."""
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    n = len(nodes)
    graph = coo_matrix((np.ones(len(a)), (inverse[: len(a)], inverse[len(a) :])), shape=(n, n))
    _, comp = scipy_components(graph, directed=False)
    smallest = np.full(comp.max() + 1, np.iinfo(np.uint64).max, dtype=np.uint64)
    np.minimum.at(smallest, comp, nodes.astype(np.uint64))
    return dict(zip(nodes.tolist(), smallest[comp].tolist()))


def random_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """Distinct 64-bit node ids in random order, as hashed document ids are."""
    return np.unique(rng.integers(0, 2**64, int(n * 1.1) + 10, dtype=np.uint64))[:n][rng.permutation(n)]


@pytest.mark.parametrize("num_partitions", [1, 3])
def test_long_chain(ray_cluster, num_partitions):
    rng = np.random.default_rng(num_partitions)
    ids = random_ids(rng, 5000)
    a, b = ids[:-1], ids[1:]  # one path through 5,000 nodes in random id order
    roots = run_components(ray_cluster, a, b, num_partitions)
    assert set(roots.values()) == {int(ids.min())}
    assert len(roots) == 5000


def test_star_and_huge_bucket(ray_cluster):
    rng = np.random.default_rng(7)
    ids = random_ids(rng, 20_001)
    centre = ids[:1].repeat(10_000)  # a star whose centre is not the smallest node
    a, b = centre, ids[1:10_001]
    # One bucket of 10,000 documents: its star edges, not 50 million pairs.
    bucket_a, bucket_b = star_edges(np.zeros(10_000, np.uint64), ids[10_001:])
    assert len(bucket_a) == 9_999
    a, b = np.concatenate([a, bucket_a]), np.concatenate([b, bucket_b])
    assert run_components(ray_cluster, a, b, num_partitions=4) == expected_roots(a, b)


def test_random_graph_matches_scipy(ray_cluster):
    rng = np.random.default_rng(0)
    ids = random_ids(rng, 3000)
    pick = rng.integers(0, 3000, size=(2, 2200))
    a, b = ids[pick[0]], ids[pick[1]]
    # Self loops and duplicate edges in both directions are allowed.
    a, b = np.concatenate([a, b[:100], a[:50]]), np.concatenate([b, a[:100], a[:50]])
    assert run_components(ray_cluster, a, b, num_partitions=3) == expected_roots(a, b)


def test_binary_tree_and_cycles(ray_cluster):
    rng = np.random.default_rng(1)
    ids = random_ids(rng, 4095 + 3000)
    tree = ids[:4095]
    a, b = tree[(np.arange(1, 4095) - 1) // 2], tree[1:]
    cycles = ids[4095:].reshape(100, 30)
    a = np.concatenate([a, cycles.ravel()])
    b = np.concatenate([b, np.roll(cycles, 1, axis=1).ravel()])
    assert run_components(ray_cluster, a, b, num_partitions=2) == expected_roots(a, b)


def test_no_edges(ray_cluster):
    assert run_components(ray_cluster, np.zeros(0), np.zeros(0), num_partitions=2, sources=1) == {}
