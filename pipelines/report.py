"""The curation data report: report.png (one figure, a panel per view) and report.html (that figure
embedded, with tables of the numbers) next to the curated folder's manifest.

The numbers come from the manifest's fields (counts, drops, language, sensitive, classifiers, dedup,
optional bytes; not the timings, which are in the manifest: the same corpus gives the same report, byte
for byte, as it gives the same documents); the histograms from the folder itself, computed with Ray Data: every block of
docs/ and dedup/clusters.parquet returns a few (histogram, bin, count) rows over fixed bin edges, summed
on the driver, so no process ever holds the documents or the clusters. A panel with no data is left out.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raylm.core import storage
from raylm.core.artifacts import CuratedDir

log = logging.getLogger("raylm")

# Fixed bin edges, so every block bins alike and the driver only adds counts. Words per document: 4 log
# bins per decade from 1 to 10M words; scores: 20 bins over [0, 1]. Values outside go to the end bins.
LENGTH_EDGES = np.logspace(0, 7, 29)
SCORE_EDGES = np.linspace(0.0, 1.0, 21)
WORDS = "words"  # the length histogram's name among the document histograms
TOP_LANGUAGES = 15
# counts keys of optional stages -> the manifest block that is None when the stage did not run
OPTIONAL_STAGES = {
    "after_sensitive": "sensitive",
    "after_language": "language",
    "after_classifiers": "classifiers",
}
STAGE_LABELS = {  # as the summary table names them; another after_* key is named after itself
    "rows_read": "rows read",
    "documents_read": "documents read",
    "after_normalize": "normalize",
    "after_sensitive": "sensitive content",
    "after_language": "language ID",
    "after_filters": "quality filters",
    "after_classifiers": "classifiers",
    "after_exact_dedup": "exact dedup",
    "after_near_dedup": "near dedup",
}
DROP_STAGE_LABELS = {
    "sensitive": "sensitive content",
    "language": "language ID",
    "filters": "quality filters",
}
# The dedup block's removed-document counts, drawn with the cleaning stages' drops.
DEDUP_DROPS = {
    "exact dedup": ("exact_duplicates", "exact_duplicate"),
    "near dedup": ("near_duplicates", "near_duplicate"),
}


# ---- histograms (Ray Data, one tiny table per block) ---------------------------------------------------


def bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The bin of each value ([edges[i], edges[i+1]); the last bin holds its right edge); values below
    the first edge or above the last fall in the end bins."""
    return np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)


def _bin_rows(name: str, bins: np.ndarray) -> dict[str, list]:
    found, n = np.unique(bins, return_counts=True)
    return {"hist": [name] * len(found), "bin": found.tolist(), "n": n.tolist()}


def _block_histograms(t: pa.Table, score_columns: list[str]) -> pa.Table:
    """(hist, bin, n) rows of one block of docs/: words per document, and each score column's values
    (nulls and NaN left out)."""
    # \S+ runs are the quality filters' words (str.split()); counted in C++ without splitting the text.
    words = pc.fill_null(pc.count_substring_regex(t.column("text"), r"\S+"), 0).to_numpy(zero_copy_only=False)
    rows = [_bin_rows(WORDS, bin_index(words, LENGTH_EDGES))]
    for column in score_columns:
        values = pc.drop_null(pc.cast(t.column(column), pa.float64())).to_numpy(zero_copy_only=False)
        rows.append(_bin_rows(column, bin_index(values[~np.isnan(values)], SCORE_EDGES)))
    return pa.table(
        {
            "hist": pa.array([h for r in rows for h in r["hist"]], pa.string()),
            "bin": pa.array([b for r in rows for b in r["bin"]], pa.int64()),
            "n": pa.array([n for r in rows for n in r["n"]], pa.int64()),
        }
    )


def numeric_columns(docs, wanted: list[str]) -> list[str]:
    """The columns of `wanted` that the docs dataset holds as numbers (a missing or non-numeric one is
    logged: a classifier's score column should be there)."""
    schema = docs.schema()
    types = dict(zip(schema.names, schema.types, strict=True))
    found = [c for c in wanted if c in types and _is_number(types[c])]
    if len(found) < len(wanted):
        log.warning("report: no numeric docs/ column for scores %s", sorted(set(wanted) - set(found)))
    return found


def _is_number(t) -> bool:
    t = t if isinstance(t, pa.DataType) else getattr(t, "arrow_dtype", None)  # Ray may wrap Arrow types
    return t is not None and (pa.types.is_floating(t) or pa.types.is_integer(t))


def doc_histograms(docs: str, wanted_scores: list[str]) -> dict[str, np.ndarray]:
    """Documents per bin of words per document (LENGTH_EDGES, key WORDS) and of each numeric score
    column of `wanted_scores` (SCORE_EDGES), over the parquet files of `docs`, in one Ray Data pass that
    reads only those columns."""
    import ray.data

    ds = ray.data.read_parquet(docs, file_extensions=["parquet"])
    scores = numeric_columns(ds, wanted_scores)
    hists = {WORDS: np.zeros(len(LENGTH_EDGES) - 1, np.int64)}
    hists |= {c: np.zeros(len(SCORE_EDGES) - 1, np.int64) for c in scores}
    rows = ds.select_columns(["text", *scores]).map_batches(
        _block_histograms, fn_kwargs={"score_columns": scores}, batch_format="pyarrow"
    )
    for row in rows.take_all():
        hists[row["hist"]][row["bin"]] += row["n"]
    return hists


def _size_counts(t: pa.Table) -> pa.Table:
    counted = pc.value_counts(t.column("count()"))
    return pa.table({"size": counted.field("values"), "n": counted.field("counts")})


def cluster_size_histogram(clusters: str) -> dict[int, int]:
    """Clusters per size (documents sharing a cluster_id; 1 = no duplicate) of a clusters table. Dedup
    keeps exactly one document per cluster (dedup/removal.py), so only the duplicates (kept false) go
    through the groupby over cluster_id, a fraction of the corpus, and a cluster of n has n - 1 of them;
    the clusters without any are the kept documents left over."""
    import ray
    import ray.data

    # A hash shuffle of the ids alone; one partition a CPU, as run.py shuffles (Ray's default is 200).
    parts = max(2, int(ray.cluster_resources().get("CPU", 2)))
    table = ray.data.read_parquet(clusters, columns=["cluster_id", "kept"])
    counted = table.map_batches(_kept_counts, batch_format="pyarrow").take_all()
    kept, duplicates = (sum(int(r[k]) for r in counted) for k in ("kept", "duplicates"))
    totals: dict[int, int] = {}
    if duplicates:
        sizes = (
            table.filter(expr="kept == False")
            .select_columns(["cluster_id"])
            .groupby("cluster_id", num_partitions=parts)
            .count()
        )
        for row in sizes.map_batches(_size_counts, batch_format="pyarrow").take_all():
            totals[int(row["size"]) + 1] = totals.get(int(row["size"]) + 1, 0) + int(row["n"])
    totals[1] = kept - sum(totals.values())  # the clusters of one document
    return {size: n for size, n in sorted(totals.items()) if n}


def _kept_counts(t: pa.Table) -> pa.Table:
    kept = int(pc.sum(t.column("kept")).as_py() or 0)
    return pa.table({"kept": [kept], "duplicates": [t.num_rows - kept]})


@dataclass
class Histograms:
    """What the report draws from the folder (not from the manifest); empty where there is nothing."""

    docs: dict[str, np.ndarray] = field(default_factory=dict)  # WORDS and score columns -> counts per bin
    cluster_sizes: dict[int, int] = field(default_factory=dict)


def score_columns(manifest: dict) -> list[str]:
    """Every column a classifier lists (the classifiers block), and language_score when language ID ran."""
    columns = [c for spec in (manifest.get("classifiers") or {}).values() for c in spec.get("columns", [])]
    if manifest.get("language") is not None:
        columns.append("language_score")
    return list(dict.fromkeys(columns))


def compute_histograms(root: str, manifest: dict) -> Histograms:
    folder, hists = CuratedDir(root), Histograms()
    if storage.list_files(folder.docs, ".parquet"):
        hists.docs = doc_histograms(folder.docs, score_columns(manifest))
    if storage.exists(folder.clusters):
        hists.cluster_sizes = cluster_size_histogram(folder.clusters)
    return hists


# ---- the numbers of the manifest -----------------------------------------------------------------------


def stage_counts(manifest: dict, counts_of: dict | None = None) -> list[tuple[str, int]]:
    """(stage, documents after it) in pipeline order: rows and documents read, then every after_* count
    (an optional stage only when its block says it ran). `counts_of` (e.g. the bytes block) replaces
    the documents with its values, for the stages it has."""
    counts = manifest.get("counts") or {}
    values = counts if counts_of is None else counts_of
    rows = []
    for key in counts:
        if not (key in STAGE_LABELS or key.startswith("after_")) or key not in values:
            continue
        if key in OPTIONAL_STAGES and manifest.get(OPTIONAL_STAGES[key]) is None:
            continue
        rows.append((STAGE_LABELS.get(key, key.removeprefix("after_").replace("_", " ")), int(values[key])))
    return rows


def drop_rows(manifest: dict) -> list[tuple[str, str, int]]:
    """(stage, reason, documents) of every drop: the cleaning stages' reasons, then the duplicates."""
    rows = [
        (DROP_STAGE_LABELS.get(stage, stage), reason, int(n))
        for stage, reasons in (manifest.get("drops") or {}).items()
        for reason, n in sorted(reasons.items())
    ]
    dedup = manifest.get("dedup") or {}
    rows += [(stage, reason, int(dedup[key])) for stage, (key, reason) in DEDUP_DROPS.items() if key in dedup]
    return [r for r in rows if r[2] > 0]


def top_languages(manifest: dict, shown: int = TOP_LANGUAGES) -> list[tuple[str, int]]:
    """The `shown` most frequent language labels, then the rest as one 'N others' row; [] without
    language ID."""
    documents = (manifest.get("language") or {}).get("documents") or {}
    ranked = sorted(documents.items(), key=lambda kv: (-kv[1], kv[0]))
    rest = sum(n for _, n in ranked[shown:])
    return ranked[:shown] + ([(f"{len(ranked) - shown} others", rest)] if rest else [])


# ---- the figure -----------------------------------------------------------------------------------------


@dataclass
class Panel:
    title: str
    draw: Callable  # draw(ax): fills one matplotlib Axes


def _plain(label: str) -> str:
    """A data label as matplotlib text: '$' would start mathtext (and a malformed formula fails the draw)."""
    return str(label).replace("$", r"\$")


def _hbars(ax, labels: list[str], values: list[int], colors=None, xlabel: str = "documents") -> None:
    """Horizontal bars, first label on top, each bar annotated with its value; log scale when the
    values span more than two decades, so a handful next to thousands still shows."""
    y = np.arange(len(values))
    ax.barh(y, values, color=colors)
    ax.set_yticks(y, [_plain(x) for x in labels], fontsize=8)
    ax.invert_yaxis()
    positive = [v for v in values if v > 0]
    if positive and max(positive) > 100 * min(positive):
        ax.set_xscale("log")
    for yi, v in zip(y, values, strict=True):
        ax.annotate(f"{v:,}", (v, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    ax.set_xlabel(xlabel)
    ax.margins(x=0.15)


def _funnel(stages: list[tuple[str, int]], xlabel: str) -> Callable:
    return lambda ax: _hbars(ax, [s for s, _ in stages], [n for _, n in stages], xlabel=xlabel)


def _drops(rows: list[tuple[str, str, int]]) -> Callable:
    stages = list(dict.fromkeys(stage for stage, _, _ in rows))
    colors = [f"C{stages.index(stage) % 10}" for stage, _, _ in rows]  # one color per stage

    def draw(ax) -> None:
        _hbars(ax, [f"{stage}: {reason}" for stage, reason, _ in rows], [n for *_, n in rows], colors)

    return draw


def _stairs(counts: np.ndarray, edges: np.ndarray, xlabel: str, log_x: bool) -> Callable:
    nonzero = np.flatnonzero(counts)
    lo, hi = (nonzero[0], nonzero[-1] + 1) if log_x else (0, len(counts))  # trim empty log bins

    def draw(ax) -> None:
        ax.stairs(counts[lo:hi], edges[lo : hi + 1], fill=True, alpha=0.8)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("documents")

    return draw


def _cluster_sizes(sizes: dict[int, int]) -> Callable:
    def draw(ax) -> None:
        if max(sizes) <= 30:  # a bar per size
            ax.bar(list(sizes), list(sizes.values()), width=0.8)
            ax.set_yscale("log")
            ax.xaxis.get_major_locator().set_params(integer=True)
        else:  # a long tail: points on log-log axes
            ax.loglog(list(sizes), list(sizes.values()), "o", ms=3)
        ax.set_xlabel("cluster size (documents; 1 = no duplicate)")
        ax.set_ylabel("clusters")

    return draw


def panels(manifest: dict, hists: Histograms) -> list[Panel]:
    """The report's views, in reading order; each only when it has data."""
    out = []
    if stages := stage_counts(manifest):
        out.append(Panel("documents per stage", _funnel(stages, "documents")))
    if (text_bytes := manifest.get("bytes")) and (stages := stage_counts(manifest, text_bytes)):
        megabytes = [(s, round(b / 1e6, 2)) for s, b in stages]
        out.append(Panel("text MB per stage", _funnel(megabytes, "MB of text")))
    if drops := drop_rows(manifest):
        out.append(Panel("documents dropped, by stage and reason", _drops(drops)))
    if languages := top_languages(manifest):
        out.append(Panel("language (documents labelled)", _funnel(languages, "documents")))
    words = hists.docs.get(WORDS)
    if words is not None and words.sum():
        title = f"document length, {int(words.sum()):,} kept documents"
        out.append(Panel(title, _stairs(words, LENGTH_EDGES, "words per document", log_x=True)))
    for column, counts in hists.docs.items():
        if column != WORDS and counts.sum():
            title = f"{column}, {int(counts.sum()):,} kept documents"
            out.append(Panel(title, _stairs(counts, SCORE_EDGES, "score", log_x=False)))
    if hists.cluster_sizes:
        n = sum(hists.cluster_sizes.values())
        title = f"duplicate cluster sizes, {n:,} clusters"
        out.append(Panel(title, _cluster_sizes(hists.cluster_sizes)))
    return out


def render_png(views: list[Panel]) -> bytes:
    """One figure, two panels a row, as PNG bytes (the Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, math.ceil(len(views) / 2))
    fig, axes = plt.subplots(rows, 2, figsize=(13, 4.2 * rows), squeeze=False)
    for ax, view in zip(axes.flat, views, strict=False):
        view.draw(ax)
        ax.set_title(_plain(view.title), fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(views) :]:
        ax.set_axis_off()
    if not views:
        axes.flat[0].text(0.5, 0.5, "nothing to show", ha="center", va="center")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


# ---- the page -------------------------------------------------------------------------------------------

STYLE = (
    "body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.2em}"
    "th,td{border:1px solid #ccc;padding:2px 8px}td.n{text-align:right}th{background:#f3f3f3}"
    "img{max-width:100%}"
)


def _cell(value) -> str:
    """One table cell, escaped: integers with thousands separators, right-aligned numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        return f"<td>{html.escape(text)}</td>"
    return f'<td class="n">{value:,}</td>' if isinstance(value, int) else f'<td class="n">{value:,.3f}</td>'


def table(headers: list[str], rows: list[tuple]) -> str:
    """An HTML table of escaped cells; "" without rows (the section is then left out)."""
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _section(title: str, content: str) -> str:
    return f"<h2>{html.escape(title)}</h2>{content}" if content else ""


def _stage_table(manifest: dict) -> str:
    stages = stage_counts(manifest)
    text_bytes = dict(stage_counts(manifest, manifest.get("bytes") or {}))
    rows = [
        (stage, n, (stages[i - 1][1] - n) if i else 0, text_bytes.get(stage, ""))
        for i, (stage, n) in enumerate(stages)
    ]
    return table(["stage", "documents after", "dropped", "text bytes"], rows) if rows else ""


def _block_table(block: dict | None, key: str) -> str:
    """A {name: {field: value}} block (sensitive, classifiers) as one row per name."""
    if not block:
        return ""
    fields = list(dict.fromkeys(f for spec in block.values() for f in spec))
    return table([key, *fields], [(name, *(spec.get(f, "") for f in fields)) for name, spec in block.items()])


def _histogram_tables(hists: Histograms) -> str:
    """The histograms' counts (nonzero bins), folded away under <details> (plain HTML, no script)."""
    parts = []
    for name, counts in hists.docs.items():
        edges, what = (LENGTH_EDGES, "words") if name == WORDS else (SCORE_EDGES, name)
        rows = [(f"{edges[i]:.4g} – {edges[i + 1]:.4g}", int(counts[i])) for i in np.flatnonzero(counts)]
        parts.append(
            f"<details><summary>{html.escape(what)}</summary>{table([what, 'documents'], rows)}</details>"
        )
    if hists.cluster_sizes:
        rows = list(hists.cluster_sizes.items())
        parts.append(
            f"<details><summary>cluster sizes</summary>{table(['size', 'clusters'], rows)}</details>"
        )
    return "".join(parts)


def render_html(manifest: dict, hists: Histograms, views: list[Panel], png: bytes) -> str:
    """A self-contained page: the figure inline (base64), tables of the numbers; no script, nothing
    fetched; every string that comes from the data escaped. Nothing that changes from run to run (the
    timings, the staging folder's path), so reruns and cluster runs compare byte for byte."""
    alt = html.escape("; ".join(v.title for v in views), quote=True)
    sections = [
        _section("Documents per stage", _stage_table(manifest)),
        _section("Drops by reason", table(["stage", "reason", "documents"], drop_rows(manifest))),
        _section("Languages", table(["language", "documents"], top_languages(manifest))),
        _section("Sensitive content", _block_table(manifest.get("sensitive"), "category")),
        _section("Classifiers", _block_table(manifest.get("classifiers"), "classifier")),
        _section("Deduplication", table(["field", "value"], list((manifest.get("dedup") or {}).items()))),
        _section("Histograms", _histogram_tables(hists)),
    ]
    image = base64.b64encode(png).decode("ascii")
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>curation report</title>'
        f"<style>{STYLE}</style></head><body><h1>Curation report</h1>"
        f'<img src="data:image/png;base64,{image}" alt="{alt}">{"".join(sections)}</body></html>\n'
    )


def write_report(root: str, manifest: dict) -> list[str]:
    """report.png and report.html into the curated folder `root` (local or URI) from the manifest's
    fields and Ray Data histograms of root's docs/ and dedup/clusters.parquet; returns their paths."""
    folder = CuratedDir(root)
    hists = compute_histograms(root, manifest)
    views = panels(manifest, hists)
    png = render_png(views)
    storage.write_bytes(folder.report_png, png)
    storage.write_text(folder.report, render_html(manifest, hists, views, png))
    return [folder.report, folder.report_png]
