"""Find input files and read them into rows of (id, text, source, reject).

Files are read by Ray Data tasks, one file list row per file, so no file passes through the driver.
Every problem becomes a row with a `reject` reason instead of an exception: malformed JSON lines,
invalid UTF-8, a missing or non-string text field, an empty or unreadable file. Later stages pass such
rows through untouched and the run writes them to rejects/. Only a missing input path or a corpus with
no files is an error (exit code 2), because then there is nothing to curate at all.
"""

from __future__ import annotations

import ast
import fnmatch
import inspect
import json
import os
import sysconfig
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raylm.core import storage
from raylm.core.errors import InputError
from raylm.pipelines.config import SourceConfig

BUILTIN_PYTHON_DOCS = "builtin:python-docs"
ROWS_PER_BATCH = 2048
MAX_RAW_CHARS = 2000  # how much of a malformed line is kept in rejects/ for inspection

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("reject", pa.string()),
        ("pos", pa.int64()),  # line (jsonl), row (parquet) or document number within `source`
    ]
)

# Reject reasons this stage emits (the part of a `reject` value before the colon).
INVALID_UTF8 = "invalid_utf8"
INVALID_UNICODE = "invalid_unicode"
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_TEXT_FIELD = "missing_text_field"
TEXT_NOT_STRING = "text_not_string"
EMPTY_FILE = "empty_file"
TRUNCATED_FILE = "truncated_file"
UNREADABLE_FILE = "unreadable_file"
UNPARSABLE_PYTHON = "unparsable_python"
DUPLICATE_ID = "duplicate_id"
READ_REASONS = frozenset(
    {
        INVALID_UTF8,
        INVALID_UNICODE,
        MALFORMED_JSON,
        NOT_AN_OBJECT,
        MISSING_TEXT_FIELD,
        TEXT_NOT_STRING,
        EMPTY_FILE,
        TRUNCATED_FILE,
        UNREADABLE_FILE,
        UNPARSABLE_PYTHON,
        DUPLICATE_ID,
    }
)

# Why a file under a source was not read (counted in the manifest and the summary).
SKIP_UNKNOWN_EXTENSION = "unknown_extension"
SKIP_HIDDEN = "hidden"
SKIP_LINK_LOOP = "symlink_loop"
SKIP_ALREADY_LISTED = "duplicate_path"
SKIP_BROKEN_LINK = "broken_link"
SKIP_UNDECODABLE_NAME = "undecodable_name"
UTF8_BOM = b"\xef\xbb\xbf"

EXTENSIONS = {
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".json": "jsonl",
    ".json.gz": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".txt": "text",
    ".txt.gz": "text",
    ".md": "text",
    ".rst": "text",
}


@dataclass(frozen=True)
class InputFile:
    path: str
    format: str
    size: int
    mtime: float | None
    id_field: str = "id"
    text_field: str = "text"


def _format_of(path: str, declared: str) -> str | None:
    if declared != "auto":
        return declared
    name = path.lower()
    for ext, fmt in sorted(EXTENSIONS.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(ext):
            return fmt
    return None


def python_docs_files() -> list[str]:
    """The standard library's own .py files: a real English corpus present on every machine."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Skip installed packages and the test suite (test fixtures are mostly not prose).
        dirnames[:] = sorted(
            d for d in dirnames if d not in {"site-packages", "test", "tests", "idle_test", "__pycache__"}
        )
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return files


def _utf8_name(path: str) -> bool:
    """False for a file name that is not UTF-8 (Python hands such bytes over as lone surrogates)."""
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@dataclass
class Inputs:
    """The files to read, and how many files under the sources were left out, by reason."""

    files: list[InputFile]
    skipped: Counter[str] = field(default_factory=Counter)


def _local_files(base: str, skipped: Counter[str]) -> Iterator[tuple[str, os.stat_result]]:
    """Files below a local folder, each real file once: symbolic links are followed, but a folder already
    visited (a link cycle, or two links to one folder) is not entered again."""
    seen_dirs = {os.path.realpath(base)}
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real in seen_dirs:
                skipped[SKIP_LINK_LOOP] += 1
            else:
                seen_dirs.add(real)
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            try:
                yield path, os.stat(path)
            except OSError:
                skipped[SKIP_BROKEN_LINK] += 1


def _listing(src: SourceConfig, skipped: Counter[str]) -> Iterator[tuple[str, int, float | None]]:
    """(path, size, mtime) of every file a source names, before filtering by name."""
    fs, base = storage.filesystem(src.path)
    prefix = src.path[: src.path.index("://") + 3] if storage.is_remote(src.path) else ""
    pattern = None
    if storage.glob_base(base) != base:
        pattern, base = base, storage.glob_base(base)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"data.sources: input path '{src.path}' does not exist")
    if info.type == pafs.FileType.File:
        listed = [(base, info.size or 0, info.mtime.timestamp() if info.mtime else None)]
    elif not prefix:
        listed = sorted((p, st.st_size, st.st_mtime) for p, st in _local_files(base, skipped))
    else:  # object stores have no links
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        listed = sorted(
            (i.path, i.size or 0, i.mtime.timestamp() if i.mtime else None)
            for i in infos
            if i.type == pafs.FileType.File
        )
    for path, size, mtime in listed:
        if pattern is None or fnmatch.fnmatch(path, pattern):
            yield prefix + path, size, mtime


def find_inputs(sources: list[SourceConfig]) -> Inputs:
    """Expand each source (file, folder, glob, URI, builtin) into the files to read, in a stable order.
    Each real file is read once, however many links or sources lead to it."""
    inputs = Inputs([])
    seen: set[str] = set()
    for src in sources:
        if src.path == BUILTIN_PYTHON_DOCS:
            for path in python_docs_files():
                st = os.stat(path)
                inputs.files.append(InputFile(path, "python-docs", st.st_size, st.st_mtime))
            continue
        for path, size, mtime in _listing(src, inputs.skipped):
            name = os.path.basename(path)
            fmt = _format_of(path, src.format)
            if not _utf8_name(path):
                inputs.skipped[SKIP_UNDECODABLE_NAME] += 1
            elif name.startswith((".", "_")):
                inputs.skipped[SKIP_HIDDEN] += 1  # hidden files and markers such as _SUCCESS
            elif fmt is None:
                inputs.skipped[SKIP_UNKNOWN_EXTENSION] += 1
            elif (real := path if storage.is_remote(path) else os.path.realpath(path)) in seen:
                inputs.skipped[SKIP_ALREADY_LISTED] += 1
            else:
                seen.add(real)
                inputs.files.append(InputFile(path, fmt, size, mtime, src.id_field, src.text_field))
    if not inputs.files:
        paths = ", ".join(s.path for s in sources)
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(inputs.skipped.items()))
        raise InputError(
            f"data.sources: no readable files (.jsonl, .jsonl.gz, .parquet, .txt, .md) under {paths}"
            + (f" (skipped: {skipped})" if skipped else "")
        )
    return inputs


def _row(id_: str, text: str | None, source: str, pos: int = 0, reject: str | None = None) -> dict:
    return {"id": id_, "text": text, "source": source, "reject": reject, "pos": pos}


def _reject(source: str, pos: int, reason: str, raw: str = "", where: str | None = None) -> dict:
    """A row set aside with its reason; its id names the file and the line (or `where` in the file)."""
    return _row(f"{source}:{where or pos}", raw[:MAX_RAW_CHARS], source, pos, reason)


class TruncatedInput(Exception):
    """A compressed stream ended before its end marker; `tail` is the incomplete last line."""

    def __init__(self, tail: bytes = b""):
        super().__init__("compressed stream ended early")
        self.tail = tail


def _gunzip(raw, chunk_size: int) -> Iterator[bytes]:
    """Decompress a gzip stream chunk by chunk, yielding every byte that decodes before a truncation
    (pyarrow's own decompressor raises on the first read and loses the whole chunk). Handles files of
    several concatenated gzip members, as `cat a.gz b.gz` makes."""
    decoder, fed = zlib.decompressobj(wbits=31), False
    while data := raw.read(chunk_size):
        while data:
            fed = True
            if out := decoder.decompress(data):
                yield out
            data = b""
            if decoder.eof:
                data = decoder.unused_data
                decoder, fed = zlib.decompressobj(wbits=31), False
    if fed and not decoder.eof:
        raise TruncatedInput


def _chunks(path: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """The bytes of a jsonl or text file in bounded chunks, decompressed when the name ends in .gz."""
    fs, p = storage.filesystem(path)
    with fs.open_input_stream(p, compression=None) as raw:
        if path.lower().endswith(".gz"):
            yield from _gunzip(raw, chunk_size)
        else:
            while chunk := raw.read(chunk_size):
                yield chunk


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Lines of a chunked byte stream, so a large file never sits in memory whole. A UTF-8 byte-order
    mark before the first line is dropped. On truncation, raises TruncatedInput with the partial line."""
    tail, first = b"", True
    try:
        for chunk in chunks:
            if first:
                chunk, first = chunk.removeprefix(UTF8_BOM), False
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            yield from lines
    except TruncatedInput:
        raise TruncatedInput(tail) from None
    if tail:
        yield tail


def _json_document(f: InputFile, lineno: int, line: str) -> dict:
    """One decoded jsonl line -> a document row, or a reject naming what is wrong with it."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return _reject(f.path, lineno, f"{MALFORMED_JSON}: {exc.msg}", line)
    except RecursionError:
        return _reject(f.path, lineno, f"{MALFORMED_JSON}: nested too deeply", line)
    except ValueError as exc:  # an integer past sys.get_int_max_str_digits(): one bad line, not a failed run
        return _reject(f.path, lineno, f"{MALFORMED_JSON}: {str(exc).split(':')[0]}", line)
    if not isinstance(obj, dict):
        return _reject(f.path, lineno, f"{NOT_AN_OBJECT}: a JSON {type(obj).__name__}", line)
    if f.text_field not in obj:
        return _reject(f.path, lineno, f"{MISSING_TEXT_FIELD}: no '{f.text_field}'", line)
    text = obj[f.text_field]
    if not isinstance(text, str):
        return _reject(f.path, lineno, f"{TEXT_NOT_STRING}: '{f.text_field}' is {type(text).__name__}", line)
    doc_id = obj.get(f.id_field)
    return _row(str(doc_id) if doc_id is not None else f"{f.path}:{lineno}", text, f.path, lineno)


def read_jsonl(f: InputFile) -> Iterator[dict]:
    lineno, content = 0, False
    try:
        for lineno, raw in enumerate(_lines(_chunks(f.path)), start=1):
            if not raw.strip():
                continue
            content = True
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                reason = f"{INVALID_UTF8}: {exc.reason} at byte {exc.start}"
                yield _reject(f.path, lineno, reason, raw.decode("utf-8", errors="replace"))
                continue
            yield _json_document(f, lineno, line)
    except TruncatedInput as exc:
        lineno += 1
        reason = f"{TRUNCATED_FILE}: the compressed stream ends early; line {lineno} is incomplete"
        yield _reject(f.path, lineno, reason, exc.tail.decode("utf-8", errors="replace"))
        return
    if not content:  # no bytes, or blank lines only: no document, and the reason says why
        yield _reject(f.path, 0, EMPTY_FILE)


def read_parquet(f: InputFile) -> Iterator[dict]:
    fs, p = storage.filesystem(f.path)
    with fs.open_input_file(p) as stream:
        pf = pq.ParquetFile(stream)
        names = pf.schema_arrow.names
        if f.text_field not in names:
            reason = f"{MISSING_TEXT_FIELD}: no column '{f.text_field}' (columns: {names})"
            yield _reject(f.path, 0, reason, where="schema")
            return
        columns = [f.text_field] + ([f.id_field] if f.id_field in names else [])
        offset = 0
        for batch in pf.iter_batches(columns=columns, batch_size=ROWS_PER_BATCH):
            texts = batch.column(f.text_field).to_pylist()
            ids = batch.column(f.id_field).to_pylist() if f.id_field in names else [None] * len(texts)
            for row_no, doc_id, text in zip(range(offset, offset + len(texts)), ids, texts):
                if not isinstance(text, str):
                    reason = f"{TEXT_NOT_STRING}: '{f.text_field}' is {type(text).__name__}"
                    yield _reject(f.path, row_no, reason)
                else:
                    yield _row(
                        str(doc_id) if doc_id is not None else f"{f.path}:{row_no}", text, f.path, row_no
                    )
            offset += len(texts)
        if offset == 0:
            yield _reject(f.path, 0, EMPTY_FILE)


def read_text(f: InputFile) -> Iterator[dict]:
    """A whole file is one document (its id is its path)."""
    parts: list[bytes] = []
    try:
        parts.extend(_chunks(f.path))
    except TruncatedInput:
        data = b"".join(parts).removeprefix(UTF8_BOM)
        reason = f"{TRUNCATED_FILE}: the compressed stream ends early; the document is incomplete"
        yield _reject(f.path, 0, reason, data.decode("utf-8", errors="replace"))
        return
    data = b"".join(parts).removeprefix(UTF8_BOM)
    if not data.strip():
        yield _reject(f.path, 0, EMPTY_FILE)
        return
    try:
        yield _row(f.path, data.decode("utf-8"), f.path, 0)
    except UnicodeDecodeError as exc:
        reason = f"{INVALID_UTF8}: {exc.reason} at byte {exc.start}"
        yield _reject(f.path, 0, reason, data.decode("utf-8", errors="replace"))


def read_python_docs(f: InputFile) -> Iterator[dict]:
    """Module, class and function docstrings of one stdlib file; ids are path:qualified.name."""
    rel = os.path.relpath(f.path, sysconfig.get_paths()["stdlib"])
    try:
        with open(f.path, "rb") as src:
            tree = ast.parse(src.read(), filename=f.path)
    except (SyntaxError, ValueError) as exc:  # a stdlib file written for another Python version
        yield _reject(f.path, 0, f"{UNPARSABLE_PYTHON}: {exc}")
        return

    def walk(node: ast.AST, qual: str) -> Iterator[dict]:
        doc = (
            ast.get_docstring(node, clean=False)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            else None
        )
        if doc:
            yield _row(f"python-docs/{rel}:{qual or '<module>'}", inspect.cleandoc(doc), f.path)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                yield from walk(child, f"{qual}.{child.name}" if qual else child.name)

    seen: dict[str, int] = {}
    for pos, row in enumerate([*walk(tree, ""), *_reference_topics(tree, rel, f.path)]):
        row["pos"] = pos
        # A name defined twice (in if/else branches, say) would repeat an id; ids must be unique.
        seen[row["id"]] = seen.get(row["id"], 0) + 1
        if seen[row["id"]] > 1:
            row["id"] += f"#{seen[row['id']]}"
        yield row


def _reference_topics(tree: ast.Module, rel: str, path: str) -> Iterator[dict]:
    """pydoc_data/topics.py holds the language reference as a dict of topic -> text; each topic is a document."""
    if not rel.endswith("topics.py"):
        return
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            for key, value in zip(node.value.keys, node.value.values):
                if (
                    isinstance(key, ast.Constant)
                    and isinstance(value, ast.Constant)
                    and isinstance(value.value, str)
                ):
                    yield _row(f"python-docs/{rel}:topic:{key.value}", value.value, path)


READERS = {"jsonl": read_jsonl, "parquet": read_parquet, "text": read_text, "python-docs": read_python_docs}


def read_file(f: InputFile) -> Iterator[dict]:
    try:
        yield from READERS[f.format](f)
    except (OSError, EOFError, zlib.error, pa.ArrowException) as exc:
        yield _reject(f.path, -1, f"{UNREADABLE_FILE}: {type(exc).__name__}: {exc}", where="file")


def _encodable(row: dict) -> dict:
    """The row itself, or a reject when its id or text holds a lone surrogate (JSON allows the escape
    "\\ud800", and Python source may too, but no UTF-8 text can carry one)."""
    for key in ("id", "text"):
        try:
            (row[key] or "").encode("utf-8")
        except UnicodeEncodeError as exc:
            raw = row["text"].encode("utf-8", "backslashreplace").decode("utf-8")
            reason = f"{INVALID_UNICODE}: lone surrogate in '{key}' at character {exc.start}"
            return _reject(row["source"], row["pos"], reason, raw)
    return row


def _table(rows: list[dict]) -> pa.Table:
    try:
        return pa.Table.from_pylist(rows, schema=SCHEMA)
    except UnicodeEncodeError:  # rare: find the rows at fault only when the batch fails
        return pa.Table.from_pylist([_encodable(r) for r in rows], schema=SCHEMA)


def read_files(batch: dict, rows_per_batch: int = ROWS_PER_BATCH) -> Iterator[pa.Table]:
    """Ray Data stage: rows describing files -> tables of documents of `rows_per_batch` rows (a
    generator, so a big file streams out in bounded batches instead of one huge block)."""
    rows: list[dict] = []
    for record in zip(*batch.values()):
        f = InputFile(**dict(zip(batch.keys(), record)))
        for row in read_file(f):
            rows.append(row)
            if len(rows) >= rows_per_batch:
                yield _table(rows)
                rows = []
    if rows:
        yield _table(rows)


def read_corpus(files: list[InputFile], rows_per_batch: int = ROWS_PER_BATCH):
    """A Ray Dataset of (id, text, source, reject, pos) rows over all files, in tables of `rows_per_batch`
    rows; reading happens in Ray tasks, one file listing block each. The stages mapped after it should
    take each table as their batch (batch_size=None): Ray Data fuses them with the read, and a fused
    task takes max(batch sizes) input rows, which would be that many FILES per task (512 files: a corpus
    of fewer was cleaned by one task; benchmarks/curate_files.py)."""
    import ray.data

    listing = ray.data.from_items([asdict(f) for f in files], override_num_blocks=min(len(files), 200))
    return listing.map_batches(
        read_files, batch_size=1, batch_format="numpy", fn_kwargs={"rows_per_batch": rows_per_batch}
    )
