"""Local and remote paths (s3://, gs://, hdfs://) through pyarrow.fs: read, write, list, remove.

An output folder is complete when its manifest.json exists: stages write everything else first and the
manifest last. Staging a whole output folder (and refusing to replace what raylm did not write) is
core/outputs.py's job.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow.fs as pafs

MANIFEST = "manifest.json"


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def join(base: str, *parts: str) -> str:
    """Join path parts for local paths and URIs alike (os.path.join would mangle s3://)."""
    return "/".join([base.rstrip("/"), *parts])


def glob_base(path: str) -> str:
    """The folder part of a path with a glob (`/data/*.jsonl` -> `/data`); the path itself without one."""
    cut = min((path.find(ch) for ch in "*?[" if ch in path), default=-1)
    return path if cut < 0 else path[:cut].rsplit("/", 1)[0] or "/"


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or URI."""
    if is_remote(uri) or uri.startswith("file://"):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def write_text(uri: str, text: str) -> None:
    """Write a small file so that readers see the old content or the new, never a torn one."""
    fs, path = filesystem(uri)
    fs.create_dir(os.path.dirname(path), recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:  # object stores write whole objects atomically
        with fs.open_output_stream(path) as f:
            f.write(text.encode("utf-8"))


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(os.path.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local folder's files to a folder that may be remote (HF save_pretrained writes locally)."""
    for root, _, names in os.walk(local_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), local_dir)
            with open(os.path.join(root, name), "rb") as f:
                write_bytes(f"{uri.rstrip('/')}/{rel}", f.read())


def copy_tree(src: str, dst: str) -> None:
    """Copy a folder's files into dst; either side may be local or remote."""
    import pyarrow.fs as pafs

    src_fs, src_path = filesystem(src)
    dst_fs, dst_path = filesystem(dst)
    pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)


def local_dir(uri: str) -> str:
    """A local folder with the content of `uri`: the path itself when local, else a downloaded copy."""
    if not is_remote(uri):
        return os.path.abspath(uri)
    import tempfile

    target = tempfile.mkdtemp(prefix="raylm-")
    fs, base = filesystem(uri)
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if info.type == pafs.FileType.File:
            dst = os.path.join(target, os.path.relpath(info.path, base))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with fs.open_input_stream(info.path) as src, open(dst, "wb") as out:
                out.write(src.read())
    return target


@contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """local_dir for as long as the context lasts: a downloaded copy is removed at its end (a worker on
    every node would otherwise leave one behind per task or actor)."""
    local = local_dir(uri)
    try:
        yield local
    finally:
        if is_remote(uri):
            shutil.rmtree(local, ignore_errors=True)


@contextmanager
def local_file(uri: str) -> Iterator[str]:
    """A local path of one file for as long as the context lasts: the path itself, or a downloaded copy
    removed at its end (a model file that a library can only open from disk)."""
    if not is_remote(uri):
        yield uri
        return
    import tempfile

    fs, path = filesystem(uri)
    with tempfile.NamedTemporaryFile(suffix=os.path.basename(path)) as tmp:
        with fs.open_input_stream(path) as src:
            tmp.write(src.read())
        tmp.flush()
        yield tmp.name


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def is_complete(folder: str) -> bool:
    """A stage output is complete once its manifest exists."""
    return exists(f"{folder.rstrip('/')}/{MANIFEST}")


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files below a folder (recursive), as URIs/paths in the caller's form, sorted."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    prefix = uri[: uri.index("://") + 3] if is_remote(uri) else ""
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))
