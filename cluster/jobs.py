"""Ray jobs for `raylm submit`: the address and token, the cluster's nodes, submission ids with their
retry lineage, which failures are worth a retry, and following a job to its end.

Everything talks to the cluster's dashboard over HTTP (JobSubmissionClient, the state API); nothing
here calls ray.init, so submitting never starts or joins a Ray instance on this machine.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from raylm.core.errors import RaylmError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
LOG_TAIL_CHARS = 64 << 10  # the end of a failed job's logs is where Ray prints why it died
POLL_S = 1.0

# What Ray prints when a job failed because the cluster lost a node or a process, not because of the
# job's own code or config. A rerun resumes from the last committed output or checkpoint.
NODE_LOSS_MARKERS = (
    "NodeDiedError",
    "ActorDiedError",
    "ActorUnavailableError",
    "WorkerCrashedError",
    "OwnerDiedError",
    "ObjectLostError",
    "ObjectFetchTimedOutError",
    "RaySystemError",
    "The actor died unexpectedly",
    "node was terminated",
    "node has been marked dead",
    "The node with node id",
    "died because of a node failure",
    "was preempted",
)
# Failures that a resubmission repeats: a bad recipe or input (raylm exits 2), memory exhaustion.
NEVER_RETRY_EXIT_CODES = (2,)
NEVER_RETRY_MARKERS = ("OutOfMemoryError",)


def resolve_address(address: str | None) -> str:
    """--address, else RAY_ADDRESS, else the local dashboard; the jobs API speaks HTTP to the dashboard."""
    return (address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS).rstrip("/")


def is_loopback(address: str) -> bool:
    host = urlsplit(address if "://" in address else f"http://{address}").hostname or ""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def enable_token(address: str) -> None:
    """Make JobSubmissionClient send Ray's token (Authorization: Bearer ...) when one is configured.

    Ray's clients send it only in token mode (RAY_AUTH_MODE=token). Like ray.init, which turns token
    mode on by itself only for a cluster on this machine, raylm sends a token found in the default file
    (~/.ray/auth_token) only to a loopback address; a token given explicitly (RAY_AUTH_TOKEN or
    RAY_AUTH_TOKEN_PATH) is sent to any address. RAY_AUTH_MODE, when set, decides alone. The token is
    read by Ray's own loader and never copied into the job's runtime env or any file.
    """
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return
    explicit = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if explicit or is_loopback(address):
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def explain(exc: Exception, address: str) -> RaylmError:
    """A short RaylmError for a failed request; a refused token gets the hint to set one."""
    text = str(exc)
    if "401" in text or "403" in text or "Authentication" in text:
        return RaylmError(
            f"the Ray cluster at {address} refused the request ({text.splitlines()[0][:200]}); set "
            "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token (see `ray get-auth-token`)"
        )
    return RaylmError(f"cannot reach the Ray jobs API at {address}: {text.splitlines()[0][:300]}")


def connect(address: str):
    """A JobSubmissionClient for the dashboard at `address`, sending the token when one is configured."""
    from ray.job_submission import JobSubmissionClient

    enable_token(address)
    try:
        return JobSubmissionClient(address)
    except (
        Exception
    ) as exc:  # ConnectionError, RuntimeError with the HTTP status: both are the cluster's answer
        raise explain(exc, address) from None


def alive_nodes(address: str) -> list[dict]:
    """The cluster's alive nodes from the dashboard's state API (HTTP, with the token)."""
    from ray.util.state import list_nodes

    try:
        nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")], detail=True)
    except Exception as exc:
        raise explain(exc, address) from None
    return [{"is_head_node": n.is_head_node, "resources_total": n.resources_total} for n in nodes]


def submission_id(verb: str, name: str, now: float | None = None) -> str:
    """raylm-<verb>-<name>-<UTC stamp>-<4 hex>: sortable, readable in `ray job list`, and unique even
    for two submissions in the same second."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "run"
    return f"raylm-{verb}-{slug}-{stamp}-{secrets.token_hex(2)}"


def retry_id(base: str, attempt: int) -> str:
    return base if attempt == 0 else f"{base}-retry{attempt}"


@dataclass(frozen=True)
class Outcome:
    """How one job ended, as the jobs API reports it, plus the end of its logs."""

    status: str
    error_type: str | None = None
    exit_code: int | None = None
    message: str = ""
    logs: str = ""


def retry_reason(outcome: Outcome) -> str | None:
    """Why a failed job is worth resubmitting (the cluster lost a node or a process), or None.

    A job that succeeded or was stopped, a bad recipe or input (raylm exits 2), a runtime env that did
    not install and an out-of-memory kill are not retried: a rerun would fail the same way.
    """
    if outcome.status != "FAILED" or outcome.exit_code in NEVER_RETRY_EXIT_CODES:
        return None
    if outcome.error_type == "JOB_SUPERVISOR_ACTOR_DIED":
        return "the job's supervisor died (its node was lost)"
    text = f"{outcome.message}\n{outcome.logs[-LOG_TAIL_CHARS:]}"
    if any(marker in text for marker in NEVER_RETRY_MARKERS):
        return None
    for marker in NODE_LOSS_MARKERS:
        if marker in text:
            return f"lost a node or process ({marker})"
    return None


def outcome(client, job_id: str) -> Outcome:
    info = client.get_job_info(job_id)
    status = str(getattr(info.status, "value", info.status))
    logs = client.get_job_logs(job_id)[-LOG_TAIL_CHARS:] if status == "FAILED" else ""
    error_type = getattr(info.error_type, "value", info.error_type)
    return Outcome(status, error_type, info.driver_exit_code, info.message or "", logs)


def exit_code(result: Outcome) -> int:
    """0 when the job succeeded; the job's own exit code when it exited with one (2: a bad recipe), else 1."""
    if result.status == "SUCCEEDED":
        return 0
    return result.exit_code if result.exit_code and result.exit_code > 0 else 1


async def _stream_logs(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def wait(client, job_id: str, follow: bool) -> Outcome:
    """Wait for the job to end, streaming its logs to stdout with `follow`."""
    if follow:
        try:
            asyncio.run(_stream_logs(client, job_id))
        except RuntimeError as exc:  # the log stream closed early (a dashboard restart): keep polling
            print(f"raylm: log stream of {job_id} ended: {exc}", file=sys.stderr)
    while str(getattr(client.get_job_status(job_id), "value", "")) not in TERMINAL:
        time.sleep(POLL_S)
    return outcome(client, job_id)


@dataclass
class Job:
    """What every attempt submits: the same command, runtime env and lineage metadata."""

    entrypoint: str
    runtime_env: dict
    metadata: dict[str, str] = field(default_factory=dict)


def attempts(client, address: str, job: Job, base: str, retries: int, follow: bool) -> int:
    """Submit, and while the job fails for a retriable reason, resubmit it as <base>-retryN."""
    for attempt in range(retries + 1):
        job_id = retry_id(base, attempt)
        lineage = {"raylm_lineage": base, "raylm_attempt": str(attempt)}
        if attempt:
            lineage["raylm_retry_of"] = retry_id(base, attempt - 1)
        try:
            client.submit_job(
                entrypoint=job.entrypoint,
                submission_id=job_id,
                runtime_env=job.runtime_env,
                metadata={**job.metadata, **lineage},
            )
        except Exception as exc:
            raise explain(exc, address) from None
        announce(job_id, address, job.entrypoint)
        if not (follow or retries):
            return 0
        try:
            result = wait(client, job_id, follow)
        except KeyboardInterrupt:
            print(
                f"raylm: stopped following; job {job_id} keeps running (ray job stop {job_id})",
                file=sys.stderr,
            )
            raise
        print(f"raylm: job {job_id} {result.status}", file=sys.stderr)
        reason = retry_reason(result)
        if reason is None or attempt == retries:
            if reason is not None:
                print(f"raylm: {reason}; no retries left (--retries {retries})", file=sys.stderr)
            elif result.status == "FAILED" and result.message:
                print(f"raylm: {result.message.splitlines()[0][:300]}", file=sys.stderr)
            return exit_code(result)
        print(f"raylm: {reason}; resubmitting as {retry_id(base, attempt + 1)}", file=sys.stderr)
    raise AssertionError("unreachable")


def announce(job_id: str, address: str, entrypoint: str) -> None:
    print(f"raylm: submitted job {job_id} to {address}: {entrypoint}")
    print(f"raylm: dashboard {address} (Jobs); logs: ray job logs -f {job_id} --address {address}")
