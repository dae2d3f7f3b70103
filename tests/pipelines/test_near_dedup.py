"""Near-duplicate removal end to end on a local Ray, against a generated corpus with exact truth."""

from __future__ import annotations

import gzip
import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from raylm.pipelines.config import NearDedupConfig
from raylm.pipelines.dedup.minhash import shingle_hashes, shingle_sets, unique_per_text
from raylm.pipelines.dedup.near import bands_and_rows, near_duplicate_clusters
from raylm.pipelines.dedup.verify import merge_packs, pack_from_offsets, verified_star_edges
from tests.synthetic import generate_corpus, read_truth, score_clusters, write_corpus


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus(1500, seed=7, min_words=80, max_words=250)


def clusters(ray, docs, cfg=None, **kwargs) -> pd.DataFrame:
    ds = ray.data.from_items(docs)
    out = near_duplicate_clusters(ds, cfg or NearDedupConfig(), **kwargs).to_pandas()
    return out.sort_values("id").reset_index(drop=True)


def check_contract(out: pd.DataFrame, ids: list[str]) -> None:
    assert sorted(out["id"]) == sorted(ids), "not exactly one row per input row"
    assert out.groupby("cluster_id")["kept"].sum().eq(1).all(), "a cluster keeps other than one document"
    kept = out[out["kept"]]
    assert (kept["id"] == kept["cluster_id"]).all()
    # The keep rule: the smallest id of each cluster.
    assert (out.groupby("cluster_id")["id"].min() == out.groupby("cluster_id")["id"].min().index).all()


@pytest.mark.slow
def test_planted_duplicates_are_found(ray_cluster, corpus):
    out = clusters(ray_cluster, corpus.docs, batch_size=200)
    check_contract(out, [d["id"] for d in corpus.docs])
    scores = score_clusters(dict(zip(out["id"], out["cluster_id"])), corpus.pairs, threshold=0.8)
    assert scores["true_pairs"] > 300
    assert scores["precision"] >= 0.99, scores
    assert scores["recall"] >= 0.95, scores
    assert scores["direct_recall"] >= 0.95, scores
    singletons = out[out.groupby("cluster_id")["id"].transform("size") == 1]
    assert (singletons["cluster_id"] == singletons["id"]).all() and singletons["kept"].all()


@pytest.mark.slow
def test_same_documents_survive_with_one_or_two_workers(ray_cluster, corpus):
    docs = corpus.docs[:600]
    one = clusters(ray_cluster, docs, num_partitions=1, batch_size=600, concurrency=1)
    ds = ray_cluster.data.from_items(docs).repartition(7)
    two = near_duplicate_clusters(ds, NearDedupConfig(), num_partitions=2, batch_size=64, concurrency=2)
    two = two.to_pandas().sort_values("id").reset_index(drop=True)
    assert one["kept"].sum() < len(docs)  # the sample does hold duplicates
    pd.testing.assert_frame_equal(one, two)


@pytest.mark.slow
def test_without_exact_check_hard_negatives_leak_in(ray_cluster, corpus):
    cfg = NearDedupConfig(verify=False)
    assert bands_and_rows(cfg) == (9, 13)  # datasketch's balanced S-curve when nothing checks the pairs
    out = clusters(ray_cluster, corpus.docs, cfg, num_partitions=2)
    check_contract(out, [d["id"] for d in corpus.docs])
    scores = score_clusters(dict(zip(out["id"], out["cluster_id"])), corpus.pairs, threshold=0.8)
    # Hard negatives (Jaccard 0.65-0.79) that share a bucket are merged: precision drops well below 0.99.
    assert scores["precision"] < 0.98 and scores["recall"] >= 0.7, scores


def test_short_empty_and_odd_documents(ray_cluster):
    docs = [
        {"id": "b", "text": "Hello, world!"},
        {"id": "a", "text": "hello world"},  # same single shingle as "b": Jaccard 1
        {"id": "c", "text": ""},
        {"id": "d", "text": ""},  # two empty texts share no shingle: not duplicates
        {"id": "é", "text": "Ünïcode wörds stay wörds here in this line"},
        {"id": "e", "text": "ünïcode WÖRDS stay wörds here in this line"},
    ]
    out = clusters(ray_cluster, docs, num_partitions=2)
    check_contract(out, [d["id"] for d in docs])
    got = dict(zip(out["id"], zip(out["cluster_id"], out["kept"])))
    assert got["a"] == ("a", True) and got["b"] == ("a", False)
    assert got["c"] == ("c", True) and got["d"] == ("d", True)
    assert got["e"] == ("e", True) and got["é"] == ("e", False)


def test_a_hard_negative_centre_does_not_hide_the_duplicates_behind_it():
    texts = [
        " ".join(f"w{i}" for i in range(100)),
        " ".join(f"w{i}" for i in range(100)) + " extra words at the end",
        " ".join(f"w{i}" if i % 7 else "x" for i in range(100)),  # Jaccard ~0.5 with both
    ]
    offsets, values = unique_per_text(*shingle_hashes(pa.array(texts), 5))
    node = np.array([20, 30, 10], dtype=np.uint64)  # the hard negative is the bucket's smallest node
    pack = merge_packs([pack_from_offsets(node, offsets, values)])
    bucket = np.zeros(3, dtype=np.uint64)
    a, b = verified_star_edges(bucket, np.sort(node), pack, threshold=0.8)
    assert list(zip(a.tolist(), b.tolist())) == [(20, 30)]
    a, b = verified_star_edges(bucket, np.sort(node), pack, threshold=0.8, max_rounds=1)
    assert len(a) == 0  # one plain star would have lost the pair


def test_generator_writes_english_like_docs_with_exact_truth(tmp_path):
    corpus = generate_corpus(400, seed=2)
    paths = write_corpus(corpus, tmp_path, shards=3)
    rows = []
    for path in paths:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows.extend(json.loads(line) for line in f)
    assert sorted(r["id"] for r in rows) == sorted({d["id"] for d in corpus.docs})
    assert len(rows) == 400
    assert read_truth(tmp_path / "truth.jsonl.gz") == corpus.pairs
    text = {d["id"]: d["text"] for d in corpus.docs}
    for doc in corpus.docs:
        words = re.findall(r"\w+", doc["text"].lower())
        assert 50 <= len(words) <= 450  # Gopher min_words is 50
        assert 3 <= np.mean([len(w) for w in words]) <= 10
        assert len({"the", "of", "and", "to", "a", "in"} & set(words)) >= 2
        assert doc["text"].endswith(".")
    # The truth is exact: recompute some pairs; near-duplicates and hard negatives are both planted.
    for a, b, j in corpus.pairs[:20]:
        sa, sb = shingle_sets([text[a], text[b]], 5)
        assert j == pytest.approx(len(sa & sb) / len(sa | sb))
    jaccards = np.array([j for _, _, j in corpus.pairs])
    assert np.sum(jaccards >= 0.8) > 50 and np.sum((jaccards >= 0.6) & (jaccards < 0.8)) > 20
    # Documents of different families share (almost) no shingle.
    family_pairs = {(a, b) for a, b, _ in corpus.pairs}
    ids = sorted(text)
    rng = np.random.default_rng(0)
    for x, y in rng.integers(0, len(ids), size=(100, 2)):
        a, b = sorted((ids[x], ids[y]))
        if a != b and (a, b) not in family_pairs:
            sa, sb = shingle_sets([text[a], text[b]], 5)
            assert len(sa & sb) / len(sa | sb) < 0.05
