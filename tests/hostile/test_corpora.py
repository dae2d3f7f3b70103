"""A hostile corpus through one real curation run (Ray Data on the session's Ray): binary files under
every extension, truncated and corrupt gzip, parquet files with the wrong schema, null / numeric / nested
text fields, byte-order marks, a 3 MB line, symlink loops, ... (tests/hostile/corpus_gen.py, seeded),
each mixed in with valid documents. Nothing valid is lost (every valid id is in docs/), every malformed
row or file is in rejects/ with its reason at its line, skipped files are counted by reason, and the run
itself does not fail."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest

from raylm.core.artifacts import CuratedDir
from raylm.core.config import build_config
from raylm.core.lineage import read_manifest
from raylm.pipelines import readers
from raylm.pipelines.run import run
from tests.hostile import corpus_gen

pytestmark = pytest.mark.slow
ENTRY = "corpora (curate)"


@pytest.fixture(scope="module")
def curated(ray_cluster, tmp_path_factory):
    corpus = tmp_path_factory.mktemp("hostile-corpus")
    expected = corpus_gen.build(corpus)
    cfg = build_config(
        {
            "name": "hostile",
            "run_dir": str(tmp_path_factory.mktemp("hostile-run")),
            "data": {
                "sources": [{"path": str(corpus)}],
                "seq_len": 32,
                "tokenizer": {"vocab_size": 300},
                "near_dedup": {"enabled": False},
            },
        }
    )
    run(cfg)
    out = CuratedDir(cfg.data.output)
    return expected, read_manifest(cfg.data.output), pq.read_table(out.docs), pq.read_table(out.rejects)


def test_nothing_valid_is_lost(curated, tally):
    expected, _, docs, _ = curated
    kept = set(docs["id"].to_pylist())
    assert expected.valid - kept == set(), "valid documents lost"
    assert len(kept) == docs.num_rows, "ids are unique downstream"
    odd = [name for name in expected.inputs if name.startswith(("odd but valid", "file: UTF-8 BOM"))]
    tally(ENTRY, "kept (valid despite the oddity)", odd)


def test_every_malformed_row_is_rejected_with_its_reason(curated, tally):
    expected, _, _, rejects = curated
    got = {}
    for row in rejects.to_pylist():
        got.setdefault((os.path.basename(row["source"]), row["pos"]), []).append(row["reject"])
    wrong = {
        where: (reason, got.get(where))
        for where, reason in expected.rejects.items()
        if not any(r.startswith(reason) for r in got.get(where, []))
    }
    assert not wrong, wrong
    for name in expected.junk:
        assert any(src == name for src, _ in got), f"{name}: no reject"
    assert all(len(r or "") <= readers.MAX_RAW_CHARS for r in rejects["text"].to_pylist())
    tally(
        ENTRY,
        "rejects/ with the reason",
        [
            n
            for n in expected.inputs
            if not n.startswith(("odd", "file: UTF", "sym", "broken", "second", "unknown", "hidden"))
        ],
    )


def test_skipped_files_are_counted_by_reason(curated, tally):
    expected, manifest, docs, _ = curated
    skipped = manifest["inputs"]["skipped_files"]
    assert all(skipped.get(reason, 0) >= n for reason, n in expected.skipped.items()), skipped
    sources = [os.path.basename(s) for s in docs["source"].to_pylist()]
    assert "link-to-bom.jsonl" not in sources or "bom.jsonl" not in sources, "a file read twice"
    assert not any(s.startswith(".hidden") for s in sources)
    names = ("symlink", "broken", "second link", "unknown", "hidden")
    tally(ENTRY, "skipped, counted in the manifest", [n for n in expected.inputs if n.startswith(names)])


def test_counts_add_up(curated):
    _, manifest, docs, rejects = curated
    counts = manifest["counts"]
    assert counts["rows_read"] >= counts["documents_read"] >= docs.num_rows
    read_drops = sum(n for r, n in manifest["drops"]["read"].items())
    assert read_drops == sum(
        1 for r in rejects["reject"].to_pylist() if r.split(":")[0] in readers.READ_REASONS
    )
