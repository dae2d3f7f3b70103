"""Text normalization and PII scrubbing as Arrow-native batch stages (pyarrow.compute runs in C++)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from raylm.pipelines.config import NormalizeConfig, PIIConfig

# Control characters other than \t and \n (and the C1 range), plus zero-width and BOM characters.
CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\x{200b}-\x{200d}\x{feff}]"

# RE2 patterns (pyarrow uses RE2). Order matters: emails before IPs, IPs before phone numbers.
EMAIL = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
IPV4 = r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b"
IPV6 = r"\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b|\b(?:[0-9A-Fa-f]{1,4}:){1,7}:(?:[0-9A-Fa-f]{1,4}:){0,6}[0-9A-Fa-f]{1,4}\b"
# International (+CC ...) or North American style numbers with separators; bare digit runs (years,
# counts, ids) are left alone because without separators they are rarely phone numbers.
# Reject reasons this stage emits.
EMPTY_TEXT = "empty_text"
NORMALIZE_REASONS = frozenset({EMPTY_TEXT})

PHONE = r"(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\b\d{2,4}[\s.-])\d{3,4}[\s.-]\d{3,4}\b"


def _only_kept(batch: pa.Table, transform) -> pa.Table:
    """Apply `transform` to the text of rows that are not rejected; rejected rows keep their raw text."""
    text = batch.column("text")
    rejected = pc.is_valid(batch.column("reject"))
    new = pc.if_else(rejected, text, transform(text))
    return batch.set_column(batch.schema.get_field_index("text"), "text", new)


class Normalize:
    """Unicode NFKC, control characters removed, whitespace collapsed; a document that ends up empty
    is rejected as `empty_text`."""

    def __init__(self, cfg: NormalizeConfig):
        self.cfg = cfg

    def _normalize(self, text: pa.ChunkedArray) -> pa.ChunkedArray:
        if self.cfg.nfkc:
            text = pc.utf8_normalize(text, "NFKC")
        if self.cfg.strip_control:
            text = pc.replace_substring_regex(text, CONTROL, "")
        if self.cfg.collapse_whitespace:
            text = pc.replace_substring_regex(text, r"\r\n?", "\n")
            text = pc.replace_substring_regex(text, r"[ \t\f\v\x{a0}]+", " ")
            text = pc.replace_substring_regex(text, r" ?\n ?", "\n")
            text = pc.replace_substring_regex(text, r"\n{3,}", "\n\n")
            text = pc.utf8_trim_whitespace(text)
        return text

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch = _only_kept(batch, self._normalize)
        empty = pc.and_(pc.is_null(batch.column("reject")), pc.equal(pc.utf8_length(batch.column("text")), 0))
        reject = pc.if_else(empty, pa.scalar(EMPTY_TEXT), batch.column("reject"))
        return batch.set_column(batch.schema.get_field_index("reject"), "reject", reject)


class ScrubPII:
    """Replace emails, IP addresses and phone numbers with placeholders."""

    def __init__(self, cfg: PIIConfig):
        self.rules = [(EMAIL, cfg.email), (IPV4, cfg.ip_address), (IPV6, cfg.ip_address), (PHONE, cfg.phone)]

    def _scrub(self, text: pa.ChunkedArray) -> pa.ChunkedArray:
        for pattern, placeholder in self.rules:
            text = pc.replace_substring_regex(text, pattern, placeholder)
        return text

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _only_kept(batch, self._scrub)
