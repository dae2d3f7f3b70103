"""manifest.json: what an artifact is, the config and inputs that made it, and what happened on the way.

Every stage output carries one, written last (its presence marks the output complete). `parents` lists
the manifests of the artifacts it was made from, so a served model traces back to the corpus snapshot
and the dedup parameters behind it.
"""

from __future__ import annotations

import hashlib
import platform
import time
from typing import Any

from raylm.core import __version__, storage


def fingerprint(files: list[tuple[str, int, float | None]]) -> str:
    """Fingerprint of an input snapshot from (path, size, mtime) triples: cheap on remote stores, and it
    changes when a file is added, removed, resized or rewritten."""
    digest = hashlib.blake2b(digest_size=16)
    for path, size, mtime in sorted(files):
        digest.update(f"{path}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()


def utc_timestamp(seconds: float | None = None) -> str:
    """A time (default: now) as manifests and output markers record it: ISO 8601, UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def write_manifest(
    folder: str, kind: str, config: dict[str, Any], parents: list[str] | None = None, **sections: Any
) -> dict[str, Any]:
    """Write <folder>/manifest.json last, making the folder complete; returns what was written."""
    manifest = {
        "kind": kind,
        "raylm_version": __version__,
        "created_at": utc_timestamp(),
        "host": platform.node(),
        "config": config,
        "parents": parents or [],
        **sections,
    }
    storage.write_json(f"{folder.rstrip('/')}/{storage.MANIFEST}", manifest)
    return manifest


def read_manifest(folder: str) -> dict[str, Any]:
    return storage.read_json(f"{folder.rstrip('/')}/{storage.MANIFEST}")
