"""Curation end to end on the shared local Ray: output contract, quarantine, idempotent reruns."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raylm.core import storage
from raylm.core.artifacts import CuratedDir, RunDir
from raylm.core.errors import InputError
from raylm.core.lineage import read_manifest
from raylm.pipelines.run import run
from tests.pipelines.conftest import config  # re-exported: other tests import it from here

pytestmark = pytest.mark.slow


def test_contract_layout(curated):
    m = read_manifest(curated)
    assert m["kind"] == "curated" and m["seq_len"] == 32
    for split in ("train", "eval"):
        assert m["shards"][split], f"no {split} shards"
        index = CuratedDir(curated).shard_index(split)
        assert index.seq_len == 32 and [(s["file"], s["rows"]) for s in index.shards] == [
            (s["file"], s["rows"]) for s in m["shards"][split]
        ]
        for shard in index.shards:  # raw ids, uint16 for a vocabulary of 400, nothing else in the file
            ids = np.fromfile(storage.join(CuratedDir(curated).shards, shard["file"]), "<u2")
            assert shard["dtype"] == "uint16" and len(ids) == shard["rows"] * 32
            assert ids.min() >= 0 and ids.max() < m["vocab_size"]
    for split in ("finetune", "finetune_eval"):  # finetune_fraction 0: nothing held apart, no shards
        assert m["shards"][split] == [] and CuratedDir(curated).shard_files(split) == []
        assert m["counts"]["sequences"][split] == 0 and m["counts"][f"{split}_documents"] == 0
    rows = [s["rows"] for s in m["shards"]["train"]]
    assert len(rows) > 1 and max(rows) - min(rows) <= 1, f"unbalanced shards {rows}"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(CuratedDir(curated).tokenizer)
    assert tok.eos_token == "<|endoftext|>" and len(tok) == m["vocab_size"]
    page = Path(CuratedDir(curated).report).read_text()  # the data report, written with the run
    assert (
        f"{m['counts']['after_near_dedup']:,}" in page
        and Path(CuratedDir(curated).report_png).stat().st_size > 1000
    )


def test_malformed_input_is_quarantined_with_counts(curated):
    m = read_manifest(curated)
    assert m["drops"]["read"] == {
        "empty_file": 1,
        "invalid_utf8": 1,
        "malformed_json": 1,
        "missing_text_field": 1,
    }
    assert m["drops"]["filters"] == {"min_words": 1}
    rejects = pq.read_table(CuratedDir(curated).rejects)
    assert rejects.num_rows == 5
    assert "{broken json" in rejects.column("text").to_pylist()


def test_exact_duplicates_removed_and_clustered(curated):
    m = read_manifest(curated)
    c = m["counts"]
    assert c["after_filters"] == 130 and c["after_exact_dedup"] == 120
    clusters = pq.read_table(CuratedDir(curated).clusters).to_pylist()
    assert len(clusters) == 130
    by_id = {r["id"]: r for r in clusters}
    copy = by_id["z-copy-of-d003"]
    assert not copy["kept"] and copy["cluster_id"] == by_id["d003"]["cluster_id"] and by_id["d003"]["kept"]
    docs = pq.read_table(CuratedDir(curated).docs)
    assert docs.num_rows == c["after_near_dedup"] and not any(
        i.startswith("z-copy") for i in docs["id"].to_pylist()
    )
    assert c["sequences"]["train"] + c["sequences"]["eval"] == (c["packed_tokens"] // 32)


def test_rerun_of_complete_output_does_nothing(curated, corpus):
    before = storage.read_text(f"{curated}/manifest.json")
    cfg = config(corpus, "unused")
    cfg.data.output = curated
    run(cfg)
    assert storage.read_text(f"{curated}/manifest.json") == before


def test_corpus_with_no_usable_document_is_an_input_error(ray_cluster, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("{not json\n")
    with pytest.raises(InputError, match="no documents left"):
        run(config(tmp_path / "in", tmp_path / "out"))
    assert not storage.is_complete(RunDir(str(tmp_path / "out")).curated.root)


def test_curation_is_deterministic(ray_cluster, corpus, curated, tmp_path):
    """A second run over the same corpus (another output folder, other block layout) writes the same shards."""
    cfg = config(corpus, tmp_path, batch_size=7)
    run(cfg)
    first, second = read_manifest(curated), read_manifest(cfg.data.output)
    assert first["shards"] == second["shards"]
    for split in ("train", "eval"):
        names = [s["file"] for s in first["shards"][split]] + [CuratedDir.index_name(split)]
        for name in names:  # byte for byte
            a = storage.join(CuratedDir(curated).shards, name)
            b = storage.join(CuratedDir(cfg.data.output).shards, name)
            with open(a, "rb") as fa, open(b, "rb") as fb:
                assert fa.read() == fb.read(), name
