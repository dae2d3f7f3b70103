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
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from core import storage
from core.errors import InputError
from pipelines.config import SourceConfig

BUILTIN_PYTHON_DOCS = "builtin:python-docs"
ROWS_PER_BATCH = 2048
MAX_RAW_CHARS = 2000  # how much of a malformed line is kept in rejects/ for inspection

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("reject", pa.string()),
    ]
)

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


def discover(sources: list[SourceConfig]) -> list[InputFile]:
    """Expand each source (file, folder, glob, URI, builtin) into the files to read, in a stable order."""
    found: list[InputFile] = []
    for src in sources:
        if src.path == BUILTIN_PYTHON_DOCS:
            for path in python_docs_files():
                st = os.stat(path)
                found.append(InputFile(path, "python-docs", st.st_size, st.st_mtime))
            continue
        fs, base = storage.filesystem(src.path)
        prefix = src.path[: src.path.index("://") + 3] if storage.is_remote(src.path) else ""
        pattern = None
        if any(ch in base for ch in "*?["):
            pattern, base = base, base[: min(base.find(ch) for ch in "*?[" if ch in base)].rsplit("/", 1)[0]
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"data.sources: input path '{src.path}' does not exist")
        infos = (
            [info]
            if info.type == pafs.FileType.File
            else fs.get_file_info(pafs.FileSelector(base, recursive=True))
        )
        for i in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
            if pattern and not fnmatch.fnmatch(i.path, pattern):
                continue
            if os.path.basename(i.path).startswith((".", "_")):
                continue  # hidden files and markers such as _SUCCESS
            fmt = _format_of(i.path, src.format)
            if fmt is None:
                continue
            mtime = i.mtime.timestamp() if i.mtime is not None else None
            found.append(InputFile(prefix + i.path, fmt, i.size or 0, mtime, src.id_field, src.text_field))
    if not found:
        paths = ", ".join(s.path for s in sources)
        raise InputError(
            f"data.sources: no readable files (.jsonl, .jsonl.gz, .parquet, .txt, .md) under {paths}"
        )
    return found


def _row(id_: str, text: str | None, source: str, reject: str | None = None) -> dict:
    return {"id": id_, "text": text, "source": source, "reject": reject}


def _reject(source: str, where: str, reason: str, raw: str = "") -> dict:
    return _row(f"{source}:{where}", raw[:MAX_RAW_CHARS], source, reason)


def _open(path: str):
    """A pyarrow stream; `.gz` files are decompressed on the fly (pyarrow detects it from the extension)."""
    fs, p = storage.filesystem(path)
    return (
        fs.open_input_file(p) if path.endswith(".parquet") else fs.open_input_stream(p, compression="detect")
    )


def _lines(stream, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a byte stream, read in bounded chunks so a large file never sits in memory whole."""
    tail = b""
    while chunk := stream.read(chunk_size):
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop()
        yield from lines
    if tail:
        yield tail


def read_jsonl(f: InputFile) -> Iterator[dict]:
    with _open(f.path) as stream:
        lineno = 0
        for lineno, raw in enumerate(_lines(stream), start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield _reject(
                    f.path,
                    str(lineno),
                    f"invalid_utf8: {exc.reason} at byte {exc.start}",
                    raw.decode("utf-8", errors="replace"),
                )
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield _reject(f.path, str(lineno), f"malformed_json: {exc.msg}", line)
                continue
            if not isinstance(obj, dict):
                yield _reject(f.path, str(lineno), f"not_an_object: a JSON {type(obj).__name__}", line)
            elif f.text_field not in obj:
                yield _reject(f.path, str(lineno), f"missing_text_field: no '{f.text_field}'", line)
            elif not isinstance(obj[f.text_field], str):
                yield _reject(
                    f.path,
                    str(lineno),
                    f"text_not_string: '{f.text_field}' is {type(obj[f.text_field]).__name__}",
                    line,
                )
            else:
                doc_id = obj.get(f.id_field)
                yield _row(
                    str(doc_id) if doc_id is not None else f"{f.path}:{lineno}", obj[f.text_field], f.path
                )
        if lineno == 0:
            yield _reject(f.path, "0", "empty_file")


def read_parquet(f: InputFile) -> Iterator[dict]:
    with _open(f.path) as stream:
        pf = pq.ParquetFile(stream)
        names = pf.schema_arrow.names
        if f.text_field not in names:
            yield _reject(
                f.path, "schema", f"missing_text_field: no column '{f.text_field}' (columns: {names})"
            )
            return
        columns = [f.text_field] + ([f.id_field] if f.id_field in names else [])
        offset = 0
        for batch in pf.iter_batches(columns=columns, batch_size=ROWS_PER_BATCH):
            texts = batch.column(f.text_field).to_pylist()
            ids = batch.column(f.id_field).to_pylist() if f.id_field in names else [None] * len(texts)
            for i, (doc_id, text) in enumerate(zip(ids, texts)):
                row_no = offset + i
                if not isinstance(text, str):
                    yield _reject(
                        f.path, str(row_no), f"text_not_string: '{f.text_field}' is {type(text).__name__}"
                    )
                else:
                    yield _row(str(doc_id) if doc_id is not None else f"{f.path}:{row_no}", text, f.path)
            offset += len(texts)
        if offset == 0:
            yield _reject(f.path, "0", "empty_file")


def read_text(f: InputFile) -> Iterator[dict]:
    with _open(f.path) as stream:
        data = stream.read()
    if not data.strip():
        yield _reject(f.path, "0", "empty_file")
        return
    try:
        yield _row(f.path, data.decode("utf-8"), f.path)
    except UnicodeDecodeError as exc:
        yield _reject(
            f.path,
            "0",
            f"invalid_utf8: {exc.reason} at byte {exc.start}",
            data.decode("utf-8", errors="replace"),
        )


def read_python_docs(f: InputFile) -> Iterator[dict]:
    """Module, class and function docstrings of one stdlib file; ids are path:qualified.name."""
    rel = os.path.relpath(f.path, sysconfig.get_paths()["stdlib"])
    try:
        with open(f.path, "rb") as src:
            tree = ast.parse(src.read(), filename=f.path)
    except (SyntaxError, ValueError) as exc:  # a stdlib file written for another Python version
        yield _reject(f.path, "0", f"unparsable_python: {exc}")
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
    for row in [*walk(tree, ""), *_reference_topics(tree, rel, f.path)]:
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
    except (OSError, EOFError, pa.ArrowException) as exc:
        yield _reject(f.path, "file", f"unreadable_file: {type(exc).__name__}: {exc}")


def read_files(batch: dict) -> Iterator[pa.Table]:
    """Ray Data stage: rows describing files -> tables of documents (a generator, so a big file streams
    out in bounded batches instead of one huge block)."""
    rows: list[dict] = []
    for record in zip(*batch.values()):
        f = InputFile(**dict(zip(batch.keys(), record)))
        for row in read_file(f):
            rows.append(row)
            if len(rows) >= ROWS_PER_BATCH:
                yield pa.Table.from_pylist(rows, schema=SCHEMA)
                rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=SCHEMA)


def read_corpus(files: list[InputFile]):
    """A Ray Dataset of (id, text, source, reject) rows over all files; reading happens in Ray tasks."""
    import ray.data

    listing = ray.data.from_items([asdict(f) for f in files], override_num_blocks=min(len(files), 200))
    return listing.map_batches(read_files, batch_size=1, batch_format="numpy")
