import pyarrow as pa
import pytest

from raylm.pipelines.config import FilterConfig
from raylm.pipelines.filters import (
    AlphaWords,
    BulletLines,
    DigitFraction,
    Doc,
    DuplicateLines,
    DuplicateNgram,
    MeanWordLength,
    QualityFilter,
    StopWords,
    SymbolWordRatio,
    TopNgram,
    WordCount,
)

GOOD = (
    "The river ran through the village and the children of the town played with stones near the water. "
    "In the summer the market was full of people who came to trade bread, cloth and tools with each other."
)


@pytest.mark.parametrize(
    "flt, bad, reason",
    [
        (WordCount(5, 50), "too short", "min_words"),
        (WordCount(1, 40), " ".join(["word"] * 41), "max_words"),
        (MeanWordLength(3, 10), "a b c d e f g", "min_mean_word_length"),
        (MeanWordLength(3, 10), "supercalifragilistic antidisestablishment", "max_mean_word_length"),
        (SymbolWordRatio(0.1), "# heading # more # tags here ...", "max_symbol_word_ratio"),
        (DigitFraction(0.25), "1234 5678 9012 and a", "max_digit_fraction"),
        (AlphaWords(0.8), "12 34 56 -- ok", "min_alpha_word_fraction"),
        (DuplicateLines(0.3), "same line\nsame line\nsame line\nother", "max_duplicate_line_fraction"),
        (TopNgram({2: 0.2}), "buy now buy now buy now buy now cheap", "max_top_ngram_fraction"),
        (DuplicateNgram({5: 0.15}), "a b c d e f a b c d e f x y", "max_duplicate_ngram_fraction"),
        (StopWords(2), "river mountain garden window letter", "min_stop_words"),
        (BulletLines(0.9), "• one\n• two\n• three", "max_bullet_line_fraction"),
    ],
)
def test_each_filter_rejects_its_case_and_keeps_good_text(flt, bad, reason):
    verdict = flt.keep(Doc(bad))
    assert verdict is not True and verdict[1].startswith(reason)
    assert flt.keep(Doc(GOOD)) is True


def test_quality_filter_stage_reports_first_failure_and_skips_rejected():
    batch = pa.table(
        {
            "id": ["a", "b", "c"],
            "text": [GOOD, "short text", "x"],
            "source": ["s"] * 3,
            "reject": pa.array([None, None, "malformed_json: x"], pa.string()),
        }
    )
    out = QualityFilter(FilterConfig(min_words=10))(batch).column("reject").to_pylist()
    assert out == [None, "min_words: 2 < 10", "malformed_json: x"]


def test_null_thresholds_switch_rules_off():
    cfg = FilterConfig(
        min_words=None,
        max_words=None,
        min_stop_words=None,
        min_mean_word_length=None,
        max_mean_word_length=None,
        min_alpha_word_fraction=None,
    )
    out = QualityFilter(cfg)(
        pa.table({"id": ["a"], "text": ["ok"], "source": ["s"], "reject": pa.array([None], pa.string())})
    )
    assert out.column("reject").to_pylist() == [None]
