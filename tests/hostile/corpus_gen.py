"""The seeded generator of a hostile corpus: malformed files and rows of every kind curation meets, each
mixed in with valid documents, and what curation must make of each (kept, rejected with a reason at a
place, or skipped and counted). Used by test_corpora.py and benchmarks/hostile.py."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raylm.pipelines import readers
from tests.synthetic import document


@dataclass
class Expected:
    valid: set[str] = field(default_factory=set)
    """Ids of the valid documents: every one must reach docs/."""
    rejects: dict[tuple[str, int], str] = field(default_factory=dict)
    """(file name, line or row; -1 for the whole file) -> the reason the reject must start with."""
    junk: dict[str, str] = field(default_factory=dict)
    """File name -> reason prefix, for binary files whose every row must be rejected (count unknown)."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Skip reason -> at least this many files (manifest inputs.skipped_files)."""
    inputs: list[str] = field(default_factory=list)
    """One name per malformed input, for the tally."""


BAD_LINES = {  # name -> (line bytes, reason)
    "truncated-object": (b'{"id": "x", "text": "abc', readers.MALFORMED_JSON),
    "trailing-garbage": (b'{"id": "x", "text": "t"} junk', readers.MALFORMED_JSON),
    "single-quotes": (b"{'id': 'x', 'text': 't'}", readers.MALFORMED_JSON),
    "trailing-comma": (b'{"id": "x", "text": "t",}', readers.MALFORMED_JSON),
    "bare-word": (b"hello world", readers.MALFORMED_JSON),
    "bad-escape": (b'{"id": "x", "text": "a\\u00"}', readers.MALFORMED_JSON),
    "raw-nul": (b'{"id": "x",\x00 "text": "t"}', readers.MALFORMED_JSON),
    "raw-control-in-string": (b'{"id": "x", "text": "a\x01b"}', readers.MALFORMED_JSON),
    "bom-mid-file": (b'\xef\xbb\xbf{"id": "x", "text": "t"}', readers.MALFORMED_JSON),
    "giant-malformed": (b'{"text": "' + b"x" * 3_000_000, readers.MALFORMED_JSON),
    "deep-nesting": (b"[" * 100_000 + b"]" * 100_000, readers.MALFORMED_JSON),
    "number-5000-digits": (b'{"id": "x", "text": "t", "n": ' + b"9" * 5000 + b"}", readers.MALFORMED_JSON),
    "array": (b"[1, 2, 3]", readers.NOT_AN_OBJECT),
    "string": (b'"just text"', readers.NOT_AN_OBJECT),
    "number": (b"42", readers.NOT_AN_OBJECT),
    "null": (b"null", readers.NOT_AN_OBJECT),
    "bool": (b"true", readers.NOT_AN_OBJECT),
    "no-text": (b'{"id": "x"}', readers.MISSING_TEXT_FIELD),
    "other-field": (b'{"id": "x", "body": "t"}', readers.MISSING_TEXT_FIELD),
    "empty-object": (b"{}", readers.MISSING_TEXT_FIELD),
    "text-null": (b'{"id": "x", "text": null}', readers.TEXT_NOT_STRING),
    "text-int": (b'{"id": "x", "text": 42}', readers.TEXT_NOT_STRING),
    "text-float": (b'{"id": "x", "text": 3.5}', readers.TEXT_NOT_STRING),
    "text-nan": (b'{"id": "x", "text": NaN}', readers.TEXT_NOT_STRING),
    "text-bool": (b'{"id": "x", "text": false}', readers.TEXT_NOT_STRING),
    "text-list": (b'{"id": "x", "text": ["a", "b"]}', readers.TEXT_NOT_STRING),
    "text-object": (b'{"id": "x", "text": {"en": "t"}}', readers.TEXT_NOT_STRING),
    "invalid-utf8": (b'{"id": "x", "text": "caf\xff"}', readers.INVALID_UTF8),
    "overlong-utf8": (b'{"id": "x", "text": "\xc0\xaf"}', readers.INVALID_UTF8),
    "surrogate-bytes": (b'{"id": "x", "text": "\xed\xa0\x80"}', readers.INVALID_UTF8),
    "cut-multibyte": (b'{"id": "x", "text": "caf\xc3', readers.INVALID_UTF8),
    "lone-surrogate-text": (b'{"id": "x", "text": "a \\ud800 b"}', readers.INVALID_UNICODE),
    "lone-surrogate-id": (b'{"id": "\\udfff", "text": "a b"}', readers.INVALID_UNICODE),
}

ODD_BUT_VALID = {  # name -> a line builder (id, text) whose document must be kept under the id returned
    "numeric-id": lambda i, t: (json.dumps({"id": 10_000 + i, "text": t}), str(10_000 + i)),
    "crlf-line": lambda i, t: (json.dumps({"id": f"crlf{i}", "text": t}) + "\r", f"crlf{i}"),
    "escaped-nul-in-text": lambda i, t: (json.dumps({"id": f"nul{i}", "text": t + "\u0000 end"}), f"nul{i}"),
    "extra-fields": lambda i, t: (json.dumps({"id": f"x{i}", "text": t, "meta": {"a": [1]}}), f"x{i}"),
}


def _jsonl(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


class CorpusBuilder:
    def __init__(self, root: Path, seed: int):
        self.root, self.rng, self.n, self.exp = root, random.Random(seed), 0, Expected()

    def doc(self) -> tuple[str, str]:
        self.n += 1
        return f"v{self.n:04d}", document(self.rng)

    def valid_line(self) -> bytes:
        doc_id, text = self.doc()
        self.exp.valid.add(doc_id)
        return json.dumps({"id": doc_id, "text": text}).encode()

    def bad_line_files(self) -> None:
        """One jsonl file per kind of bad line: valid lines before and after it, the bad one in between."""
        for name, (line, reason) in BAD_LINES.items():
            lines = [self.valid_line(), line, self.valid_line()]
            (self.root / f"line-{name}.jsonl").write_bytes(_jsonl(lines))
            self.exp.rejects[(f"line-{name}.jsonl", 2)] = reason
            self.exp.inputs.append(f"jsonl line: {name}")
        for name, build in ODD_BUT_VALID.items():
            _, text = self.doc()
            line, kept_id = build(self.n, text)
            self.exp.valid.add(kept_id)
            (self.root / f"odd-{name}.jsonl").write_bytes(_jsonl([line.encode(), self.valid_line()]))
            self.exp.inputs.append(f"odd but valid: {name}")
        bom = b"\xef\xbb\xbf" + _jsonl([self.valid_line(), self.valid_line()])
        (self.root / "bom.jsonl").write_bytes(bom)
        (self.root / "bom.txt").write_bytes(b"\xef\xbb\xbf" + self._text_doc("bom.txt").encode())
        self.exp.inputs += ["file: UTF-8 BOM (jsonl)", "file: UTF-8 BOM (txt)"]

    def _text_doc(self, name: str) -> str:
        _, text = self.doc()
        self.exp.valid.add(str(self.root / name))  # a text file is one document, its id is its path
        return text

    def gzip_files(self) -> None:
        for frac in (0.1, 0.35, 0.6, 0.85, 0.99):
            name = f"cut-{int(frac * 100)}.jsonl.gz"
            docs = [self.doc() for _ in range(12)]
            packed = gzip.compress(_jsonl([json.dumps({"id": i, "text": t}).encode() for i, t in docs]))
            cut = packed[: int(len(packed) * frac)]
            (self.root / name).write_bytes(cut)
            decoded = zlib.decompressobj(wbits=31).decompress(cut)
            complete = decoded.count(b"\n")
            self.exp.valid |= {i for i, _ in docs[:complete]}
            self.exp.rejects[(name, complete + 1)] = readers.TRUNCATED_FILE
            self.exp.inputs.append(f"gzip cut at {int(frac * 100)}%")
        (self.root / "cut-header.jsonl.gz").write_bytes(gzip.compress(b"x\n")[:6])
        self.exp.rejects[("cut-header.jsonl.gz", 1)] = readers.TRUNCATED_FILE
        valid = gzip.compress(_jsonl([self.valid_line()]))
        (self.root / "trailing-junk.jsonl.gz").write_bytes(valid + b"not a gzip member")
        self.exp.rejects[("trailing-junk.jsonl.gz", -1)] = readers.UNREADABLE_FILE
        (self.root / "not-gzip.jsonl.gz").write_bytes(b"plain text, not gzip\n")
        self.exp.rejects[("not-gzip.jsonl.gz", -1)] = readers.UNREADABLE_FILE
        text = self._text_doc("cut.txt.gz").encode()
        (self.root / "cut.txt.gz").write_bytes(gzip.compress(text)[:-30])
        self.exp.valid.discard(str(self.root / "cut.txt.gz"))
        self.exp.rejects[("cut.txt.gz", 0)] = readers.TRUNCATED_FILE
        (self.root / "empty.jsonl.gz").write_bytes(gzip.compress(b""))
        self.exp.rejects[("empty.jsonl.gz", 0)] = readers.EMPTY_FILE
        self.exp.inputs += [
            "gzip header only",
            "gzip + trailing junk",
            "not gzip at all",
            "truncated .txt.gz",
        ]
        self.exp.inputs += ["empty gzip"]

    def binary_and_empty_files(self) -> None:
        for i in range(3):
            data = self.rng.randbytes(4096).replace(b"\n", b"\xff")  # one line, surely not UTF-8
            (self.root / f"binary-{i}.jsonl").write_bytes(data)
            self.exp.rejects[(f"binary-{i}.jsonl", 1)] = readers.INVALID_UTF8
            (self.root / f"binary-{i}.txt").write_bytes(b"\xff" + data)
            self.exp.rejects[(f"binary-{i}.txt", 0)] = readers.INVALID_UTF8
            (self.root / f"binary-{i}.parquet").write_bytes(data)
            self.exp.rejects[(f"binary-{i}.parquet", -1)] = readers.UNREADABLE_FILE
            self.exp.inputs += [f"binary .jsonl {i}", f"binary .txt {i}", f"binary .parquet {i}"]
        lines = self.rng.randbytes(20_000)  # many lines of random bytes: each rejected, none kept
        (self.root / "binary-lines.jsonl").write_bytes(lines)
        self.exp.junk["binary-lines.jsonl"] = ""
        for name, data in {"empty.jsonl": b"", "blank-lines.jsonl": b"\n  \n\t\n", "empty.txt": b"",
                           "blank.txt": b" \n\n"}.items():  # fmt: skip
            (self.root / name).write_bytes(data)
            self.exp.rejects[(name, 0)] = readers.EMPTY_FILE
            self.exp.inputs.append(f"file: {name}")
        self.exp.inputs.append("binary lines .jsonl")

    def parquet_files(self) -> None:
        def write(name: str, table: pa.Table) -> None:
            pq.write_table(table, self.root / name)
            self.exp.inputs.append(f"parquet: {name}")

        docs = [self.doc() for _ in range(3)]
        write("no-text-column.parquet", pa.table({"id": ["a"], "body": [docs[0][1]]}))
        self.exp.rejects[("no-text-column.parquet", 0)] = readers.MISSING_TEXT_FIELD
        write("int-text.parquet", pa.table({"id": ["a", "b"], "text": [1, 2]}))
        self.exp.rejects |= {("int-text.parquet", r): readers.TEXT_NOT_STRING for r in (0, 1)}
        write("list-text.parquet", pa.table({"id": ["a"], "text": [["x", "y"]]}))
        self.exp.rejects[("list-text.parquet", 0)] = readers.TEXT_NOT_STRING
        write("struct-text.parquet", pa.table({"id": ["a"], "text": [{"en": "t"}]}))
        self.exp.rejects[("struct-text.parquet", 0)] = readers.TEXT_NOT_STRING
        write("binary-text.parquet", pa.table({"id": ["a"], "text": pa.array([b"bytes"], pa.binary())}))
        self.exp.rejects[("binary-text.parquet", 0)] = readers.TEXT_NOT_STRING
        mixed = [docs[1][1], None, docs[2][1], None]
        write("null-text.parquet", pa.table({"id": [docs[1][0], "n1", docs[2][0], "n2"], "text": mixed}))
        self.exp.valid |= {docs[1][0], docs[2][0]}
        self.exp.rejects |= {("null-text.parquet", 1): readers.TEXT_NOT_STRING}
        self.exp.rejects |= {("null-text.parquet", 3): readers.TEXT_NOT_STRING}
        odd = [self.doc() for _ in range(2)]
        write("list-id.parquet", pa.table({"id": [[1], [2]], "text": [t for _, t in odd]}))
        self.exp.valid |= {"[1]", "[2]"}
        write(
            "empty-rows.parquet",
            pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}),
        )
        self.exp.rejects[("empty-rows.parquet", 0)] = readers.EMPTY_FILE
        good = [self.doc() for _ in range(200)]
        buf = io.BytesIO()
        pq.write_table(pa.table({"id": [i for i, _ in good], "text": [t for _, t in good]}), buf)
        (self.root / "truncated.parquet").write_bytes(buf.getvalue()[: buf.tell() // 2])
        self.exp.rejects[("truncated.parquet", -1)] = readers.UNREADABLE_FILE
        self.exp.inputs.append("parquet: truncated.parquet")

    def links_and_skips(self) -> None:
        (self.root / "loops").mkdir()
        os.symlink(self.root / "loops", self.root / "loops" / "self")
        os.symlink(self.root / "loops" / "b", self.root / "loops" / "a")
        os.symlink(self.root / "loops" / "a", self.root / "loops" / "b")
        os.symlink(self.root / "nowhere.jsonl", self.root / "broken.jsonl")
        os.symlink(self.root / "bom.jsonl", self.root / "link-to-bom.jsonl")  # read once, not twice
        (self.root / "data.bin").write_bytes(b"\x00\x01")
        (self.root / ".hidden.jsonl").write_bytes(_jsonl([b'{"id": "h", "text": "hidden"}']))
        self.exp.skipped = {readers.SKIP_LINK_LOOP: 1, readers.SKIP_BROKEN_LINK: 1}
        self.exp.skipped |= {readers.SKIP_UNKNOWN_EXTENSION: 1, readers.SKIP_HIDDEN: 1}
        self.exp.inputs += ["symlink to itself", "symlink loop a->b->a", "broken symlink", "second link"]
        self.exp.inputs += ["unknown extension", "hidden file"]


def build(root: Path, seed: int = 41) -> Expected:
    b = CorpusBuilder(root, seed)
    b.bad_line_files()
    b.gzip_files()
    b.binary_and_empty_files()
    b.parquet_files()
    b.links_and_skips()
    return b.exp
