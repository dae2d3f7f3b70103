"""Gopher / C4 style quality filters.

A filter only answers `keep(doc) -> True | (False, detail)`. `QualityFilter` (the batch stage) runs the
filters in order on every row that is not already rejected and records the first failure as the row's
`reject` reason, e.g. "min_words: 12 < 50". Counting drops by reason and writing rejected rows happen
once, downstream, for every stage alike (pipelines/run.py).
"""

from __future__ import annotations

import re
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raylm.pipelines.config import FilterConfig

# Gopher's stop-word rule (Rae et al. 2021) uses these; a real English document has at least two.
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "–", "- ", "* ")
WORD = re.compile(r"\w+", re.UNICODE)
ASCII_DIGITS = "0123456789"
# A whitespace-separated word without an ASCII letter (\S+ runs are exactly str.split()'s words).
ASCII_WORD_WITHOUT_LETTER = re.compile(r"(?<!\S)[^\sA-Za-z]+(?!\S)")

Verdict = bool | tuple[bool, str]


class Doc:
    """A document with its word, line and n-gram views computed once and shared by all filters."""

    def __init__(self, text: str):
        self.text = text
        self._gram_ids: dict[int, np.ndarray] = {}

    @cached_property
    def words(self) -> list[str]:
        return self.text.split()

    @cached_property
    def norm_words(self) -> list[str]:
        """Lowercased words stripped of punctuation, for n-gram statistics: the \\w+ runs of each
        whitespace-separated word. One pass over the whole text gives the same list (a \\w+ run never
        spans whitespace, and lowercasing never looks across it)."""
        return WORD.findall(self.text.lower())

    @cached_property
    def lines(self) -> list[str]:
        return [line for line in self.text.split("\n") if line.strip()]

    @cached_property
    def norm_word_lengths(self) -> np.ndarray:
        return np.fromiter(map(len, self.norm_words), dtype=np.int64, count=len(self.norm_words))

    def gram_ids(self, n: int) -> np.ndarray:
        """One id per n-gram of norm_words (position i: words i..i+n-1); equal ids <=> equal n-grams.

        Built from the (n-1)-gram ids, so n-grams are never materialized as tuples: the Counter-of-tuples
        loops this replaces were most of the filters' time (see benchmarks/curate.py)."""
        if n not in self._gram_ids:
            if n == 1:
                index = {w: i for i, w in enumerate(dict.fromkeys(self.norm_words))}
                ids = map(index.__getitem__, self.norm_words)
                self._gram_ids[1] = np.fromiter(ids, dtype=np.int64, count=len(self.norm_words))
            else:
                shorter, words = self.gram_ids(n - 1), self.gram_ids(1)
                # (n-1)-gram id and last word id packed into one int64 (both < len(norm_words)).
                key = shorter[:-1] * max(len(words), 1) + words[n - 1 :]
                self._gram_ids[n] = np.unique(key, return_inverse=True)[1].astype(np.int64)
        return self._gram_ids[n]


class Filter:
    name = "filter"
    reasons: tuple[str, ...] = ()
    """Every reject reason this filter emits (the part before the colon); defaults to (name,)."""

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        if "reasons" not in cls.__dict__ and "name" in cls.__dict__:
            cls.reasons = (cls.name,)

    def keep(self, doc: Doc) -> Verdict:
        raise NotImplementedError


class WordCount(Filter):
    name = "word_count"
    reasons = ("min_words", "max_words")

    def __init__(self, lo: int | None, hi: int | None):
        self.lo, self.hi = lo, hi

    def keep(self, doc: Doc) -> Verdict:
        n = len(doc.words)
        if self.lo is not None and n < self.lo:
            return False, f"min_words: {n} < {self.lo}"
        if self.hi is not None and n > self.hi:
            return False, f"max_words: {n} > {self.hi}"
        return True


class MeanWordLength(Filter):
    name = "mean_word_length"
    reasons = ("mean_word_length", "min_mean_word_length", "max_mean_word_length")

    def __init__(self, lo: float | None, hi: float | None):
        self.lo, self.hi = lo, hi

    def keep(self, doc: Doc) -> Verdict:
        if not doc.words:
            return False, "mean_word_length: no words"
        mean = sum(map(len, doc.words)) / len(doc.words)
        if self.lo is not None and mean < self.lo:
            return False, f"min_mean_word_length: {mean:.2f} < {self.lo}"
        if self.hi is not None and mean > self.hi:
            return False, f"max_mean_word_length: {mean:.2f} > {self.hi}"
        return True


class SymbolWordRatio(Filter):
    name = "max_symbol_word_ratio"

    def __init__(self, limit: float):
        self.limit = limit

    def keep(self, doc: Doc) -> Verdict:
        symbols = doc.text.count("#") + doc.text.count("...") + doc.text.count("…")
        ratio = symbols / max(len(doc.words), 1)
        return ratio <= self.limit or (False, f"{self.name}: {ratio:.3f} > {self.limit}")


class DigitFraction(Filter):
    name = "max_digit_fraction"

    def __init__(self, limit: float):
        self.limit = limit

    def keep(self, doc: Doc) -> Verdict:
        text = doc.text
        # ASCII text (the usual case) counts its ten digits in C; str.isdigit's other digits are not ASCII.
        digits = sum(map(text.count, ASCII_DIGITS)) if text.isascii() else sum(map(str.isdigit, text))
        frac = digits / max(len(text), 1)
        return frac <= self.limit or (False, f"{self.name}: {frac:.3f} > {self.limit}")


class AlphaWords(Filter):
    name = "min_alpha_word_fraction"

    def __init__(self, limit: float):
        self.limit = limit

    def keep(self, doc: Doc) -> Verdict:
        if doc.text.isascii():  # in ASCII, str.isalpha is [A-Za-z]
            with_letter = len(doc.words) - len(ASCII_WORD_WITHOUT_LETTER.findall(doc.text))
        else:
            with_letter = sum(any(map(str.isalpha, w)) for w in doc.words)
        frac = with_letter / max(len(doc.words), 1)
        return frac >= self.limit or (False, f"{self.name}: {frac:.3f} < {self.limit}")


class DuplicateLines(Filter):
    name = "max_duplicate_line_fraction"

    def __init__(self, limit: float):
        self.limit = limit

    def keep(self, doc: Doc) -> Verdict:
        if len(doc.lines) < 2:
            return True
        frac = 1 - len(set(doc.lines)) / len(doc.lines)
        return frac <= self.limit or (False, f"{self.name}: {frac:.3f} > {self.limit}")


class NgramFilter(Filter):
    """Gopher's n-gram repetition rules: for each n, a fraction of the document's characters must stay
    under that n's limit. Subclasses say which fraction."""

    def __init__(self, limits: dict[int, float]):
        self.limits = sorted(limits.items())

    def fraction(self, doc: Doc, n: int, total: int) -> float:
        raise NotImplementedError

    def keep(self, doc: Doc) -> Verdict:
        words = doc.norm_words
        total = sum(map(len, words))
        for n, limit in self.limits:
            if len(words) >= n and total:  # the document has at least one n-gram
                frac = self.fraction(doc, n, total)
                if frac > limit:
                    return False, f"{self.name}[{n}]: {frac:.3f} > {limit}"
        return True


class TopNgram(NgramFilter):
    """The most frequent n-gram must not cover too many of the document's characters."""

    name = "max_top_ngram_fraction"

    def fraction(self, doc, n, total):
        ids = doc.gram_ids(n)
        counts = np.bincount(ids)
        top = int(counts.max())
        if top <= 1:
            return 0.0
        # Of the n-grams with the top count, the one that occurs first (what Counter.most_common picks).
        first = int(np.argmax(counts[ids] == top))
        return top * int(doc.norm_word_lengths[first : first + n].sum()) / total


class DuplicateNgram(NgramFilter):
    """Characters inside n-grams that occur more than once (each word counted once)."""

    name = "max_duplicate_ngram_fraction"

    def fraction(self, doc, n, total):
        ids = doc.gram_ids(n)
        repeated = np.bincount(ids)[ids] > 1  # per n-gram start
        # Word j is covered when a repeated n-gram starts at one of j-n+1 .. j.
        starts = np.concatenate([[0], np.cumsum(repeated)])
        j = np.arange(len(doc.norm_words))
        hi, lo = np.minimum(j, len(ids) - 1) + 1, np.maximum(j - n + 1, 0)
        covered = starts[hi] > starts[lo]
        return int(doc.norm_word_lengths[covered].sum()) / total


class StopWords(Filter):
    name = "min_stop_words"

    def __init__(self, minimum: int):
        self.minimum = minimum

    def keep(self, doc: Doc) -> Verdict:
        found = len(STOP_WORDS.intersection(doc.norm_words))
        return found >= self.minimum or (False, f"{self.name}: {found} < {self.minimum}")


class BulletLines(Filter):
    name = "max_bullet_line_fraction"

    def __init__(self, limit: float):
        self.limit = limit

    def keep(self, doc: Doc) -> Verdict:
        if not doc.lines:
            return True
        frac = sum(line.lstrip().startswith(BULLETS) for line in doc.lines) / len(doc.lines)
        return frac <= self.limit or (False, f"{self.name}: {frac:.3f} > {self.limit}")


def _all_filters(cls: type[Filter] = Filter) -> list[type[Filter]]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_all_filters(sub))]


def build_filters(cfg: FilterConfig) -> list[Filter]:
    """The filters a config switches on, cheapest first so most drops cost little."""
    filters: list[Filter] = []
    if cfg.min_words is not None or cfg.max_words is not None:
        filters.append(WordCount(cfg.min_words, cfg.max_words))
    if cfg.min_mean_word_length is not None or cfg.max_mean_word_length is not None:
        filters.append(MeanWordLength(cfg.min_mean_word_length, cfg.max_mean_word_length))
    optional = [
        (cfg.max_symbol_word_ratio, SymbolWordRatio),
        (cfg.max_digit_fraction, DigitFraction),
        (cfg.min_alpha_word_fraction, AlphaWords),
        (cfg.max_bullet_line_fraction, BulletLines),
        (cfg.max_duplicate_line_fraction, DuplicateLines),
        (cfg.min_stop_words, StopWords),
        (cfg.max_top_ngram_fraction, TopNgram),
        (cfg.max_duplicate_ngram_fraction, DuplicateNgram),
    ]
    filters += [cls(value) for value, cls in optional if value is not None and value != {}]
    return filters


def first_failure(filters: list[Filter], text: str) -> str | None:
    doc = Doc(text)
    for f in filters:
        verdict = f.keep(doc)
        if verdict is not True:
            return verdict[1] if isinstance(verdict, tuple) else f.reasons[0]
    return None


class QualityFilter:
    """Ray Data stage: sets `reject` to the first failing filter's reason on rows not yet rejected."""

    def __init__(self, cfg: FilterConfig):
        self.filters = build_filters(cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        rejects = batch.column("reject").to_pylist()
        out = [r if r is not None else first_failure(self.filters, t) for t, r in zip(texts, rejects)]
        return batch.set_column(batch.schema.get_field_index("reject"), "reject", pa.array(out, pa.string()))


def reason_kind(reason: pa.ChunkedArray) -> pa.ChunkedArray:
    """'min_words: 12 < 50' -> 'min_words' (the part before the colon), for counting drops by reason."""
    return pc.replace_substring_regex(reason, r"[:\[].*$", "")


# Every reason a quality filter may give; curation counts drops by these and fails on any other.
FILTER_REASONS = frozenset(reason for cls in _all_filters() for reason in cls.reasons)
