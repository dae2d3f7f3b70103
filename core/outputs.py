"""Who may write where: raylm replaces or clears only folders that raylm itself wrote.

Every stage output is claimed before anything is written into it: a small marker file
(`.raylm-output.json`, naming the kind of output) goes in first, and `manifest.json` goes in last. So
a folder is raylm's own when it holds the marker, or a manifest that raylm wrote (outputs made before the
marker existed). `check_output` runs in each stage's preflight, before Ray starts, and refuses with
exit 2 an output folder that

- is an existing file,
- holds anything that raylm did not write (pointing `data.output` at the corpus would otherwise
  replace the corpus),
- is raylm's output of another kind (a training output given as a curation output),
- lies inside one of the stage's inputs, or contains one.

`staged_output` builds an output under a temporary name and asks `is_raylm_output` again right before
it replaces the folder, so even a caller that skipped the preflight cannot delete foreign files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator

import pyarrow.fs as pafs

from raylm.core import lineage, storage
from raylm.core.artifacts import RUN
from raylm.core.errors import ConfigError

MARKER = ".raylm-output.json"
PARTIAL = ".partial-"  # a staged output's temporary sibling: <final>.partial-<id>
SHOWN_ENTRIES = 3  # how many foreign entries an error message names


def _entries(path: str) -> list[str] | None:
    """Names directly inside a folder; None when `path` does not exist; [""] when it is a file."""
    fs, p = storage.filesystem(path)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type != pafs.FileType.Directory:
        return [""]  # a file: the caller reports it
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
    return sorted(os.path.basename(i.path.rstrip("/")) for i in infos)


def output_kind(path: str) -> str | None:
    """The kind of raylm output at `path` (from its marker, else its manifest), or None if not raylm's."""
    for name in (MARKER, storage.MANIFEST):
        uri = storage.join(path, name)
        if not storage.exists(uri):
            continue
        try:
            doc = storage.read_json(uri)
        except (OSError, ValueError):
            continue  # an unreadable file of that name proves nothing
        if isinstance(doc, dict) and (name == MARKER or "raylm_version" in doc) and "kind" in doc:
            return str(doc["kind"])
    return None


def is_raylm_output(path: str) -> bool:
    """True when `path` is absent, an empty folder, or a folder raylm wrote (any kind)."""
    entries = _entries(path)
    if entries is None or entries == []:
        return True
    return entries != [""] and output_kind(path) is not None


def claim(path: str, kind: str) -> None:
    """Mark a folder as raylm's output of `kind` before writing into it (creates it if needed)."""
    if storage.exists(storage.join(path, MARKER)):
        return
    storage.write_json(
        storage.join(path, MARKER),
        {"kind": kind, "writer": "raylm", "created_at": lineage.utc_timestamp()},
    )


def _real(path: str) -> str:
    """A comparable form of a path: resolved symlinks for local paths, the URI itself otherwise (config
    validation has already made local paths absolute and file:// URIs local)."""
    return path.rstrip("/") if storage.is_remote(path) else os.path.realpath(path)


def _some(names: list[str]) -> str:
    """The first few names, for an error message that must stay one line."""
    return ", ".join(names[:SHOWN_ENTRIES]) + (", ..." if len(names) > SHOWN_ENTRIES else "")


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def check_overlap(key: str, output: str, inputs: dict[str, str]) -> None:
    """Refuse an output inside an input folder, or an input inside the output folder."""
    out = _real(output)
    for input_key, input_path in inputs.items():
        if not input_path or input_path.startswith("builtin:"):
            continue
        src = _real(storage.glob_base(input_path))
        if _inside(out, src):
            raise ConfigError(
                f"{key}: output {output} lies inside the input {input_key} ({input_path}); "
                "choose an output folder outside the inputs"
            )
        if _inside(src, out):
            raise ConfigError(
                f"{key}: input {input_key} ({input_path}) lies inside the output {output}, which "
                "raylm would replace; choose an output folder that holds no input"
            )


def check_output(key: str, path: str, kind: str, inputs: dict[str, str] | None = None) -> None:
    """Preflight of one output folder (see the module docstring); raises ConfigError naming `key`."""
    check_overlap(key, path, inputs or {})
    entries = _entries(path)
    if not entries:  # absent or empty
        return
    if entries == [""]:
        raise ConfigError(f"{key}: {path} is an existing file; an output must be a folder")
    found = output_kind(path)
    if found is None:
        raise ConfigError(
            f"{key}: {path} already holds files that raylm did not write ({_some(entries)}); raylm never "
            "overwrites them: point it at a new or empty folder"
        )
    if found != kind:
        raise ConfigError(
            f"{key}: {path} is a raylm '{found}' output, not a '{kind}' output; point it at a new or "
            "empty folder"
        )


def check_stage_output(
    key: str, path: str, kind: str, run_dir: str, inputs: dict[str, str] | None = None
) -> None:
    """check_output, and check_folder_of_outputs on run_dir too when the output lies inside it."""
    check_output(key, path, kind, inputs)
    if _inside(_real(path), _real(run_dir)):
        check_folder_of_outputs("run_dir", run_dir)


def claim_run_dir(run_dir: str, output: str) -> None:
    """Mark run_dir as raylm's before a stage writes its output inside it."""
    if _inside(_real(output), _real(run_dir)):
        claim(run_dir, RUN)


def check_folder_of_outputs(key: str, path: str) -> None:
    """A folder that holds stage outputs (run_dir): absent, empty, claimed as a run, or holding only raylm
    outputs and their temporary siblings (run folders made before markers existed)."""
    entries = _entries(path)
    if not entries:
        return
    if entries == [""]:
        raise ConfigError(f"{key}: {path} is an existing file; it must be a folder")
    if output_kind(path) == RUN:
        return
    foreign = [e for e in entries if PARTIAL not in e and output_kind(storage.join(path, e)) is None]
    if foreign:
        raise ConfigError(
            f"{key}: {path} already holds files that raylm did not write ({_some(foreign)}); point it at a new "
            "or empty folder"
        )


def publish_incomplete(staging: str, final: str, kind: str, names: list[str]) -> str:
    """Move some entries of a staging folder to `final` without a manifest (so it stays incomplete and a
    rerun replaces it): what a failed stage leaves for the user to read, e.g. the rejected rows when
    every row was rejected. Returns `final`."""
    if staging == final:  # remote outputs are written in place
        return final
    _refuse_foreign(final)
    if os.path.exists(final):
        shutil.rmtree(final)
    claim(final, kind)
    for name in names:
        if os.path.exists(os.path.join(staging, name)):
            os.replace(os.path.join(staging, name), os.path.join(final, name))
    return final


def _refuse_foreign(path: str) -> None:
    if not is_raylm_output(path):
        raise ConfigError(f"{path} holds files that raylm did not write; refusing to replace it")


@contextlib.contextmanager
def staged_output(final: str, kind: str) -> Iterator[str]:
    """Yield a folder to write a stage's output into; it appears at `final` only if the block succeeds.

    The folder is claimed (marker written) first. Local: a sibling temporary folder renamed into place at
    the end, replacing an earlier raylm output there. Remote (no rename): `final` itself, cleared of an
    earlier incomplete raylm attempt first; completeness is the manifest the caller writes last.
    """
    _refuse_foreign(final)
    if storage.is_remote(final):
        if storage.exists(final) and not storage.is_complete(final):
            storage.remove(final)
        claim(final, kind)
        yield final
        return
    final = os.path.abspath(final)
    tmp = f"{final}{PARTIAL}{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        claim(tmp, kind)
        yield tmp
        _refuse_foreign(final)  # checked again: the folder may have changed while the stage ran
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
