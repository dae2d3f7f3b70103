"""Hostile inputs to the readers: every file is read once, every line that decodes is kept, and every
row that cannot be a document is set aside with a reason instead of crashing or vanishing."""

import gzip
import json
import os

import pytest

from raylm.pipelines import readers
from raylm.pipelines.config import SourceConfig
from raylm.pipelines.readers import find_inputs, read_file, read_files


def line(i, text="hello there"):
    return json.dumps({"id": f"d{i}", "text": f"{text} {i}"}).encode() + b"\n"


def read_all(path, **src):
    return [row for f in find_inputs([SourceConfig(path=str(path), **src)]).files for row in read_file(f)]


def reasons(rows):
    return [r["reject"].split(":")[0] if r["reject"] else None for r in rows]


# ---- symbolic links: each real file once -------------------------------------------------------------
def make_links(root, layout):
    (root / "a").mkdir(parents=True)
    (root / "a" / "doc.jsonl").write_bytes(line(1))
    if layout == "self-loop":
        (root / "a" / "loop").symlink_to(root / "a")
    elif layout == "parent-loop":
        (root / "a" / "up").symlink_to(root)
    elif layout == "mutual-loop":
        (root / "b").mkdir()
        (root / "a" / "to-b").symlink_to(root / "b")
        (root / "b" / "to-a").symlink_to(root / "a")
    elif layout == "two-links-to-one-folder":
        (root / "x").symlink_to(root / "a")
        (root / "y").symlink_to(root / "a")
    elif layout == "link-to-file":
        (root / "copy.jsonl").symlink_to(root / "a" / "doc.jsonl")


@pytest.mark.parametrize(
    "layout", ["self-loop", "parent-loop", "mutual-loop", "two-links-to-one-folder", "link-to-file"]
)
def test_every_real_file_is_read_once_whatever_the_links(tmp_path, layout):
    make_links(tmp_path, layout)
    inputs = find_inputs([SourceConfig(path=str(tmp_path))])
    assert len(inputs.files) == 1
    assert sum(inputs.skipped.values()) >= 1, "what was skipped is counted"


def test_two_sources_naming_one_file_read_it_once(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(line(1))
    inputs = find_inputs([SourceConfig(path=str(tmp_path)), SourceConfig(path=str(tmp_path / "d.jsonl"))])
    assert len(inputs.files) == 1 and inputs.skipped == {readers.SKIP_ALREADY_LISTED: 1}


def test_skipped_files_are_counted_by_reason(tmp_path):
    for name in ["ok.jsonl", "model.bin", "README", ".hidden.jsonl", "_SUCCESS"]:
        (tmp_path / name).write_bytes(line(0))
    (tmp_path / "dangling.jsonl").symlink_to(tmp_path / "gone")
    (tmp_path / os.fsdecode(b"bad-\xff-name.jsonl")).write_bytes(line(2))
    inputs = find_inputs([SourceConfig(path=str(tmp_path))])
    assert [os.path.basename(f.path) for f in inputs.files] == ["ok.jsonl"]
    assert inputs.skipped == {
        readers.SKIP_UNKNOWN_EXTENSION: 2,
        readers.SKIP_HIDDEN: 2,
        readers.SKIP_BROKEN_LINK: 1,
        readers.SKIP_UNDECODABLE_NAME: 1,
    }


# ---- byte-order marks ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, content",
    [
        ("b.jsonl", b"\xef\xbb\xbf" + line(1) + line(2)),
        ("b.jsonl.gz", gzip.compress(b"\xef\xbb\xbf" + line(1) + line(2))),
        ("b.ndjson", b"\xef\xbb\xbf" + line(1).rstrip() + b"\r\n" + line(2)),
    ],
)
def test_utf8_bom_does_not_reject_the_first_document(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    rows = read_all(tmp_path / name)
    assert reasons(rows) == [None, None] and rows[0]["id"] == "d1"


def test_utf8_bom_in_a_text_file_is_not_part_of_the_text(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"\xef\xbb\xbfSome prose.")
    assert read_all(tmp_path / "t.txt")[0]["text"] == "Some prose."


# ---- lone surrogates -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "record, field",
    [
        ({"id": "s1", "text": "bad \\ud800 text"}, "text"),
        ({"id": "s1", "text": "low \\udfff only"}, "text"),
        ({"id": "s1", "text": "reversed \\udc00\\ud800 pair"}, "text"),
        ({"id": "bad-\\ud83d-id", "text": "a fine text"}, "id"),
    ],
)
def test_lone_surrogate_is_a_reject_and_the_batch_goes_on(tmp_path, record, field):
    raw = "{" + ", ".join(f'"{k}": "{v}"' for k, v in record.items()) + "}"
    (tmp_path / "s.jsonl").write_bytes(line(1) + raw.encode() + b"\n" + line(3))
    f = find_inputs([SourceConfig(path=str(tmp_path))]).files[0]
    file_row = {k: [v] for k, v in f.__dict__.items()}
    (table,) = list(read_files(file_row))  # the Ray Data stage: builds the Arrow batch
    rows = table.to_pylist()
    assert reasons(rows) == [None, readers.INVALID_UNICODE, None]
    assert f"'{field}'" in rows[1]["reject"], "the reason names the field"
    assert rows[1]["id"] == f"{f.path}:2"


def test_a_valid_surrogate_pair_is_an_ordinary_character(tmp_path):
    (tmp_path / "p.jsonl").write_bytes(b'{"id": "e", "text": "emoji \\ud83d\\ude00 here"}\n')
    (row,) = read_all(tmp_path / "p.jsonl")
    assert row["reject"] is None and row["text"] == "emoji \U0001f600 here"


# ---- truncated gzip ------------------------------------------------------------------------------------
def gz_lines(n):
    return gzip.compress(b"".join(line(i, "some longer text " * 20) for i in range(n)))


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.9, 0.99])
def test_truncated_gzip_keeps_every_line_that_decodes(tmp_path, cut):
    data = gz_lines(400)
    (tmp_path / "t.jsonl.gz").write_bytes(data[: int(len(data) * cut)])
    rows = read_all(tmp_path / "t.jsonl.gz")
    good = [r for r in rows if r["reject"] is None]
    assert good and [r["id"] for r in good] == [f"d{i}" for i in range(len(good))]
    assert reasons(rows)[-1] == readers.TRUNCATED_FILE and len(rows) == len(good) + 1
    assert rows[-1]["id"].endswith(f":{len(good) + 1}"), "the reject names the incomplete line"


def test_truncated_second_gzip_member_keeps_the_first(tmp_path):
    first, second = gzip.compress(line(1) + line(2)), gz_lines(50)
    (tmp_path / "m.jsonl.gz").write_bytes(first + second[: len(second) // 2])
    rows = read_all(tmp_path / "m.jsonl.gz")
    assert [r["id"] for r in rows[:2]] == ["d1", "d2"] and reasons(rows)[-1] == readers.TRUNCATED_FILE


def test_concatenated_gzip_members_are_read_whole(tmp_path):
    (tmp_path / "m.jsonl.gz").write_bytes(gzip.compress(line(1)) + gzip.compress(line(2)))
    assert [r["id"] for r in read_all(tmp_path / "m.jsonl.gz")] == ["d1", "d2"]


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("h.jsonl.gz", gzip.compress(line(1))[:5], readers.TRUNCATED_FILE),  # header only
        ("t.txt.gz", gzip.compress(" ".join(map(str, range(5000))).encode())[:200], readers.TRUNCATED_FILE),
        ("c.jsonl.gz", gzip.compress(line(1))[:10] + b"\x00garbage" * 4, readers.UNREADABLE_FILE),
    ],
)
def test_truncated_or_corrupt_gzip_is_a_reject_not_a_crash(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    assert reasons(read_all(tmp_path / name))[-1] == reason


def test_deeply_nested_json_line_is_malformed(tmp_path):
    (tmp_path / "n.jsonl").write_bytes(b"[" * 100_000 + b"]" * 100_000 + b"\n" + line(2))
    assert reasons(read_all(tmp_path / "n.jsonl")) == [readers.MALFORMED_JSON, None]
