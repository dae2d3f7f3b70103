"""The table printed when curation ends: documents in and out per stage, time and throughput."""

from __future__ import annotations

from dataclasses import dataclass

from raylm.core import metrics


@dataclass
class StageRow:
    stage: str
    docs_in: int
    docs_out: int
    seconds: float | None = None
    bytes_in: int | None = None


def render_summary(rows: list[StageRow], total_s: float, total_bytes: int) -> str:
    header = f"{'stage':<18}{'docs in':>10}{'docs out':>10}{'dropped':>10}{'time s':>9}{'MB/s':>8}"
    lines = ["", "curation summary", header, "-" * len(header)]
    for r in rows:
        secs = f"{r.seconds:.1f}" if r.seconds is not None else ""
        rate = f"{r.bytes_in / 1e6 / r.seconds:.1f}" if r.bytes_in and r.seconds else ""
        lines.append(
            f"{r.stage:<18}{r.docs_in:>10,}{r.docs_out:>10,}{r.docs_in - r.docs_out:>10,}{secs:>9}{rate:>8}"
        )
    lines.append("-" * len(header))
    lines.append(f"{'total':<18}{'':>30}{total_s:>9.1f}{total_bytes / 1e6 / max(total_s, 1e-9):>8.2f}")
    return "\n".join(lines)


def record_stages(rows: list[StageRow], run: str) -> None:
    """The table's rows as the per-stage gauges of core/metrics.py."""
    for r in rows:
        tags = {"run": run, "stage": r.stage}
        metrics.record(metrics.CURATE_STAGE_DOCUMENTS_IN, r.docs_in, tags)
        metrics.record(metrics.CURATE_STAGE_DOCUMENTS_OUT, r.docs_out, tags)
        if r.seconds is not None:
            metrics.record(metrics.CURATE_STAGE_SECONDS, r.seconds, tags)


def languages_line(languages: dict[str, int], shown: int = 6) -> str:
    """The most frequent language labels, when language ID ran: 'languages: en 2,401, de 3, ... and 92
    in 25 other languages'."""
    if not languages:
        return ""
    top = sorted(languages.items(), key=lambda kv: (-kv[1], kv[0]))
    rest = sum(n for _, n in top[shown:])
    more = f" and {rest:,} in {len(top) - shown} other languages" if rest else ""
    return "\nlanguages: " + ", ".join(f"{k} {n:,}" for k, n in top[:shown]) + more


def sensitive_line(categories: dict[str, dict] | None) -> str:
    """Matches per sensitive-content category, when the stage ran: 'sensitive content: adult 3 matches
    in 2 documents, 2 dropped; profanity 5 matches in 4 documents, masked'."""
    if categories is None:
        return ""
    parts = [
        f"{name} {c['matches']:,} matches in {c['documents']:,} documents, "
        + (f"{c['dropped']:,} dropped" if c["action"] == "drop" else "masked")
        for name, c in categories.items()
    ]
    return "\nsensitive content: " + "; ".join(parts)


def classifiers_line(classifiers: dict[str, dict] | None) -> str:
    """Documents scored, mean scores and drops per classifier, when any ran: 'classifiers: quality 1,204
    scored (mean quality_hq 0.71, quality_lq 0.29), 56 dropped (quality_hq 56)'."""
    if not classifiers:
        return ""
    parts = []
    for name, c in classifiers.items():
        means = ", ".join(f"{col} {m:.2f}" for col, m in c["mean"].items() if m is not None)
        dropped = sum(c["drops"].values())
        by_column = ", ".join(f"{col} {n:,}" for col, n in c["drops"].items() if n)
        parts.append(
            f"{name} {c['documents_scored']:,} scored"
            + (f" (mean {means})" if means else "")
            + f", {dropped:,} dropped"
            + (f" ({by_column})" if by_column else "")
        )
    return "\nclassifiers: " + "; ".join(parts)
