"""MinHash shingles and signatures: the shingle definition, and estimates against exact Jaccard."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from raylm.pipelines.dedup.minhash import (
    jaccard,
    permutations,
    shingle_hashes,
    shingle_sets,
    signatures,
    split_words,
    unique_per_text,
)
from tests.synthetic import generate_corpus


def test_words_are_lowercased_runs_of_letters_digits_underscore():
    offsets, words = split_words(pa.array(["  Hello, World!  ünï_code 42x ", "", None, "...", "a"]))
    assert words.to_pylist() == ["hello", "world", "ünï_code", "42x", "a"]
    assert offsets.tolist() == [0, 4, 4, 4, 4, 5]


def test_shingles_are_word_ngrams_and_short_texts_are_one_shingle():
    sets = shingle_sets(["one two three four", "One, two!", "", "a b a b a b"], ngram=3)
    assert sets[0] == {"one two three", "two three four"}
    assert sets[1] == {"one two"}
    assert sets[2] == set()
    assert sets[3] == {"a b a", "b a b"}


def test_hashed_shingle_sets_match_string_shingle_sets():
    corpus = generate_corpus(60, seed=5, min_words=20, max_words=120)
    texts = [d["text"] for d in corpus.docs] + ["tiny text", ""]
    offsets, hashes = unique_per_text(*shingle_hashes(pa.array(texts), 5))
    assert np.diff(offsets).tolist() == [len(s) for s in shingle_sets(texts, 5)]
    # Exact Jaccard on the hashes equals the Jaccard on the strings.
    ref = shingle_sets(texts[:2], 5)
    expected = len(ref[0] & ref[1]) / len(ref[0] | ref[1])
    assert jaccard(hashes[offsets[0] : offsets[1]], hashes[offsets[1] : offsets[2]]) == pytest.approx(
        expected
    )


def test_word_order_matters():
    _offsets, hashes = shingle_hashes(pa.array(["a b c", "c b a", "a b c"]), 3)
    assert hashes[0] != hashes[1]
    assert hashes[0] == hashes[2]


def test_signatures_estimate_exact_jaccard_without_bias():
    corpus = generate_corpus(1500, seed=3, min_words=80, max_words=200)
    row = {d["id"]: k for k, d in enumerate(corpus.docs)}
    offsets, hashes = shingle_hashes(pa.array([d["text"] for d in corpus.docs]), 5)
    sig = signatures(offsets, hashes, *permutations(128, seed=11))
    errors = np.array([(sig[row[a]] == sig[row[b]]).mean() - j for a, b, j in corpus.pairs])
    assert len(errors) > 300
    # Each estimate is a mean of 128 Bernoulli(J) draws: sd <= 0.5 / sqrt(128) = 0.044.
    assert abs(errors.mean()) < 0.01
    assert errors.std() < 0.05
    assert np.abs(errors).max() < 5 * 0.5 / np.sqrt(128)


def test_signature_of_a_text_does_not_depend_on_its_batch():
    texts = ["the river ran past the old mill and the village", "a b c d e f g", "", "short one"]
    a, b = permutations(64, seed=1)
    together = signatures(*shingle_hashes(pa.array(texts), 5), a, b)
    alone = np.vstack([signatures(*shingle_hashes(pa.array([t]), 5), a, b) for t in texts])
    assert np.array_equal(together, alone)
    assert np.all(together[2] == np.iinfo(np.uint32).max)  # no shingles: no minimum


def test_permutations_are_seeded_and_odd():
    a1, b1 = permutations(128, seed=1)
    a2, _ = permutations(128, seed=1)
    a3, _ = permutations(128, seed=2)
    assert np.array_equal(a1, a2) and not np.array_equal(a1, a3)
    assert np.all(a1 % 2 == 1)
    assert len(np.unique(a1)) == 128 and len(np.unique(b1)) == 128
