"""Fault injection into real jobs, one scenario of each kind with few faults (benchmarks/chaos.py runs
the longer, seeded version and records the figures in BENCHMARKS.md).

Each scenario is a script in this folder run in a subprocess (its own Ray cluster, temp dir and ports,
so the session's Ray is untouched); it writes a JSON of what happened and the tests assert on it. The
three scenarios start together, on first use (most of their time is spent waiting on Ray's failure
detection and restarts, not computing), so the module takes about as long as the longest one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
TRAIN_PLAN = "gcs_restart,ckpt_kill,drain"
TRAIN_STEPS = 14
SCENARIOS = {
    "train": ("train_chaos.py", "--faults", TRAIN_PLAN, "--max-steps", str(TRAIN_STEPS)),
    "serve": ("serve_chaos.py", "--clients", "6"),
    "curate": ("curate_chaos.py", "--kills", "1", "--docs", "120", "--light"),
}


def needed(session) -> list[str]:
    """The scenarios the selected tests of this module use (a test's name says which: training,
    serving, curation)."""
    names = " ".join(item.name for item in session.items if item.path == Path(__file__))
    words = {"train": "training", "serve": "serving", "curate": "curation"}
    return [name for name, word in words.items() if word in names]


@pytest.fixture(scope="module")
def launched(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("chaos")
    procs = {}
    for name in needed(request.session):
        script, *args = SCENARIOS[name]
        out, log = root / f"{name}.json", open(root / f"{name}.log", "w")  # noqa: SIM115
        cmd = [sys.executable, str(HERE / script), str(out), *args]
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), out, log)
    yield procs
    for proc, _, log in procs.values():
        if proc.poll() is None:
            proc.kill()
        log.close()


def result(launched, name: str, timeout: float = 900) -> dict:
    proc, out, log = launched[name]
    rc = proc.wait(timeout)
    log.flush()
    assert rc == 0, Path(log.name).read_text()[-4000:]
    return json.loads(out.read_text())


def test_training_loses_nothing_to_gcs_restart_checkpoint_kill_and_drain(launched):
    """During one 2-worker ZeRO-3 run on a 3-node cluster: a GCS kill + restart (RocksDB-backed), a
    worker-node kill during a checkpoint write, a preemption drain with a deadline. (Kills at random
    steps, and more of each, are benchmarks/chaos.py's.)"""
    r = result(launched, "train")
    assert r["director_error"] is None, r["director_error"]
    assert r["reference"]["error"] is None and r["chaos"]["error"] is None, (r["reference"], r["chaos"])
    faults = {f["kind"]: f for f in r["faults"]}
    assert sorted(faults) == sorted(TRAIN_PLAN.split(",")), r["faults"]
    assert all(f["recovered"] for f in r["faults"]), r["faults"]
    # The GCS came back while the run went on (checkpoints committed), without restarting the workers.
    gcs = faults["gcs_restart"]
    assert gcs["commits_after"] > 0 and not gcs["training_restarted"], gcs
    assert faults["ckpt_kill"]["during_write"] in ("local", "storage")
    assert faults["drain"]["drain_accepted"], faults["drain"]["drain_output"]
    hist = r["history"]
    assert [row["step"] for row in hist] == list(range(1, TRAIN_STEPS + 1))
    assert [row["sample_rows_sha"] for row in hist] == r["expected_digests"]
    # Zero lost or corrupt committed checkpoints; every resume from the last committed step.
    assert r["checkpoints"] and not r["lost_checkpoints"] and not r["corrupt_checkpoints"], r["checkpoints"]
    assert len(r["resumes"]) == 2, r["resumes"]  # checkpoint kill, drain
    assert all(x["from_step"] == x["last_committed"] for x in r["resumes"]), r["resumes"]
    # Bitwise: the same losses and final weights as the fault-free run with the same seed.
    assert r["losses_equal"] and r["weights_equal"] is True


def test_serving_under_load_recovers_from_replica_kill_and_gcs_restart(launched):
    """6 clients on 2 replicas: a replica SIGKILLed, then the GCS restarted (RocksDB-backed)."""
    r = result(launched, "serve")
    assert sorted(f["kind"] for f in r["faults"]) == ["gcs_restart", "replica_kill"], r["faults"]
    assert all(f["recovered"] for f in r["faults"]), r["faults"]  # the replica came back
    assert r["requests"] > 20 and r["requests_after_last_fault"] > 0, r["outcomes"]
    # No hang, and failures only among the requests in flight when the replica died.
    assert r["outcomes"].get("hang", 0) == 0, r["failed"]
    assert r["unexplained_failures"] == 0, r["failed"]
    gcs = next(f for f in r["faults"] if f["kind"] == "gcs_restart")
    assert gcs["failed_during"] == 0, r["failed"]  # requests never need the GCS


def test_requests_in_flight_on_a_killed_replica_are_retried_or_get_a_clean_openai_error(launched):
    """serving/gateway.py resends a request whose replica died before answering, and answers 503 with an
    OpenAI error body when that fails too: never Ray Serve's plain-text 500."""
    r = result(launched, "serve")
    kill = next(f for f in r["faults"] if f["kind"] == "replica_kill")
    assert kill["in_flight"] > 0, kill  # clients send back to back: some requests met the kill
    assert r["unclean_failures"] == 0, r["failed"]


def test_curation_after_worker_kill_equals_clean_run(launched):
    """A Ray Data worker SIGKILLed mid-pipeline: the run (or its rerun, if it failed) gives the clean
    run's output."""
    r = result(launched, "curate")
    assert r["clean"]["error"] is None, r["clean"]
    assert len(r["faults"]) == 1, r  # a data worker was killed mid-pipeline
    assert (r["rerun"] or r["chaos"])["error"] is None, (r["chaos"], r["rerun"])
    assert r["differences"] == [], r["differences"]
