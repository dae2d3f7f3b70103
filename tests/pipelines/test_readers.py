import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.core.errors import InputError
from raylm.pipelines.config import SourceConfig
from raylm.pipelines.readers import BUILTIN_PYTHON_DOCS, find_inputs, read_file


def rows(tmp_path, name, content: bytes, **src):
    path = tmp_path / name
    path.write_bytes(content)
    (f,) = find_inputs([SourceConfig(path=str(path), **src)]).files
    return list(read_file(f))


def test_jsonl_good_and_bad_lines_are_all_accounted_for(tmp_path):
    lines = [
        json.dumps({"id": "a", "text": "fine"}).encode(),
        b"{not json",
        json.dumps({"id": "b"}).encode(),
        json.dumps({"id": "c", "text": 5}).encode(),
        json.dumps([1, 2]).encode(),
        b'{"id": "d", "text": "bad \xff byte"}',
        b"",
        json.dumps({"text": "no id"}).encode(),
    ]
    out = rows(tmp_path, "c.jsonl", b"\n".join(lines))
    reasons = [r["reject"].split(":")[0] if r["reject"] else None for r in out]
    assert reasons == [
        None,
        "malformed_json",
        "missing_text_field",
        "text_not_string",
        "not_an_object",
        "invalid_utf8",
        None,
    ]
    assert out[0]["id"] == "a" and out[-1]["id"].endswith("c.jsonl:8"), "generated ids name file and line"


def test_gzip_jsonl_and_custom_fields(tmp_path):
    data = gzip.compress(b'{"doc_id": 7, "body": "hello there"}\n')
    out = rows(tmp_path, "c.jsonl.gz", data, id_field="doc_id", text_field="body")
    assert out == [
        {"id": "7", "text": "hello there", "source": str(tmp_path / "c.jsonl.gz"), "reject": None, "pos": 1}
    ]


def test_empty_and_corrupt_files_are_rejected_not_fatal(tmp_path):
    assert rows(tmp_path, "e.jsonl", b"")[0]["reject"] == "empty_file"
    assert rows(tmp_path, "bad.jsonl.gz", b"not gzip at all")[0]["reject"].startswith("unreadable_file")
    assert rows(tmp_path, "t.txt", b"\xff\xfe bad")[0]["reject"].startswith("invalid_utf8")


def test_parquet_with_nulls_and_missing_column(tmp_path):
    pq.write_table(pa.table({"id": ["x", "y"], "text": ["ok", None]}), tmp_path / "p.parquet")
    (f,) = find_inputs([SourceConfig(path=str(tmp_path / "p.parquet"))]).files
    out = list(read_file(f))
    assert out[0]["text"] == "ok" and out[1]["reject"].startswith("text_not_string")
    pq.write_table(pa.table({"body": ["ok"]}), tmp_path / "q.parquet")
    (f,) = find_inputs([SourceConfig(path=str(tmp_path / "q.parquet"))]).files
    assert next(read_file(f))["reject"].startswith("missing_text_field")


def test_discover_folder_glob_and_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["a.jsonl", "sub/b.txt", "sub/c.parquet", "skip.bin", "_SUCCESS"]:
        (tmp_path / name).write_bytes(b"x")
    found = find_inputs([SourceConfig(path=str(tmp_path))]).files
    assert [f.format for f in found] == ["jsonl", "text", "parquet"]
    assert [f.path for f in find_inputs([SourceConfig(path=str(tmp_path / "sub" / "*.txt"))]).files] == [
        str(tmp_path / "sub/b.txt")
    ]
    with pytest.raises(InputError, match="does not exist"):
        find_inputs([SourceConfig(path=str(tmp_path / "missing"))])
    (tmp_path / "only-bin").mkdir()
    with pytest.raises(InputError, match="no readable files"):
        find_inputs([SourceConfig(path=str(tmp_path / "only-bin"))])


def test_builtin_python_docs_is_real_prose_with_unique_ids():
    files = find_inputs([SourceConfig(path=BUILTIN_PYTHON_DOCS)]).files
    docs = [r for f in files[:200] for r in read_file(f)]
    assert len(files) > 300 and len(docs) > 1000
    assert len({d["id"] for d in docs}) == len(docs)
    assert any("Return" in d["text"] for d in docs)
