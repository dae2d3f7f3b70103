"""Synthetic text for the tests and the benchmarks (never installed with raylm): the one place text is made up.

Two generators:
- `sample_text` / `document`: word salad from a small fixed vocabulary (WORDS), so a tokenizer trained
  on it is tiny and every test that tokenizes generated text sees the same words.
- `generate_corpus`: English-looking corpora with planted near-duplicates and exact ground truth, for
  the dedup tests and benchmarks (described below).


A corpus is made of families. A unique document is a family of one. A duplicate family is a base
document plus edited variants: near-duplicates (a few scattered word substitutions, insertions and
deletions, sometimes a sentence added or dropped: exact Jaccard mostly 0.85-0.98 with the base) and
hard negatives (more edits: Jaccard mostly 0.65-0.79, just below a 0.8 threshold). Text is English-
looking: words drawn Zipf-like from ~2,900 common English words (stop words most frequent), sentences
of 6-20 words with a capital and a period, paragraphs of 3-6 sentences; it passes Gopher-style filters.

Ground truth: the exact Jaccard (on the shingles of pipelines/dedup/minhash.py) of every pair inside a
family. Documents of different families are independent random text, whose 5-gram Jaccard is ~0 (the
tests check a sample). Ids are `doc-NNNNNNN`, assigned in a shuffled order so a family's base is not
systematically its smallest id.

CLI: python -m tests.synthetic OUT_DIR --docs 50000 [--shards 8] [--seed 0]
writes OUT_DIR/docs-0000N.jsonl.gz ({"id", "text"}) and OUT_DIR/truth.jsonl.gz ({"a", "b", "jaccard"}).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raylm.pipelines.dedup.minhash import shingle_sets

COMMON_WORDS: list[str] = (Path(__file__).with_name("synthetic_words.txt")).read_text().split()
"""~2,900 common English words, stop words first (the Zipf-like corpora draw from these)."""

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "it",
    "an",
    "be",
    "this",
    "are",
    "or",
    "which",
    "have",
    "not",
    "his",
    "model",
    "data",
    "train",
    "cluster",
    "worker",
    "token",
    "shard",
    "serve",
    "batch",
    "layer",
    "weight",
    "gradient",
    "loss",
    "step",
    "ray",
    "node",
    "river",
    "mountain",
    "garden",
    "window",
    "letter",
    "morning",
    "summer",
    "winter",
    "market",
    "village",
    "city",
    "road",
    "forest",
    "stone",
]
"""A small vocabulary for word salad: tokenizers trained on it stay tiny."""


def sample_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


def document(rng: random.Random, n_words: int = 120) -> str:
    """Word salad in capitalized sentences of 12 words, which passes the Gopher-style quality filters."""
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return " ".join(" ".join(words[i : i + 12]).capitalize() + "." for i in range(0, n_words, 12))


@dataclass
class SyntheticCorpus:
    docs: list[dict[str, str]]
    """Rows {"id", "text"}."""
    pairs: list[tuple[str, str, float]] = field(default_factory=list)
    """(id_a, id_b, exact Jaccard) for every pair of documents inside a family, id_a < id_b."""
    ngram: int = 5
    """n of the word n-gram shingles the Jaccards were computed on."""

    def duplicate_pairs(self, threshold: float) -> set[tuple[str, str]]:
        """Pairs (id_a < id_b) whose exact Jaccard is >= threshold."""
        return {(a, b) for a, b, j in self.pairs if j >= threshold}


class _TextSampler:
    """Zipf-like word draws (rank r has weight 1 / (r + 5)), grouped into sentences and paragraphs."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        weights = 1.0 / (np.arange(len(COMMON_WORDS)) + 5.0)
        self.cdf = np.cumsum(weights / weights.sum())

    def words(self, n: int) -> list[str]:
        idx = np.searchsorted(self.cdf, self.rng.random(n))
        return [COMMON_WORDS[i] for i in np.minimum(idx, len(COMMON_WORDS) - 1)]

    def sentences(self, n_words: int) -> list[list[str]]:
        words = self.words(n_words)
        out, i = [], 0
        while i < len(words):
            size = int(self.rng.integers(6, 21))
            out.append(words[i : i + size])
            i += size
        return out


def render(sentences: list[list[str]], rng: np.random.Generator) -> str:
    """Sentences -> text: capitalized, period-terminated, paragraphs of 3-6 sentences."""
    paragraphs, current, size = [], [], int(rng.integers(3, 7))
    for words in sentences:
        if not words:
            continue
        current.append(" ".join([words[0].capitalize(), *words[1:]]) + ".")
        if len(current) == size:
            paragraphs.append(" ".join(current))
            current, size = [], int(rng.integers(3, 7))
    if current:
        paragraphs.append(" ".join(current))
    return "\n".join(paragraphs)


def edit(
    sentences: list[list[str]], rate: float, sampler: _TextSampler, rng: np.random.Generator
) -> list[list[str]]:
    """A variant: each word is substituted, deleted or followed by an inserted word with total
    probability `rate` (at least one edit); sometimes a sentence is appended or one is dropped."""
    total = sum(len(s) for s in sentences)
    hit = rng.random(total) < rate
    hit[rng.integers(total)] = True
    kinds = rng.integers(0, 3, size=total)  # 0 substitute, 1 delete, 2 insert after
    fresh = iter(sampler.words(int(hit.sum())))
    out, position = [], 0
    for words in sentences:
        new = []
        for w in words:
            if not hit[position]:
                new.append(w)
            elif kinds[position] == 0:
                new.append(next(fresh))
            elif kinds[position] == 2:
                new.extend([w, next(fresh)])
            position += 1
        out.append(new)
    structural = rng.random()
    if structural < 0.15:
        out.append(sampler.words(int(rng.integers(6, 15))))
    elif structural < 0.25 and len(out) > 8:
        del out[int(rng.integers(len(out)))]
    return out


def generate_corpus(
    num_docs: int,
    seed: int = 0,
    duplicate_fraction: float = 0.5,
    hard_negative_share: float = 0.25,
    min_words: int = 80,
    max_words: int = 400,
    ngram: int = 5,
) -> SyntheticCorpus:
    """Generate `num_docs` documents; about `duplicate_fraction` of them belong to families of 2-6
    documents, where `hard_negative_share` of the variants are hard negatives."""
    rng = np.random.default_rng(seed)
    sampler = _TextSampler(rng)
    families: list[list[list[list[str]]]] = []
    produced = 0
    while produced < num_docs:
        base = sampler.sentences(int(rng.integers(min_words, max_words + 1)))
        family = [base]
        if rng.random() < duplicate_fraction / (4 - 3 * duplicate_fraction):  # families average 4 docs
            for _ in range(min(int(rng.integers(1, 6)), num_docs - produced - 1)):
                hard = rng.random() < hard_negative_share
                rate = rng.uniform(0.028, 0.05) if hard else rng.uniform(0.002, 0.009)
                family.append(edit(base, rate, sampler, rng))
        families.append(family)
        produced += len(family)
    ids = [f"doc-{i:07d}" for i in rng.permutation(produced)]
    docs, pairs, k = [], [], 0
    pending: list[list[int]] = []  # families (as doc indices) whose pairs are not yet measured
    for family in families:
        pending.append(list(range(len(docs), len(docs) + len(family))))
        docs.extend({"id": ids[k + m], "text": render(s, rng)} for m, s in enumerate(family))
        k += len(family)
        if len(pending) >= 256 or k == produced:
            pairs.extend(_family_pairs(docs, [f for f in pending if len(f) > 1], ngram))
            pending = []
    order = rng.permutation(len(docs))  # families are not contiguous in the files
    return SyntheticCorpus(docs=[docs[i] for i in order], pairs=pairs, ngram=ngram)


def _family_pairs(docs: list[dict[str, str]], families: list[list[int]], ngram: int) -> list:
    """Exact Jaccard of every pair inside each family (shingles of a few hundred families at a time)."""
    members = [i for f in families for i in f]
    sets = dict(zip(members, shingle_sets([docs[i]["text"] for i in members], ngram))) if members else {}
    pairs = []
    for family in families:
        for x, i in enumerate(family):
            for j in family[x + 1 :]:
                inter = len(sets[i] & sets[j])
                a, b = sorted((docs[i]["id"], docs[j]["id"]))
                pairs.append((a, b, inter / (len(sets[i]) + len(sets[j]) - inter)))
    return pairs


def write_corpus(
    corpus: SyntheticCorpus, out_dir: str | Path, shards: int = 8, compress: bool = True
) -> list[Path]:
    """Write docs as `shards` jsonl(.gz) files and the truth pairs as truth.jsonl(.gz); returns doc paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ".jsonl.gz" if compress else ".jsonl"
    opener = gzip.open if compress else open
    paths = []
    for s in range(shards):
        path = out / f"docs-{s:05d}{suffix}"
        with opener(path, "wt", encoding="utf-8") as f:
            for row in corpus.docs[s::shards]:
                f.write(json.dumps(row) + "\n")
        paths.append(path)
    with opener(out / f"truth{suffix}", "wt", encoding="utf-8") as f:
        for a, b, j in corpus.pairs:
            f.write(json.dumps({"a": a, "b": b, "jaccard": j}) + "\n")
    return paths


def union_find(ids: list[str], edges: list[tuple[str, str]]) -> dict[str, str]:
    """Union-find: id -> representative of its connected component (the smallest id, as in raylm)."""
    parent = {i: i for i in ids}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {i: find(i) for i in ids}


def _same_cluster_pairs(labels: dict[str, str]) -> int:
    sizes = Counter(labels.values())
    return sum(n * (n - 1) // 2 for n in sizes.values())


def score_clusters(
    cluster_of: dict[str, str], pairs: list[tuple[str, str, float]], threshold: float
) -> dict[str, float]:
    """Pair-level precision / recall / F1 of predicted clusters against the exact ground truth.

    Truth: two documents belong together when they are connected by a chain of pairs whose exact
    Jaccard is >= threshold (the connected components of the threshold graph, which is what a
    clustering can express). Predicted: two documents belong together when they share a cluster_id.
    precision = |predicted pairs & true pairs| / |predicted pairs|, recall = ... / |true pairs|.
    `direct_recall` is the fraction of pairs with Jaccard >= threshold that share a predicted cluster.
    """
    ids = list(cluster_of)
    truth = union_find(ids, [(a, b) for a, b, j in pairs if j >= threshold])
    predicted = _same_cluster_pairs(cluster_of)
    true = _same_cluster_pairs(truth)
    both = _same_cluster_pairs({i: f"{cluster_of[i]}\0{truth[i]}" for i in ids})
    direct = [(a, b) for a, b, j in pairs if j >= threshold]
    precision = both / predicted if predicted else 1.0
    recall = both / true if true else 1.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "direct_recall": sum(cluster_of[a] == cluster_of[b] for a, b in direct) / len(direct)
        if direct
        else 1.0,
        "predicted_pairs": predicted,
        "true_pairs": true,
    }


def read_truth(path: str | Path) -> list[tuple[str, str, float]]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [(r["a"], r["b"], r["jaccard"]) for r in map(json.loads, f)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--docs", type=int, default=50_000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-words", type=int, default=80)
    parser.add_argument("--max-words", type=int, default=400)
    parser.add_argument("--no-compress", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    corpus = generate_corpus(args.docs, seed=args.seed, min_words=args.min_words, max_words=args.max_words)
    paths = write_corpus(corpus, args.out_dir, shards=args.shards, compress=not args.no_compress)
    size = sum(len(d["text"].encode()) for d in corpus.docs)
    print(
        f"{len(corpus.docs)} docs, {size / 1e6:.1f} MB of text, {len(paths)} shards, "
        f"{time.perf_counter() - start:.1f} s -> {args.out_dir}"
    )


if __name__ == "__main__":
    main()
