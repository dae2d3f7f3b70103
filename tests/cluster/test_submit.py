"""`raylm submit`: validation before submitting, the path reachability rule, retry decisions, and one
real cluster (`ray start --head` with token auth, in its own process group) that a curation job runs on.

The cluster runs in subprocesses with its own temp dir and ports, so the session's Ray fixture is not
disturbed; it is stopped by killing its process group (`ray stop` would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from raylm.cluster import jobs
from raylm.cluster.submit import (
    RecipePath,
    pinned_overrides,
    recipe_paths,
    runtime_env,
    unreachable,
    validate,
)
from raylm.core.config import load_config
from raylm.core.errors import ConfigError
from tests.synthetic import document

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HEAD = {"is_head_node": True, "resources_total": {"CPU": 4.0}}
WORKER = {"is_head_node": False, "resources_total": {"CPU": 8.0}}


# ---- the reachability rule (a pure function of the recipe's paths and the node list) ----


def paths(*pairs: tuple[str, str]) -> list[RecipePath]:
    return [RecipePath(tuple(key.split(".")), value) for key, value in pairs]


def test_one_node_accepts_local_paths():
    assert unreachable(paths(("run_dir", "/home/me/runs/x")), [HEAD], []) == []


def test_several_nodes_refuse_local_paths_outside_shared_prefixes():
    recipe = paths(
        ("run_dir", "/mnt/shared/runs/x"),
        ("train.model.path", "/home/me/model"),
        ("train.output", "s3://bucket/train"),
        ("data.output", "/mnt/sharedother/x"),  # a sibling of the prefix, not inside it
    )
    bad = unreachable(recipe, [HEAD, WORKER], ["/mnt/shared"])
    assert [p.key for p in bad] == ["train.model.path", "data.output"]


def test_a_head_without_cpus_counts_as_multi_node():
    """A cluster YAML's head usually offers no CPUs: the work runs on workers the autoscaler adds."""
    lone_head = {"is_head_node": True, "resources_total": {"CPU": 0.0}}
    assert [p.key for p in unreachable(paths(("run_dir", "/tmp/x")), [lone_head], [])] == ["run_dir"]


def test_recipe_paths_follow_the_stage_table_and_field_types():
    overrides = ["data.sources=[{path: corpus/a.jsonl}, {path: builtin:python-docs}]", "run_dir=/abs/run"]
    cfg = load_config("quickstart", overrides)
    found = {p.key: p for p in recipe_paths(cfg, ["curate"])}
    assert set(found) == {"run_dir", "data.sources[0].path", "data.sources[1].path", "data.output"}
    assert not found["data.sources[1].path"].is_local  # builtin: sources exist on every node
    bad = unreachable(list(found.values()), [HEAD, WORKER], [])
    assert [p.key for p in bad] == ["run_dir", "data.sources[0].path", "data.output"]


def test_relative_paths_are_pinned_to_where_raylm_submit_runs():
    """The job runs in a temporary copy of this directory: a relative path must not land there."""
    overrides = ["data.sources=[{path: corpus/a.jsonl}]", "data.output=/abs/curated"]
    cfg = load_config("quickstart", overrides)
    pins = dict(
        p.split("=", 1) for p in pinned_overrides("quickstart", overrides, cfg, recipe_paths(cfg, ["curate"]))
    )
    assert pins["run_dir"] == str(REPO / "runs" / "quickstart")
    assert json.loads(pins["data.sources"])[0]["path"] == str(REPO / "corpus" / "a.jsonl")
    assert "data.output" not in pins  # already absolute


def test_runtime_env_sets_deepspeed_to_cpu_only_for_cpu_training():
    cfg = load_config("quickstart")
    assert "DS_ACCELERATOR" not in runtime_env(cfg, ["curate"])["env_vars"]
    env = runtime_env(cfg, ["curate", "train"])
    assert env["env_vars"]["DS_ACCELERATOR"] == "cpu" and env["working_dir"] == "."
    assert {"/.venv", "/runs", "/.git"} <= set(env["excludes"])
    assert (
        "DS_ACCELERATOR"
        not in runtime_env(load_config("quickstart", ["train.use_gpu=true"]), ["train"])["env_vars"]
    )


def test_a_recipe_outside_the_working_dir_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text((REPO / "recipes" / "quickstart.yaml").read_text())
    with pytest.raises(ConfigError, match="not uploaded with the job"):
        validate(str(recipe), [], "curate")
    assert validate("quickstart", [], "curate")[2] == "recipes/quickstart.yaml"


# ---- retries: which failures, and the lineage of ids ----


def test_retry_decision():
    lost = "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task."
    assert jobs.retry_reason(jobs.Outcome("FAILED", "JOB_ENTRYPOINT_COMMAND_ERROR", 1, "", lost))
    assert jobs.retry_reason(jobs.Outcome("FAILED", "JOB_SUPERVISOR_ACTOR_DIED"))
    # a bad recipe (raylm exits 2) is never retried, whatever the logs say
    assert jobs.retry_reason(jobs.Outcome("FAILED", "JOB_ENTRYPOINT_COMMAND_ERROR", 2, "", lost)) is None
    assert (
        jobs.retry_reason(jobs.Outcome("FAILED", "JOB_ENTRYPOINT_COMMAND_ERROR", 1, "", "ValueError")) is None
    )
    assert jobs.retry_reason(jobs.Outcome("FAILED", "RUNTIME_ENV_SETUP_FAILURE", None, "pip failed")) is None
    assert jobs.retry_reason(jobs.Outcome("FAILED", None, 1, "", lost + "\nOutOfMemoryError")) is None
    assert jobs.retry_reason(jobs.Outcome("SUCCEEDED", logs=lost)) is None
    assert jobs.retry_reason(jobs.Outcome("STOPPED", logs=lost)) is None


def test_submission_ids_form_one_lineage():
    base = jobs.submission_id("curate", "My Run_1", now=0)
    assert base.startswith("raylm-curate-my-run-1-19700101-000000-")
    assert [jobs.retry_id(base, n) for n in range(3)] == [base, f"{base}-retry1", f"{base}-retry2"]
    assert jobs.submission_id("curate", "x") != jobs.submission_id("curate", "x")


def test_exit_codes_follow_the_job():
    assert jobs.exit_code(jobs.Outcome("SUCCEEDED")) == 0
    assert jobs.exit_code(jobs.Outcome("FAILED", exit_code=2)) == 2
    assert jobs.exit_code(jobs.Outcome("FAILED", exit_code=None)) == 1
    assert jobs.exit_code(jobs.Outcome("STOPPED")) == 1


# ---- a real head with token auth ----


def free_port() -> int:
    """A free port below the kernel's ephemeral range (32768+), where the random ports of every Ray
    worker on this machine come from, so that none takes it before the head binds it."""
    while True:
        port = random.randrange(20000, 32000)
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            return port


def raylm(*argv: str, env: dict[str, str], timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "raylm"), *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def stop(proc: subprocess.Popen) -> None:
    """End the head: SIGTERM to its process group (`ray start --block` then stops what it started), then
    SIGKILL to whatever is left of its process tree (job drivers run in sessions of their own)."""
    try:
        tree = [proc, *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(timeout=10)


def start_head(tmp: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` on fresh ports; tried again on other ports if one was taken."""
    for _ in range(3):
        dashboard = free_port()
        ports = {
            "--port": free_port(),
            "--dashboard-port": dashboard,
            "--dashboard-agent-listen-port": free_port(),
            "--ray-client-server-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
        }
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "4", "--disable-usage-stats"]
        cmd += [
            "--temp-dir",
            str(tmp / "ray"),
            "--dashboard-host",
            "127.0.0.1",
            "--include-dashboard",
            "true",
        ]
        cmd += [str(x) for item in ports.items() for x in item]
        with (tmp / "head.log").open("w") as log:
            proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        address = f"http://127.0.0.1:{dashboard}"
        if wait_for_jobs_api(address, env, proc, tmp / "head.log"):
            return proc, address
        stop(proc)
    raise AssertionError(f"ray start failed three times:\n{(tmp / 'head.log').read_text()[-3000:]}")


@pytest.fixture(scope="module")
def head():
    """A head with token auth, its own temp dir and ports; yields the env that reaches it and more."""
    tmp = Path(tempfile.mkdtemp(prefix="raylm-head-"))  # short: Ray's unix sockets live under it
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # the cluster nodes have raylm installed
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_ADDRESS": "",
    }
    env.pop("RAY_AUTH_TOKEN", None)
    proc, address = start_head(tmp, env)
    try:
        yield {"env": env, "address": address, "token": token.read_text(), "tmp": tmp}
    finally:
        stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def api(address: str, path: str, token: str | None, data: bytes | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(f"{address}{path}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for_jobs_api(address: str, env: dict[str, str], proc: subprocess.Popen, log: Path) -> bool:
    """True once the jobs API answers; False if `ray start` exited (a port was taken, say)."""
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError):
            if api(address, "/api/jobs/", token)[0] == 200:
                return True
        time.sleep(1)
    raise AssertionError(f"the jobs API at {address} did not come up:\n{log.read_text()[-3000:]}")


def job_ids(head) -> list[str]:
    status, body = api(head["address"], "/api/jobs/", head["token"])
    assert status == 200, body
    return [job["submission_id"] for job in json.loads(body)]


@pytest.mark.slow
def test_without_the_token_a_submission_is_refused_and_creates_no_job(head):
    before = job_ids(head)
    body = json.dumps({"entrypoint": "echo hi"}).encode()
    assert api(head["address"], "/api/jobs/", None, body)[0] == 401
    env = {k: v for k, v in head["env"].items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(head["tmp"])  # no ~/.ray/auth_token either
    proc = raylm("submit", "curate", "quickstart", "--address", head["address"], env=env, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "refused" in proc.stderr and "RAY_AUTH_TOKEN" in proc.stderr
    assert job_ids(head) == before


@pytest.mark.slow
def test_a_bad_recipe_fails_here_with_exit_2_and_creates_no_job(head):
    before = job_ids(head)
    argv = ["submit", "curate", "quickstart", "data.seq_len=-1", "--address", head["address"]]
    proc = raylm(*argv, env=head["env"])
    assert proc.returncode == 2 and "data.seq_len" in proc.stderr, proc.stderr
    assert job_ids(head) == before


@pytest.fixture(scope="module")
def corpus(head):
    rng = random.Random(3)
    root = head["tmp"] / "corpus"
    root.mkdir()
    lines = [json.dumps({"id": f"d{i:03d}", "text": document(rng)}) for i in range(60)]
    (root / "part-0.jsonl").write_text("\n".join(lines) + "\n")
    return root


def job_info(head, job_id: str) -> dict:
    status, body = api(head["address"], f"/api/jobs/{job_id}", head["token"])
    assert status == 200, body
    return json.loads(body)


def kill_supervisor_when_running(head, prefix: str, submitter: subprocess.Popen) -> str:
    """What losing the job's node does to a job: its supervisor actor dies (the driver with it, by
    Ray's watcher). Waits for the first attempt to run, then SIGKILLs its ray::JobSupervisor."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and submitter.poll() is None:
        running = [
            j for j in job_ids(head) if j.startswith(prefix) and job_info(head, j)["status"] == "RUNNING"
        ]
        supervisors = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "ray::JobSupervisor"]
        mine = [p for p in supervisors if str(head["tmp"]) in " ".join(_environ_paths(p))]
        if running and mine:
            for p in mine:
                p.kill()
            return running[0]
        time.sleep(0.5)
    raise AssertionError("the first attempt never ran")


def _environ_paths(p: psutil.Process) -> list[str]:
    """The supervisor's RAY_AUTH_TOKEN_PATH: it lives in this head's temp dir, so a supervisor of
    another cluster on this machine is never touched."""
    with contextlib.suppress(psutil.Error):
        return [p.environ().get("RAY_AUTH_TOKEN_PATH", "")]
    return []


@pytest.mark.slow
def test_a_job_that_loses_its_node_is_retried_and_succeeds(head, corpus):
    """The first attempt loses its supervisor mid-run (as on a lost node); raylm resubmits it as
    <id>-retry1 with metadata linking the two, the retry curates from scratch over the killed attempt's
    staged leftovers, and --follow streams the summary table and exits 0."""
    out = head["tmp"] / "run"
    overrides = [f"data.sources=[{{path: {corpus}}}]", f"run_dir={out}", "data.seq_len=32"]
    overrides += ["data.rows_per_shard=50", "data.tokenizer.vocab_size=400"]
    overrides += ["data.near_dedup.enabled=false", "data.exact_dedup=false"]  # fewer Ray Data stages
    argv = ["submit", "curate", "quickstart", *overrides, "--address", head["address"], "--follow"]
    logs = head["tmp"] / "submit.out"
    with logs.open("w") as sink:
        submitter = subprocess.Popen(
            [str(BIN / "raylm"), *argv, "--retries", "2"],
            cwd=REPO,
            env=head["env"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            first = kill_supervisor_when_running(head, "raylm-curate-quickstart-", submitter)
            rc = submitter.wait(timeout=300)
        finally:
            if submitter.poll() is None:
                submitter.kill()
    output = logs.read_text()
    assert rc == 0, output[-4000:]
    assert f"resubmitting as {first}-retry1" in output and f"{first}-retry1 SUCCEEDED" in output
    assert "curation summary" in output and "docs out" in output, output[-4000:]
    assert (out / "curated" / "manifest.json").is_file()
    killed, retried = job_info(head, first), job_info(head, f"{first}-retry1")
    assert killed["status"] == "FAILED" and killed["error_type"] == "JOB_SUPERVISOR_ACTOR_DIED"
    assert retried["status"] == "SUCCEEDED"
    assert killed["metadata"]["raylm_attempt"] == "0" and retried["metadata"]["raylm_attempt"] == "1"
    assert retried["metadata"]["raylm_lineage"] == first and retried["metadata"]["raylm_retry_of"] == first
    assert retried["entrypoint"] == killed["entrypoint"]  # a retry is the same command
    assert retried["entrypoint"].startswith("raylm curate recipes/quickstart.yaml")
    assert f"{first}-retry2" not in job_ids(head)
    assert "RAY_AUTH" not in json.dumps(retried["runtime_env"])  # the token never travels with the job
