"""The curation data report: written from a real curated folder, histograms summed over Ray Data blocks
equal to counting the documents directly, labels from the data escaped, panels without data left out."""

import re
import shutil
import time
from collections import Counter

import matplotlib.image
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.core import storage
from raylm.core.artifacts import CuratedDir
from raylm.core.lineage import read_manifest
from raylm.pipelines import report
from raylm.pipelines.report import LENGTH_EDGES, SCORE_EDGES, WORDS, bin_index, write_report

INJECTION = "<script>alert(1)</script>"
IMG_INJECTION = "<img src=x onerror=alert(1)>"


def manifest_fields(root: str) -> dict:
    """The fields run.py hands write_report: the manifest less what write_manifest adds itself."""
    m = read_manifest(root)
    return {k: v for k, v in m.items() if k not in ("kind", "raylm_version", "created_at", "host", "parents")}


def check_png(path: str) -> None:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 800, image.shape


@pytest.mark.slow
def test_report_of_a_curated_folder(curated, tmp_path):
    root = str(tmp_path / "curated")
    shutil.copytree(curated, root)  # the session's curated folder stays as test_curate.py expects it
    fields = manifest_fields(root)
    start = time.perf_counter()
    paths = write_report(root, fields)
    print(f"write_report: {time.perf_counter() - start:.2f} s")
    folder = CuratedDir(root)
    assert paths == [folder.report, folder.report_png]
    check_png(folder.report_png)
    page = storage.read_text(folder.report)
    counts = fields["counts"]
    for stage in ("documents read", "normalize", "quality filters", "exact dedup", "near dedup"):
        assert f"<td>{stage}</td>" in page, stage
    for key in ("documents_read", "after_filters", "after_near_dedup"):
        assert f'<td class="n">{counts[key]:,}</td>' in page, key
    for stage, reasons in fields["drops"].items():
        for reason, n in reasons.items():
            assert f'<td>{reason}</td><td class="n">{n:,}</td>' in page, (stage, reason)
    assert page.count("data:image/png;base64,") == 1 and "<script" not in page and "http" not in page
    # no language ID, sensitive content or classifier in this recipe: none of their panels or tables
    assert "language ID" not in page and "Languages" not in page and "Sensitive" not in page
    assert "language" not in page.split('alt="')[1].split('"')[0]
    check_histogram_tables(page, CuratedDir(curated))


def folded_table(page: str, summary: str) -> list[tuple[str, int]]:
    """The (first cell, count) rows of the table folded under <details><summary>summary</summary>."""
    section = page.split(f"<summary>{summary}</summary>")[1].split("</details>")[0]
    return [
        (a, int(n.replace(",", "")))
        for a, n in re.findall(r"<tr><td[^>]*>([^<]*)</td><td[^>]*>([\d,]+)<", section)
    ]


def check_histogram_tables(page: str, folder: CuratedDir) -> None:
    """The report's histograms (Ray Data, summed over blocks) equal counting the documents directly."""
    texts = pq.read_table(folder.docs, columns=["text"]).column("text").to_pylist()
    words = np.bincount(bin_index(np.array([len(t.split()) for t in texts]), LENGTH_EDGES), minlength=28)
    assert [n for _, n in folded_table(page, "words")] == [int(n) for n in words if n]
    assert sum(n for _, n in folded_table(page, "words")) == len(texts)
    ids = pq.read_table(folder.clusters).column("cluster_id").to_pylist()
    sizes = {int(size): n for size, n in folded_table(page, "cluster sizes")}
    assert sizes == dict(sorted(Counter(Counter(ids).values()).items()))


def test_bin_edges():
    assert bin_index(np.array([0, 1, 1.5, 1e9]), LENGTH_EDGES).tolist() == [0, 0, 0, 27]
    assert bin_index(np.array([-0.1, 0.0, 0.07, 0.52, 0.99, 1.0, 1.5]), SCORE_EDGES).tolist() == [
        0, 0, 1, 10, 19, 19, 19
    ]  # fmt: skip


@pytest.mark.slow
def test_score_and_cluster_histograms_of_hand_made_tables(ray_cluster, tmp_path):
    folder = CuratedDir(str(tmp_path))
    scores = [0.0, 0.07, None, 0.52, float("nan"), 1.0, 0.999]
    docs = pa.table(
        {
            "text": [" ".join(["w"] * (i + 1)) for i in range(len(scores))],
            "topic_tech": pa.array(scores, pa.float32()),
            "topic_label": ["x"] * len(scores),  # not a number: no histogram
        }
    )
    (tmp_path / "docs").mkdir()
    pq.write_table(docs.slice(0, 3), tmp_path / "docs" / "a.parquet")
    pq.write_table(docs.slice(3), tmp_path / "docs" / "b.parquet")
    (tmp_path / "dedup").mkdir()
    cluster_ids = ["a", "a", "b", "c", "a", "c", "d", "d", "c"]  # sizes a 3, b 1, c 3, d 2
    kept = [True, False, True, False, False, True, False, True, False]  # one per cluster, as dedup keeps
    pq.write_table(pa.table({"cluster_id": cluster_ids, "kept": kept}), folder.clusters, row_group_size=4)
    manifest = {
        "classifiers": {"topic": {"labels": ["tech", "label"], "columns": ["topic_tech", "topic_label"]}}
    }
    hists = report.compute_histograms(folder.root, manifest)
    assert set(hists.docs) == {WORDS, "topic_tech"}
    assert {i: int(n) for i, n in enumerate(hists.docs["topic_tech"]) if n} == {0: 1, 1: 1, 10: 1, 19: 2}
    assert hists.docs[WORDS].sum() == len(scores)
    assert hists.cluster_sizes == {1: 1, 2: 1, 3: 2}
    titles = [p.title for p in report.panels(manifest, hists)]
    assert titles == [
        "document length, 7 kept documents",
        "topic_tech, 5 kept documents",
        "duplicate cluster sizes, 4 clusters",
    ]


def counts(**over) -> dict:
    base = dict(rows_read=100, documents_read=98, after_normalize=98, after_sensitive=98, after_language=98)
    return base | dict(after_filters=60, after_exact_dedup=55, after_near_dedup=50) | over


def test_labels_from_the_data_are_escaped(tmp_path):
    """No Ray: a folder without docs/ or clusters draws only the manifest's numbers."""
    manifest = {
        "counts": counts(after_language=90, after_filters=52),
        "drops": {"read": {"malformed_json": 2}, "filters": {INJECTION: 38}, "language": {"language": 8}},
        "language": {"documents": {"en": 90, IMG_INJECTION: 5, "$\\frac{$": 3}},  # '$': no mathtext error
        "sensitive": {"<b>adult</b>": {"action": "drop", "matches": 0, "documents": 0, "dropped": 0}},
    }
    html_path, png_path = write_report(str(tmp_path), manifest)
    check_png(png_path)
    page = storage.read_text(html_path)
    assert INJECTION not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert IMG_INJECTION not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<b>" not in page and "&lt;b&gt;adult&lt;/b&gt;" in page and page.count("<img") == 1
    titles = [p.title for p in report.panels(manifest, report.Histograms())]
    assert titles == [
        "documents per stage",
        "documents dropped, by stage and reason",
        "language (documents labelled)",
    ]


def test_manifest_without_optional_blocks(tmp_path):
    manifest = {
        "counts": counts(),
        "drops": {"filters": {"min_words": 38}},
        "language": None,
        "sensitive": None,
    }
    views = report.panels(manifest, report.Histograms())
    assert [p.title for p in views] == ["documents per stage", "documents dropped, by stage and reason"]
    stages = [s for s, _ in report.stage_counts(manifest)]  # stages that did not run are not drawn
    assert stages == [
        "rows read",
        "documents read",
        "normalize",
        "quality filters",
        "exact dedup",
        "near dedup",
    ]
    with_bytes = manifest | {"bytes": {"rows_read": 5_000_000, "after_near_dedup": 2_000_000}}
    assert "text MB per stage" in [p.title for p in report.panels(with_bytes, report.Histograms())]
    long_tail = report.Histograms({WORDS: np.arange(28)}, {1: 100, 2: 10, 500: 1})
    assert len(report.panels({}, long_tail)) == 2 and report.render_png(report.panels({}, long_tail))
    for fields in (manifest, with_bytes, {}):  # nothing at all still gives a (near-empty) report
        html_path, png_path = write_report(str(tmp_path), fields)
        check_png(png_path)
        assert storage.read_text(html_path).startswith("<!doctype html>")
