"""Curation end to end on a hostile corpus: links in a cycle, ids repeated across and within files, a
byte-order mark, a lone surrogate, a truncated gzip, files of unknown kinds. Nothing is read twice, ids
are unique downstream, no stage count grows, and every row that is not a document is set aside with a
reason. Also: outputs that would overwrite the user's files are refused before Ray starts."""

import gzip
import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.core import outputs, storage
from raylm.core.artifacts import CuratedDir
from raylm.core.cli import main
from raylm.core.config import build_config
from raylm.core.errors import InputError
from raylm.core.lineage import read_manifest
from raylm.pipelines import readers, unique_ids
from raylm.pipelines.run import run
from tests.synthetic import sample_text

pytestmark = pytest.mark.slow


def jsonl(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    rng = random.Random(3)
    root = tmp_path_factory.mktemp("hostile")
    text = {}

    def doc(doc_id):
        text.setdefault(doc_id, [])
        text[doc_id].append(sample_text(rng, 120))
        return {"id": doc_id, "text": text[doc_id][-1]}

    (root / "a").mkdir()
    (root / "b").mkdir()
    first = [doc(f"d{i:03d}") for i in range(30)] + [doc("d005")]  # d005 again in the same file
    (root / "a" / "part-0.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl(first))
    second = [doc(f"d{i:03d}") for i in range(20, 40)]  # d020..d029 claimed again in another file
    (root / "b" / "part-1.jsonl").write_bytes(
        jsonl(second) + b'{"id": "s1", "text": "lone \\ud800 surrogate"}\n'
    )
    packed = gzip.compress(jsonl([doc(f"g{i:03d}") for i in range(40)]))
    (root / "b" / "part-2.jsonl.gz").write_bytes(packed[: len(packed) * 3 // 4])
    (root / "a" / "loop").symlink_to(root)  # a cycle: a/loop/a/loop/...
    (root / "notes.bin").write_bytes(b"\x00\x01")
    (root / ".hidden.jsonl").write_bytes(jsonl([doc("h1")]))
    return root, text


def curate_config(corpus, run_dir, **data):
    return build_config(
        {
            "name": "h",
            "run_dir": str(run_dir),
            "data": {
                "sources": [{"path": str(corpus)}],
                "seq_len": 32,
                "tokenizer": {"vocab_size": 300},
                "near_dedup": {"enabled": True},
                **data,
            },
        }
    )


@pytest.fixture(scope="module")
def curated(ray_cluster, hostile, tmp_path_factory):
    corpus, _ = hostile
    cfg = curate_config(corpus, tmp_path_factory.mktemp("run"))
    run(cfg)
    return cfg.data.output


def test_each_file_is_read_once_and_skips_are_counted(curated):
    m = read_manifest(curated)
    assert m["inputs"]["files"] == 3
    skipped = m["inputs"]["skipped_files"]
    assert skipped[readers.SKIP_LINK_LOOP] >= 1
    assert skipped[readers.SKIP_UNKNOWN_EXTENSION] == 1 and skipped[readers.SKIP_HIDDEN] == 1


def test_ids_are_unique_downstream_and_the_first_claim_wins(curated, hostile):
    _, text = hostile
    m = read_manifest(curated)
    assert m["drops"]["read"][readers.DUPLICATE_ID] == 11  # d005 once, d020..d029 once each
    docs = pq.read_table(CuratedDir(curated).docs).to_pylist()
    ids = [d["id"] for d in docs]
    assert len(ids) == len(set(ids))
    by_id = {d["id"]: d["text"] for d in docs}
    assert by_id["d005"] == text["d005"][0] and by_id["d025"] == text["d025"][0]
    clusters = pq.read_table(CuratedDir(curated).clusters)
    assert len(set(clusters["id"].to_pylist())) == clusters.num_rows == m["counts"]["after_filters"]
    rejects = pq.read_table(CuratedDir(curated).rejects).to_pylist()
    later = [r for r in rejects if r["reject"].startswith(readers.DUPLICATE_ID)]
    assert {r["id"] for r in later} == {"d005"} | {f"d{i:03d}" for i in range(20, 30)}
    assert all("part-0.jsonl:" in r["reject"] for r in later), "the reason says where the id was first"


def test_stage_counts_never_grow(curated):
    c = read_manifest(curated)["counts"]
    chain = ["rows_read", "documents_read", "after_normalize", "after_filters"]
    chain += ["after_exact_dedup", "after_near_dedup"]
    values = [c[k] for k in chain]
    assert values == sorted(values, reverse=True), dict(zip(chain, values))


def test_bom_surrogate_and_truncation_are_handled(curated, hostile):
    m = read_manifest(curated)
    assert m["drops"]["read"][readers.INVALID_UNICODE] == 1
    assert m["drops"]["read"][readers.TRUNCATED_FILE] == 1
    docs = {d["id"] for d in pq.read_table(CuratedDir(curated).docs).to_pylist()}
    assert "d000" in docs, "the first document after the byte-order mark is kept"
    assert len([i for i in docs if i.startswith("g")]) >= 20, "lines before the truncation are kept"


@pytest.mark.parametrize("limit", [100, 0], ids=["broadcast", "join"])
def test_later_claims_are_marked_the_same_by_lookup_and_by_join(ray_cluster, monkeypatch, limit):
    import ray.data

    monkeypatch.setattr(unique_ids, "BROADCAST_LIMIT", limit)
    rows = [
        {"id": i, "text": "t", "source": src, "reject": rej, "pos": pos}
        for i, src, pos, rej in [
            ("x", "f2", 1, None),
            ("x", "f1", 9, None),
            ("x", "f1", 10, "min_words: 3 < 50"),  # a filter reject still claims its id
            ("y", "f1", 1, None),
            ("z", "f1", 2, "malformed_json: bad"),  # a read reject is no document: claims nothing
            ("z", "f2", 2, None),
        ]
    ]
    ds = ray.data.from_arrow(pa.Table.from_pylist(rows, schema=readers.SCHEMA))
    out = unique_ids.set_aside_later_claims(ds, 2).take_all()
    got = {(r["source"], r["pos"]): r["reject"] for r in out}
    assert got == {
        ("f1", 1): None,
        ("f1", 2): "malformed_json: bad",
        ("f1", 9): None,
        ("f1", 10): "duplicate_id: id first claimed at f1:9",
        ("f2", 1): "duplicate_id: id first claimed at f1:9",
        ("f2", 2): None,
    }


def test_all_rejected_keeps_the_rejects_readable(ray_cluster, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{not json\n{"id": 1}\n')
    cfg = curate_config(tmp_path / "in", tmp_path / "run")
    with pytest.raises(InputError, match=r"rejected rows and their reasons are in .*curated/rejects"):
        run(cfg)
    out = cfg.data.output
    assert not storage.is_complete(out)
    reasons = sorted(r.split(":")[0] for r in pq.read_table(CuratedDir(out).rejects)["reject"].to_pylist())
    assert reasons == [readers.MALFORMED_JSON, readers.MISSING_TEXT_FIELD]
    # A rerun with a fixed corpus may replace that incomplete output.
    outputs.check_output("data.output", out, "curated")


@pytest.mark.parametrize(
    "override",
    [
        "data.output={corpus}",
        "data.output={corpus}/curated",
        "run_dir={corpus}",
        "data.output={corpus}/a/part-0.jsonl",
        "data.output={tmp}",
    ],
    ids=[
        "output-is-corpus",
        "output-inside-corpus",
        "run-dir-is-corpus",
        "output-is-a-file",
        "output-holds-corpus",
    ],
)
def test_outputs_that_would_overwrite_user_files_exit_2_before_ray(tmp_path, capsys, override):
    corpus = tmp_path / "corpus"
    (corpus / "a").mkdir(parents=True)
    (corpus / "a" / "part-0.jsonl").write_bytes(jsonl([{"id": "1", "text": "some text"}]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nrun_dir: {tmp_path}/run\ndata:\n  sources: [{{path: {corpus}}}]\n")
    before = sorted(p for p in map(str, tmp_path.rglob("*")))
    code = main(["curate", str(recipe), override.format(corpus=corpus, tmp=tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("raylm: error: ") and len(err.splitlines()) <= 3
    assert sorted(p for p in map(str, tmp_path.rglob("*"))) == before, "nothing written or removed"
    assert not os.path.exists(tmp_path / "run"), "refused before anything was created"
