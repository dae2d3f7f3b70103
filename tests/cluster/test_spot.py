"""The spot interruption watcher (cluster/spot.py).

Fast: each provider's notice read over real HTTP from a local metadata server (AWS IMDSv2 with its
token, GCE's preempted flag), parsed into a drain reason and deadline, and the `ray drain-node` command
built from it. Slow: tests/cluster/spot_scenario.py in a subprocess, a real multi-node Ray cluster
where the watcher drains the node a 2-worker training run is on, and the run resumes on another node.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from spot_scenario import Imds

from raylm.cluster import spot
from raylm.training.checkpoint import step_dir_name

HERE = Path(__file__).resolve().parent


@pytest.fixture
def imds():
    server = Imds()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


class GceHandler(BaseHTTPRequestHandler):
    preempted = "FALSE"

    def do_GET(self) -> None:
        ok = self.path == spot.GCP_NOTICE_PATH and self.headers.get("Metadata-Flavor") == "Google"
        body = (self.preempted if ok else "forbidden").encode()
        self.send_response(200 if ok else 403)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def gce():
    server = ThreadingHTTPServer(("127.0.0.1", 0), GceHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    GceHandler.preempted = "FALSE"


def test_aws_notice_over_imdsv2(imds):
    assert spot.aws_notice(imds.url) is None  # 404: no notice yet
    imds.action = {"action": "terminate", "time": "2026-11-28T12:02:00Z"}
    notice = spot.aws_notice(imds.url)
    assert notice.deadline == datetime(2026, 11, 28, 12, 2, tzinfo=timezone.utc).timestamp()
    assert notice.reason == "aws spot instance-action: terminate at 2026-11-28T12:02:00Z"


def test_aws_notice_needs_the_token(imds):
    # The local server answers 401 without the IMDSv2 token, as AWS does when IMDSv1 is off.
    status, _ = spot.http(imds.url + spot.AWS_NOTICE_PATH)
    assert status == 401
    with pytest.raises(spot.NoticeError, match="IMDSv2 token request"):
        spot.aws_notice(imds.url + "/nowhere")  # a server that gives no token: an error, not "no notice"


def test_gcp_notice(gce):
    _, url = gce
    assert spot.gcp_notice(url) is None
    GceHandler.preempted = "TRUE"
    notice = spot.gcp_notice(url)
    assert 0 < notice.deadline - time.time() <= spot.GCP_NOTICE_S
    assert notice.reason.startswith("gcp preemption notice")


@pytest.mark.parametrize(
    "body", ["", "{}", '{"action": "terminate"}', '{"action": "stop", "time": "soon"}', "[1]"]
)
def test_bad_aws_documents_are_errors(body):
    with pytest.raises(spot.NoticeError):
        spot.parse_aws(body)


def test_bad_gcp_flag_is_an_error():
    with pytest.raises(spot.NoticeError):
        spot.parse_gcp("MAYBE", 0.0)


def test_drain_command():
    notice = spot.Notice("aws spot instance-action: terminate at T", deadline=1000.0)
    cmd = spot.drain_command(notice, "10.0.0.1:6379", "ab" * 28, now=880.4)
    assert cmd[1:4] == ["-m", "ray.scripts.scripts", "drain-node"]
    args = dict(zip(cmd[4::2], cmd[5::2]))
    assert args == {
        "--address": "10.0.0.1:6379",
        "--reason": "DRAIN_NODE_REASON_PREEMPTION",
        "--reason-message": "aws spot instance-action: terminate at T",
        "--deadline-remaining-seconds": "119",
        "--node-id": "ab" * 28,
    }
    # A deadline already past still drains with a deadline (0 would tell Ray "no deadline").
    late = spot.drain_command(notice, "auto", None, now=2000.0)
    assert late[late.index("--deadline-remaining-seconds") + 1] == "1" and "--node-id" not in late


def test_cli_rejects_a_bad_interval():
    result = subprocess.run(
        [sys.executable, "-m", "raylm.cluster.spot", "--provider", "aws", "--interval", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "--interval" in result.stderr


@pytest.mark.slow
def test_notice_drains_node_and_training_resumes_elsewhere(tmp_path):
    out = tmp_path / "spot.json"
    subprocess.run(
        [sys.executable, str(HERE / "spot_scenario.py"), str(out), "--mode", "notice"],
        check=True,
        timeout=600,
    )
    r = json.loads(out.read_text())
    events, hist = r["events"], r["history"]
    assert r["error"] is None, r["error"]
    assert events["watcher_exit_code"] == 0, r["watcher_log"]  # the drain was accepted
    # Every step ran exactly once, on the same samples as an uninterrupted run.
    assert [row["step"] for row in hist] == list(range(1, 17))
    assert [row["sample_rows_sha"] for row in hist] == r["expected_digests"]
    # One restart; the last step before it took the checkpoint the notice asked for, after the notice,
    # and the restart resumed from it (the next step is the first of attempt 1: nothing redone).
    attempts = [row["attempt"] for row in hist]
    assert attempts == sorted(attempts) and set(attempts) == {0, 1}, attempts
    stop = attempts.index(1)  # 1-based step of attempt 0's last row
    assert hist[stop - 1].get("checkpointed"), hist[stop - 1]
    assert hist[stop - 1]["t_wall"] > events["notice"]
    assert events["checkpoint"] == step_dir_name(stop)
    # The workers ran on the spot node, then only on the standby node.
    placement = [p["nodes"] for p in r["placement"]]
    assert placement[0] == ["spot"] and placement[-1] == ["standby"], placement
