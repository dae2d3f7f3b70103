"""Sensitive content (`data.sensitive`): per category, a list of words and phrases and a list of RE2
patterns, both matched case-insensitively; a category either drops a document with more matches per
1000 words than its limit, or replaces each match with a mask. Matches per category are written to the
`sensitive_matches` column and counted in the manifest.

Words and phrases match on Unicode word boundaries (a match never starts or ends inside a word; the
spaces of a phrase match any whitespace). Matching is two-step because documents with a match are rare:
one RE2 alternation of every category (pyarrow.compute, C++, vectorized over the batch) finds the
documents that may match, and only those are counted exactly, words with Python's `re` (whose \\w is
Unicode; RE2's \\b is ASCII only) and patterns with RE2. The RE2 step is a superset of the exact one:
it puts \\b only on a word's ASCII edges. benchmarks/curate_stages.py measures the choice, on one
CPU: 450-600 MB/s for the RE2 alternation, about 100 for pyahocorasick (plus a Python check of each
hit's boundaries) and 9 for one Python `re` alternation; the whole stage about 130.
"""

from __future__ import annotations

import re
from importlib.resources import files

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raylm.core import storage
from raylm.core.errors import ConfigError
from raylm.pipelines.config import SensitiveCategoryConfig, SensitiveConfig

# Reject reasons this stage emits: "sensitive[adult]: 3 in 120 words, 25.0 per 1000 > 1.0".
SENSITIVE = "sensitive"
SENSITIVE_REASONS = frozenset({SENSITIVE})
COLUMN = "sensitive_matches"  # struct<category: int32>, null on rows rejected before this stage
SHIPPED = files("raylm.pipelines").joinpath("data").joinpath("sensitive")
REGEX_SPECIALS = frozenset("\\.^$|?*+()[]{}")
ASCII_WORD = re.compile(r"[A-Za-z0-9_]", re.ASCII)


def _literal(entry: str) -> str:
    """A word or phrase as a pattern both engines read alike; a phrase's spaces match any whitespace."""
    escape = lambda part: "".join("\\" + ch if ch in REGEX_SPECIALS else ch for ch in part)  # noqa: E731
    return r"\s+".join(map(escape, entry.split()))


def _may_match(entry: str) -> str:
    """RE2, a superset of the exact match: \\b only where the entry's edge is an ASCII word character."""
    start = r"\b" if ASCII_WORD.match(entry[0]) else ""
    end = r"\b" if ASCII_WORD.match(entry[-1]) else ""
    return f"{start}{_literal(entry)}{end}"


class Category:
    def __init__(self, name: str, cfg: SensitiveCategoryConfig, words: list[str], patterns: list[str]):
        self.name, self.action, self.max_rate = name, cfg.action, cfg.max_per_1000_words
        self.mask = cfg.mask if cfg.mask is not None else f"<{name.upper()}>"
        by_length = sorted(set(words), key=len, reverse=True)  # the longest phrase wins where several fit
        alternation = "|".join(map(_literal, by_length))
        self.words = re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", re.IGNORECASE) if words else None
        self.patterns = "(?i)" + "|".join(f"(?:{p})" for p in patterns) if patterns else None
        self.may_match = "|".join([*map(_may_match, by_length), *(f"(?:{p})" for p in patterns)])

    def count(self, texts: list[str]) -> np.ndarray:
        """Matches per text: words first, then patterns on what the words left (nothing counts twice)."""
        n = np.zeros(len(texts), dtype=np.int64)
        if self.words:
            n += np.fromiter((len(self.words.findall(t)) for t in texts), np.int64, len(texts))
        if self.patterns:
            rest = [self.words.sub("\x00", t) for t in texts] if self.words else texts
            n += pc.count_substring_regex(pa.array(rest, pa.string()), self.patterns).to_numpy()
        return n

    def masked(self, texts: list[str]) -> list[str]:
        if self.words:
            texts = [self.words.sub(lambda _: self.mask, t) for t in texts]
        if self.patterns:
            rewrite = self.mask.replace("\\", "\\\\")  # RE2 reads \1 in a replacement as a group
            texts = pc.replace_substring_regex(
                pa.array(texts, pa.string()), self.patterns, rewrite
            ).to_pylist()
        return texts


def _entries(text: str) -> list[tuple[int, str]]:
    """(line number, entry) of a list file: blank lines and lines starting with # are skipped."""
    lines = ((i, line.strip()) for i, line in enumerate(text.splitlines(), 1))
    return [(i, line) for i, line in lines if line and not line.startswith("#")]


def _check_patterns(entries: list[tuple[int, str]], key: str) -> None:
    empty = pa.array([""], pa.string())
    for line, pattern in entries:
        try:
            matches_empty = pc.match_substring_regex(empty, pattern).to_pylist()[0]
        except pa.ArrowInvalid as exc:
            raise ConfigError(f"{key}: line {line}: not an RE2 pattern: {exc}") from None
        if matches_empty:
            raise ConfigError(f"{key}: line {line}: '{pattern}' matches the empty string")


def _read_list(path: str | None, shipped: str, key: str) -> list[tuple[int, str]]:
    if path is None:
        return _entries(SHIPPED.joinpath(shipped).read_text(encoding="utf-8")) if shipped else []
    if not storage.exists(path):
        raise ConfigError(f"{key}: file not found: {path}")
    return _entries(storage.read_text(path))


def load_categories(cfg: SensitiveConfig) -> list[Category]:
    """The categories with their lists read and checked; raises ConfigError naming the key of a missing
    file, an empty list or a bad pattern (preflight calls it before Ray starts)."""
    categories = []
    for name, c in cfg.categories.items():
        key = f"data.sensitive.categories.{name}"
        shipped = c.words is None and c.patterns is None
        words = _read_list(c.words, f"{name}.txt" if shipped else "", f"{key}.words")
        patterns = _read_list(c.patterns, f"{name}.patterns.txt" if shipped else "", f"{key}.patterns")
        _check_patterns(patterns, f"{key}.patterns")
        if not words and not patterns:
            raise ConfigError(f"{key}: its word and pattern lists are empty")
        categories.append(Category(name, c, [w for _, w in words], [p for _, p in patterns]))
    return categories


class SensitiveContent:
    """Ray Data stage: counts each category's matches on the rows not yet rejected, rejects the rows a
    drop category is over its limit on, and masks the matches of mask categories on the rest."""

    def __init__(self, cfg: SensitiveConfig):
        self.categories = load_categories(cfg)
        self.may_match = "(?i)" + "|".join(f"(?:{c.may_match})" for c in self.categories)
        self.type = pa.struct([(c.name, pa.int32()) for c in self.categories])

    def __call__(self, batch: pa.Table) -> pa.Table:
        text, reject = batch.column("text"), batch.column("reject").to_pylist()
        alive = pc.is_null(batch.column("reject"))
        flagged = pc.fill_null(pc.and_kleene(alive, pc.match_substring_regex(text, self.may_match)), False)
        rows = np.flatnonzero(flagged.to_numpy())
        counts = {c.name: np.zeros(batch.num_rows, dtype=np.int32) for c in self.categories}
        texts = text.take(rows).to_pylist() if rows.size else []
        words = np.array([max(len(t.split()), 1) for t in texts])
        for c in self.categories:
            n = c.count(texts)
            counts[c.name][rows] = n
            if c.action == "drop":
                rate = 1000 * n / np.maximum(words, 1)
                for i in np.flatnonzero(rate > c.max_rate):
                    if reject[rows[i]] is None:
                        reject[rows[i]] = (
                            f"{SENSITIVE}[{c.name}]: {n[i]} in {words[i]} words, {rate[i]:.1f} per 1000 > {c.max_rate}"
                        )
        masked = self._mask(texts, rows, reject, counts)
        if masked:
            new_text = text.to_pylist()
            for row, t in masked.items():
                new_text[row] = t
            batch = batch.set_column(
                batch.schema.get_field_index("text"), "text", pa.array(new_text, pa.string())
            )
        batch = batch.set_column(
            batch.schema.get_field_index("reject"), "reject", pa.array(reject, pa.string())
        )
        dead = pc.invert(alive).to_numpy()
        fields = [pa.array(counts[c.name], pa.int32(), mask=dead) for c in self.categories]
        return batch.append_column(
            COLUMN, pa.StructArray.from_arrays(fields, fields=list(self.type), mask=pa.array(dead))
        )

    def _mask(self, texts: list[str], rows: np.ndarray, reject: list, counts: dict) -> dict[int, str]:
        """New text of the kept rows with matches of a mask category, by row."""
        masked: dict[int, str] = {}
        for c in (c for c in self.categories if c.action == "mask"):
            pick = [i for i, row in enumerate(rows.tolist()) if counts[c.name][row] and reject[row] is None]
            current = [masked.get(int(rows[i]), texts[i]) for i in pick]
            for i, t in zip(pick, c.masked(current)):
                masked[int(rows[i])] = t
        return masked


def block_counts(t: pa.Table) -> dict[str, int]:
    """Per category in one block: matches, documents with a match, and documents it dropped."""
    out: dict[str, int] = {}
    reject = t.column("reject")
    for field in t.schema.field(COLUMN).type:
        n = pc.struct_field(t.column(COLUMN), field.name)
        out[f"{field.name}.matches"] = int(pc.sum(n).as_py() or 0)
        out[f"{field.name}.documents"] = int(pc.sum(pc.greater(n, 0)).as_py() or 0)
        out[f"{field.name}.dropped"] = int(
            pc.sum(pc.starts_with(reject, f"{SENSITIVE}[{field.name}]:")).as_py() or 0
        )
    return out


def summarize(counts: dict[str, int], cfg: SensitiveConfig) -> dict[str, dict]:
    """The manifest's per-category block, from the summed block_counts."""
    return {
        name: {
            "action": c.action,
            **{k: counts.get(f"{name}.{k}", 0) for k in ("matches", "documents", "dropped")},
        }
        for name, c in cfg.categories.items()
    }
