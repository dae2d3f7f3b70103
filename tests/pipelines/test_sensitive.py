"""Sensitive content (pipelines/sensitive.py) on small tables without Ray: word boundaries, case, phrases,
patterns, drop and mask, the per-category counts, and the errors a bad list gives. The curate run with
this stage is in test_langid.py (one run for both new stages)."""

import numpy as np
import pyarrow as pa
import pytest

from raylm.core.config import build_config
from raylm.core.errors import ConfigError
from raylm.pipelines.config import SensitiveConfig
from raylm.pipelines.filters import reason_kind
from raylm.pipelines.sensitive import (
    COLUMN,
    SENSITIVE_REASONS,
    SensitiveContent,
    block_counts,
    load_categories,
    summarize,
)
from tests.pipelines.test_langid import SAMPLE


def table(texts, reject=None) -> pa.Table:
    return pa.table({"text": texts, "reject": pa.array(reject or [None] * len(texts), pa.string())})


def lists(tmp_path, words: str = "", patterns: str = "") -> dict:
    (tmp_path / "words.txt").write_text(words)
    (tmp_path / "patterns.txt").write_text(patterns)
    return {"words": str(tmp_path / "words.txt"), "patterns": str(tmp_path / "patterns.txt")}


def counts(out: pa.Table, category: str) -> list:
    return [m[category] if m else None for m in out.column(COLUMN).to_pylist()]


def test_words_match_whole_words_in_any_case_and_phrases_across_whitespace(tmp_path):
    words = "# a comment, then a blank line\n\nugh\nbad word\ncafé\nc++\n"
    stage = SensitiveContent(
        SensitiveConfig(categories={"rude": {**lists(tmp_path, words), "action": "mask"}})
    )
    texts = [
        "UGH! Ugh, ugh.",  # 3: any case, punctuation around
        "ughs thugh _ugh ugh_ ugh2",  # 0: inside longer words (\w includes digits and _)
        "A Bad   word, a bad\nword; badword.",  # 2: a phrase's space matches any whitespace
        "Café! cafés écafé",  # 1: Unicode word boundaries (RE2's \b alone would find 2 or 3)
        "c++ and C++",  # 2: entries with regex characters are literal
    ]
    assert counts(stage(table(texts)), "rude") == [3, 0, 2, 1, 2]


def test_the_fast_prefilter_misses_nothing_the_exact_match_finds(tmp_path):
    """The stage counts only rows its RE2 alternation flags; counting every row exactly gives the same."""
    words = "ugh\nbad word\ncafé\nélan\nnaïve\nstraße\n"
    stage = SensitiveContent(SensitiveConfig(categories={"x": lists(tmp_path, words, r"\bz[0o]rk\b")}))
    rng = np.random.default_rng(0)
    pieces = [
        "ugh",
        "UGH",
        "bad word",
        "bad  word",
        "café",
        "CAFÉ",
        "élan",
        "naïve",
        "straße",
        "STRASSE",
        "z0rk",
    ]
    pieces += ["a", "thugh", "cafés", "xélan", "-", "é", "_", "ß", "!", "\n", "zork"]
    texts = [
        "".join(rng.choice(pieces, size=12)) + " " + " ".join(rng.choice(pieces, size=12)) for _ in range(300)
    ]
    exact = stage.categories[0].count(texts)
    assert counts(stage(table(texts)), "x") == exact.tolist() and exact.sum() > 100


def test_patterns_match_case_insensitively_and_never_count_a_word_twice(tmp_path):
    cfg = lists(tmp_path, "fudge\n", r"\bf+u+d+g+e+\b" + "\n" + r"\b\d{3}-gore\b")
    stage = SensitiveContent(SensitiveConfig(categories={"x": {**cfg, "action": "mask", "mask": r"[\1]"}}))
    out = stage(table(["fudge FUUUDGE fudges 123-GORE", "nothing"]))
    assert counts(out, "x") == [3, 0]
    assert out.column("text").to_pylist() == [r"[\1] [\1] fudges [\1]", "nothing"]  # the mask is literal text


def test_drop_above_the_rate_mask_the_rest_and_leave_rejected_rows_alone(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "m").mkdir()
    cfg = SensitiveConfig(
        categories={
            "spam": {**lists(tmp_path / "d", "buy now\n"), "max_per_1000_words": 10},
            "rude": {**lists(tmp_path / "m", "ugh\n"), "action": "mask"},
        }
    )
    filler = " ".join(["word"] * 198)
    texts = [
        f"buy now {filler}",  # 1 in 200 words = 5 per 1000: kept
        "buy now, ugh, buy now " + " ".join(["word"] * 100),  # 2 in 105 words = 19 per 1000: dropped
        f"ugh {filler}",  # masked
        "buy now ugh",  # rejected before this stage: untouched
    ]
    out = SensitiveContent(cfg)(table(texts, [None, None, None, "min_words: 3 < 50"])).to_pylist()
    assert out[0]["reject"] is None and out[0]["text"] == texts[0]
    assert out[1]["reject"] == "sensitive[spam]: 2 in 105 words, 19.0 per 1000 > 10.0"
    assert out[1]["text"] == texts[1]  # a dropped row keeps its text, so rejects/ show what matched
    assert out[2]["reject"] is None and out[2]["text"] == f"<RUDE> {filler}"
    assert out[3] == {"text": "buy now ugh", "reject": "min_words: 3 < 50", COLUMN: None}
    assert [r[COLUMN] for r in out[:3]] == [
        {"spam": 1, "rude": 0},
        {"spam": 2, "rude": 1},
        {"spam": 0, "rude": 1},
    ]
    assert set(reason_kind(pa.chunked_array([[out[1]["reject"]]])).to_pylist()) <= SENSITIVE_REASONS
    summary = summarize(block_counts(pa.Table.from_pylist(out)), cfg)
    assert summary == {
        "spam": {"action": "drop", "matches": 3, "documents": 2, "dropped": 1},
        "rude": {"action": "mask", "matches": 2, "documents": 2, "dropped": 0},
    }


def test_the_shipped_english_lists(tmp_path):
    categories = load_categories(SensitiveConfig())
    assert [c.name for c in categories] == ["profanity", "adult", "violence"]
    assert all(c.words and c.patterns for c in categories)
    stage = SensitiveContent(SensitiveConfig())
    clean = [s for sentences in SAMPLE.values() for s in sentences]
    clean += [
        "Kill the process, execute the script, then abort and shoot a screenshot of the attack surface."
    ]
    assert not any(any(m.values()) for m in stage(table(clean)).column(COLUMN).to_pylist())
    hits = stage(table(["What the fuuuck.", "Explicit PORNOGRAPHY ahead.", "The massacre of the village."]))
    assert [max(m, key=m.get) for m in hits.column(COLUMN).to_pylist()] == ["profanity", "adult", "violence"]


def test_a_bad_list_fails_before_ray_starts_naming_the_key(tmp_path):
    def categories(**x):
        return SensitiveConfig(categories={"x": x})

    with pytest.raises(
        ConfigError, match=r"data\.sensitive\.categories\.x\.patterns: line 2: not an RE2 pattern"
    ):
        load_categories(categories(**lists(tmp_path, "ok\n", "fine\n(unclosed\n")))
    with pytest.raises(ConfigError, match=r"categories\.x\.patterns: line 1: .* matches the empty string"):
        load_categories(categories(**lists(tmp_path, "", "a*\n")))
    with pytest.raises(ConfigError, match=r"categories\.x\.words: file not found"):
        load_categories(categories(words=str(tmp_path / "absent.txt")))
    with pytest.raises(ConfigError, match=r"categories\.x: its word and pattern lists are empty"):
        load_categories(categories(**lists(tmp_path, "# only a comment\n")))
    data = {"sources": [{"path": "builtin:python-docs"}], "sensitive": {"categories": {"hate": {}}}}
    with pytest.raises(ConfigError, match=r"data\.sensitive.*category 'hate' has no shipped lists"):
        build_config({"name": "t", "data": data})
    assert build_config({"name": "t", "data": {**data, "sensitive": {}}}).data.sensitive.enabled
