"""Connected components on Ray: alternating Large-Star / Small-Star (Kiveris et al., SoCC 2014).

Edges live as hash-partitioned numpy arrays in the object store; partition of a node = node % P (nodes
are 64-bit hashes, so this spreads evenly). Each round is two shuffles of Ray tasks. The driver only
holds object refs and, per round, one integer per partition (how many nodes are not yet part of a
star), so no edge ever travels to it. Rounds are O(log^2 n) in the worst case, including long chains.

Large-star at node u (m = min of u and its neighbours): link every neighbour v > u to m.
Small-star at node u (m = min of u and its neighbours below u): link those neighbours and u to m.
Both keep components intact and never raise a node's smallest neighbour; the alternation ends with
every component a star around its smallest node. We stop once the graph entering a large-star step
is such a forest of stars: every node is a root (all neighbours larger) or a leaf (exactly one,
smaller, neighbour), which is the fixed point of both steps.
"""

from __future__ import annotations

import itertools

import numpy as np
import ray

from raylm.pipelines.dedup.lsh import dedup_pairs

Parts = list  # list of ObjectRef, one per partition


def partition_of(node: np.ndarray, num_partitions: int) -> np.ndarray:
    return (node % np.uint64(num_partitions)).astype(np.int64)


def split_pairs(key: np.ndarray, value: np.ndarray, num_partitions: int) -> list[dict[str, np.ndarray]]:
    """Split (key, value) pairs by the partition of key."""
    part = partition_of(key, num_partitions)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(num_partitions + 1))
    key, value = key[order], value[order]
    return [{"key": key[lo:hi], "value": value[lo:hi]} for lo, hi in itertools.pairwise(bounds)]


def concat_pairs(parts: tuple[dict[str, np.ndarray], ...]) -> tuple[np.ndarray, np.ndarray]:
    key = np.concatenate([p["key"] for p in parts]) if parts else np.zeros(0, np.uint64)
    value = np.concatenate([p["value"] for p in parts]) if parts else np.zeros(0, np.uint64)
    return key.astype(np.uint64, copy=False), value.astype(np.uint64, copy=False)


def _groups(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index and size of each run of equal keys in a sorted array."""
    starts = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]])) if len(key) else np.zeros(0, int)
    return starts, np.diff(np.append(starts, len(key)))


def both_directions(a: np.ndarray, b: np.ndarray, num_partitions: int) -> list[dict[str, np.ndarray]]:
    return split_pairs(np.concatenate([a, b]), np.concatenate([b, a]), num_partitions)


def _returns(values: list):
    """Ray hands back a single return value as itself, several as a tuple."""
    return values[0] if len(values) == 1 else tuple(values)


@ray.remote
def _orient(num_partitions: int, *parts: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Undirected edges (key, value) -> both directions, partitioned by their first node."""
    a, b = concat_pairs(parts)
    return _returns(both_directions(a, b, num_partitions))


def _large_star_local(key: np.ndarray, nbr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Large-star over the adjacency lists of this partition's nodes (both directions present).

    Returns the new edges (v, m) with v > m, the (node, min of node and neighbours) labels, and how
    many nodes are neither a star root nor a star leaf.
    """
    key, nbr = dedup_pairs(key, nbr)
    starts, sizes = _groups(key)
    node = key[starts] if len(key) else key
    smallest_nbr = np.minimum.reduceat(nbr, starts) if len(key) else nbr
    m = np.minimum(node, smallest_nbr)
    is_root = smallest_nbr > node
    is_leaf = (sizes == 1) & (smallest_nbr < node)
    not_star = int(np.count_nonzero(~(is_root | is_leaf)))
    m_of_edge = np.repeat(m, sizes)
    larger = nbr > key
    return nbr[larger], m_of_edge[larger], np.stack([node, m]), not_star


@ray.remote
def _large_star(num_partitions: int, *parts: dict[str, np.ndarray]):
    key, nbr = concat_pairs(parts)
    v, m, labels, not_star = _large_star_local(key, nbr)
    # Small-star groups an edge by its larger node, which is v (m <= u < v).
    return (*split_pairs(v, m, num_partitions), labels, not_star)


def _small_star_local(key: np.ndarray, smaller: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Small-star: key > smaller for every edge; link each key and its smaller neighbours to their min."""
    key, smaller = dedup_pairs(key, smaller)
    if len(key) == 0:
        return key, smaller
    starts, sizes = _groups(key)
    m = np.repeat(np.minimum.reduceat(smaller, starts), sizes)
    # Edges (x, m) for every smaller neighbour x != m, plus (u, m) for the key itself.
    others = smaller != m
    return np.concatenate([smaller[others], key[starts]]), np.concatenate([m[others], m[starts]])


@ray.remote
def _small_star(num_partitions: int, *parts: dict[str, np.ndarray]):
    key, smaller = concat_pairs(parts)
    a, b = _small_star_local(key, smaller)
    return _returns(both_directions(a, b, num_partitions))


def _shuffle(task, sources: list[list], num_partitions: int, extra_returns: int = 0) -> list[list]:
    """Run `task` once per partition p on the p-th output of every source task."""
    outputs = []
    for p in range(num_partitions):
        inputs = [src[p] for src in sources]
        ret = task.options(num_returns=num_partitions + extra_returns).remote(num_partitions, *inputs)
        outputs.append(ret if isinstance(ret, list) else [ret])
    return outputs


def connected_components(edge_parts: list[list], num_partitions: int, max_rounds: int = 200) -> list:
    """Components of an undirected graph given as edge partitions.

    Args:
        edge_parts: one list per source task, each holding `num_partitions` refs to {"key", "value"}
            uint64 edge arrays (edge (key, value), any partitioning of a source's edges by key).
        num_partitions: P.
    Returns:
        P refs to uint64 arrays of shape (2, k): row 0 the nodes of partition p that have an edge,
        row 1 the smallest node of their component (a node is its own root when it is the smallest).
    """
    edges = _shuffle(_orient, edge_parts, num_partitions)
    for _ in range(max_rounds):
        large = _shuffle(_large_star, edges, num_partitions, extra_returns=2)
        not_star = sum(ray.get([out[num_partitions + 1] for out in large]))
        if not_star == 0:
            return [out[num_partitions] for out in large]
        edges = _shuffle(_small_star, [out[:num_partitions] for out in large], num_partitions)
    raise RuntimeError(f"connected components did not converge in {max_rounds} rounds")
