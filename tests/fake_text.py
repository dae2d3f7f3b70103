"""Word-salad text for the tests: a small fixed vocabulary, so a tokenizer trained on it is tiny and
every test that tokenizes generated text sees the same words."""

from __future__ import annotations

import random

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


def sample_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."
