"""Loaded by every Python process of the scale scenario (its directory is on PYTHONPATH): a Python audit
hook that records file accesses that assume a shared local disk between nodes.

Each node of the scenario has a folder of its own under RAYLM_SCALE_SANDBOX (HOME, TMPDIR, Ray's temp
dir); RAYLM_SCALE_NODE names this process's node. Recorded, one JSON line per (kind, path) in
RAYLM_SCALE_AUDIT/<node>-<pid>.jsonl:
  other_node  any access to another node's folder (a path only that node would have);
  write_home  a write into this node's HOME (nothing but the storage folder and temp dirs is written);
  write_out   a write outside the sandbox (the storage folder and the inputs are inside it), e.g. /tmp.
Reads of the storage folder, the inputs and anything outside the sandbox (the venv, /proc) are fine.
Python-level opens only (open, os.open, os.mkdir, os.rename): native writers are covered by the
scenario's snapshot of the node folders.
"""

from __future__ import annotations

import os
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_ALLOWED_OUTSIDE = ("/dev/", "/proc/", "/sys/")


def _is_write(mode, flags) -> bool:
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return True
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


class _Auditor:
    def __init__(self, sandbox: str, node: str, log_dir: str):
        self.sandbox = sandbox.rstrip("/") + "/"
        self.own = os.path.join(self.sandbox, "nodes", node) + "/"
        self.home = os.path.join(self.own, "home") + "/"
        self.log_path = os.path.join(log_dir, f"{node}-{os.getpid()}.jsonl")
        self.seen: set[tuple[str, str]] = set()
        self.busy = False
        self.active = True  # the driver turns it off while it starts and stops the nodes (a harness job)

    def kind(self, path: str, write: bool) -> str | None:
        if path.startswith(self.sandbox):
            if path.startswith(self.sandbox + "nodes/") and not path.startswith(self.own):
                return "other_node"
            return "write_home" if write and path.startswith(self.home) else None
        if write and not path.startswith(_ALLOWED_OUTSIDE):
            return "write_out"
        return None

    def __call__(self, event: str, args) -> None:
        if self.busy or not self.active or event not in ("open", "os.mkdir", "os.rename"):
            return
        path = args[0] if event != "os.rename" else args[1]
        if not isinstance(path, (str, bytes)):
            return  # a file descriptor
        write = event != "open" or _is_write(args[1], args[2])
        path = os.path.abspath(os.fsdecode(path))
        found = self.kind(path, write)
        if found and (found, path) not in self.seen:
            self.record(found, path)

    def record(self, found: str, path: str) -> None:
        import json
        import traceback

        self.busy, self.seen = True, self.seen | {(found, path)}
        try:
            where = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()[-8:-2]]
            line = json.dumps({"kind": found, "path": path, "pid": os.getpid(), "stack": where})
            with open(self.log_path, "a") as f:
                f.write(line + "\n")
        finally:
            self.busy = False


def install() -> _Auditor | None:
    sandbox, node = os.environ.get("RAYLM_SCALE_SANDBOX"), os.environ.get("RAYLM_SCALE_NODE")
    if not (sandbox and node):
        return None
    auditor = _Auditor(sandbox, node, os.path.join(sandbox, "audit"))
    sys.addaudithook(auditor)
    return auditor


AUDITOR = install()
