"""Hostile job submissions: `raylm submit` given bad recipes, overrides and arguments must exit 2 here,
before it opens any connection to the cluster, so a bad recipe never becomes a job (and never a FAILED
one). The "cluster" is a TCP listener on loopback that counts connections: a submission (or any jobs-API
call) has to connect to it first, so zero connections means no job was created. One valid submission at
the end proves the listener would have seen one. (tests/cluster/test_submit.py shows the same on a real
`ray start --head` for one bad recipe; this file covers many inputs at millisecond cost.)
"""

from __future__ import annotations

import os
import random
import socket
import threading
from pathlib import Path

import pytest
import yaml

from raylm.core.cli import MAX_MESSAGE_LINES, main
from raylm.core.stages import STAGES
from tests.hostile.test_recipes import QUICKSTART, field_cases, garbage_recipes, override_cases

ROOT = Path(__file__).resolve().parents[2]
ENTRY = "job submissions (raylm submit)"


class Listener:
    """A TCP server on loopback that accepts, counts and closes every connection."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()


@pytest.fixture(scope="module")
def cluster():
    listener = Listener()
    yield listener
    listener.sock.close()


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # the job's working dir is the current one; recipes resolve from it
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def submit(capsys, cluster, argv: list[str]) -> tuple[int, str]:
    try:
        rc = main(["submit", *argv, "--address", cluster.address])
    except SystemExit as exc:  # argparse refusing the arguments
        rc = exc.code
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return rc, out.err


def refused(capsys, cluster, argv: list[str]) -> str:
    rc, err = submit(capsys, cluster, argv)
    assert rc == 2, (argv, err[-500:])
    assert err.startswith("raylm: error:") or "usage:" in err, err
    assert len(err.splitlines()) <= MAX_MESSAGE_LINES or "usage:" in err
    assert cluster.connections == 0, f"{argv}: the cluster was contacted"
    return err


def test_bad_overrides_never_reach_the_cluster(capsys, cluster, tally):
    rng = random.Random(31)
    fields = [c for c in field_cases(seed=32) if c[2] == "override"]
    picked = rng.sample(fields, 60)
    for key, value, _ in picked:
        # A stage's section goes with its verb; platform keys (name, ray, tracking, ...) with `run`.
        verb = {s.section: s.name for s in STAGES}.get(key.split(".")[0], "run")
        err = refused(capsys, cluster, [verb, "quickstart", f"{key}={value}"])
        assert key in err, (key, value, err)
    odd = rng.sample(override_cases(), 20)
    for override in odd:
        refused(capsys, cluster, ["curate", "quickstart", override])
    tally(ENTRY, "exit 2, no connection", [f"override {k}={v}" for k, v, _ in picked] + odd)


def test_bad_recipe_files_never_reach_the_cluster(tmp_path, capsys, cluster, tally):
    paths = garbage_recipes(tmp_path)
    tried = []
    for name, path in paths.items():
        if name in ("unreadable",) and os.geteuid() == 0:
            continue
        err = refused(capsys, cluster, ["curate", str(path)])
        assert "not uploaded with the job" not in err, "the content is refused first"
        tried.append(f"recipe file {name}")
    tally(ENTRY, "exit 2, no connection", tried)


def test_bad_arguments_never_reach_the_cluster(tmp_path, capsys, cluster, tally):
    outside = tmp_path / "outside.yaml"
    outside.write_text(yaml.safe_dump(QUICKSTART))
    no_train = tmp_path / "no-train.yaml"
    no_train.write_text(yaml.safe_dump({k: v for k, v in QUICKSTART.items() if k != "train"}))
    missing_input = ["data.sources=[{path: /nonexistent/corpus}]", f"run_dir={tmp_path}/run"]
    (tmp_path / "a-file").write_text("user data\n")
    cases = {
        "unknown verb": ["deploy", "quickstart"],
        "no recipe": ["curate"],
        "negative retries": ["curate", "quickstart", "--retries", "-1"],
        "retries not a number": ["curate", "quickstart", "--retries", "many"],
        "recipe outside the working dir": ["curate", str(outside)],
        "stage without its section": ["train", str(no_train)],
        "missing recipe": ["curate", "no-such-recipe"],
        "recipe is a directory": ["curate", "recipes"],
        "missing local input (checked on a loopback cluster)": ["curate", "quickstart", *missing_input],
        "output over a user file": ["curate", "quickstart", f"data.output={tmp_path}/a-file"],
        "run_dir is the corpus": [
            "curate",
            "quickstart",
            f"run_dir={tmp_path}",
            f"data.sources=[{{path: {tmp_path}}}]",
        ],
    }
    for argv in cases.values():
        refused(capsys, cluster, argv)
    tally(ENTRY, "exit 2, no connection", [f"arguments: {n}" for n in cases])


def test_the_listener_sees_a_valid_submission(tmp_path, capsys, cluster):
    """The control: a valid recipe does try to reach the cluster (and fails there: it is no Ray)."""
    before = cluster.connections
    rc, err = submit(capsys, cluster, ["curate", "quickstart", f"run_dir={tmp_path}/run"])
    assert rc != 0 and cluster.connections > before, err[-500:]
