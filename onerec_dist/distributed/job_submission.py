"""Ray Jobs: submit a job to a cluster's dashboard, stream its log, wait for the end, stop it.

Thin over ``ray.job_submission.JobSubmissionClient`` (needs ``ray[default]``: the client speaks HTTP via aiohttp).
It lives here because only onerec_dist/distributed imports ray; `onerec-launch` (launch/) calls these functions.
Ray is imported inside ``connect`` so that importing this module (and `onerec_launch`) stays cheap.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass
from typing import TextIO

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass(frozen=True)
class JobResult:
    submission_id: str
    status: str  # a ray JobStatus value: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED
    message: str | None = None


def connect(address: str, timeout_s: float = 0.0):
    """JobSubmissionClient for ``address`` (http://HOST:8265), retrying up to ``timeout_s`` while it comes up."""
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as err:  # aiohttp & co. come with ray[default]
        raise RuntimeError(f"Ray Jobs needs `ray[default]` ({err}); pip install 'ray[default]'") from None
    # Per-file "Ignoring upload ..." and "WebSocket closed" INFO lines drown the job's own log.
    for name in ("ray._private.runtime_env.packaging", "ray.dashboard.modules.dashboard_sdk",
                 "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return JobSubmissionClient(address)
        except (ConnectionError, RuntimeError) as err:
            if time.monotonic() >= deadline:
                raise ConnectionError(f"cannot reach the Ray dashboard at {address} (ray.address): {err}") from None
            time.sleep(0.5)


# A head that has just started (or is busy) answers 500 "No available agent to submit job" until its dashboard
# agent has registered; the submission is retried for this long.
AGENT_WAIT_S = 120.0


def submit(client, entrypoint: str, runtime_env: dict, submission_id: str, metadata: dict | None = None,
           agent_wait_s: float = AGENT_WAIT_S) -> str:
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                                     metadata={k: str(v) for k, v in (metadata or {}).items()})
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() >= deadline:
                raise
            time.sleep(1.0)


def status(client, submission_id: str) -> str:
    return str(client.get_job_status(submission_id).value)


def logs(client, submission_id: str) -> str:
    return client.get_job_logs(submission_id)


def wait(client, submission_id: str, timeout_s: float | None = None, poll_s: float = 0.5) -> str:
    """Poll until the job is terminal; returns its status. Raises TimeoutError after ``timeout_s``."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while (current := status(client, submission_id)) not in TERMINAL:
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"job {submission_id} still {current} after {timeout_s} s")
        time.sleep(poll_s)
    return current


def follow(client, submission_id: str, out: TextIO | None = None, timeout_s: float | None = None) -> None:
    """Stream the job's log to ``out`` (stdout) until the job ends (the dashboard closes the stream then)."""
    out = out or sys.stdout
    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    async def bounded() -> None:
        try:
            await asyncio.wait_for(tail(), timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"job {submission_id} still running after {timeout_s} s") from None

    asyncio.run(bounded())


def stop(client, submission_id: str, timeout_s: float = 30.0) -> str:
    """Ask Ray to stop the job (SIGTERM, then SIGKILL after Ray's grace period); returns the final status."""
    client.stop_job(submission_id)
    try:
        return wait(client, submission_id, timeout_s=timeout_s)
    except TimeoutError:
        return status(client, submission_id)


def run_job(address: str, entrypoint: str, runtime_env: dict, submission_id: str, *, metadata: dict | None = None,
            follow_logs: bool = True, wait_for_end: bool = True, timeout_s: float | None = None,
            stop_on_interrupt: bool = True, out: TextIO | None = None, connect_timeout_s: float = 0.0) -> JobResult:
    """Submit, then (optionally) follow and wait. A timeout or Ctrl-C stops the job (the latter if asked)."""
    out = out or sys.stdout
    client = connect(address, connect_timeout_s)
    submit(client, entrypoint, runtime_env, submission_id, metadata)
    print(f"onerec-launch: submitted {submission_id} to {address}", file=out, flush=True)
    if not wait_for_end:
        return JobResult(submission_id, status(client, submission_id))
    start = time.monotonic()
    try:
        if follow_logs:
            follow(client, submission_id, out, timeout_s)
        left = None if timeout_s is None else max(timeout_s - (time.monotonic() - start), 1.0)
        final = wait(client, submission_id, timeout_s=left)
    except TimeoutError as err:
        return JobResult(submission_id, stop(client, submission_id), f"{err}; stopped (ray.timeout_s)")
    except KeyboardInterrupt:
        if not stop_on_interrupt:
            return JobResult(submission_id, status(client, submission_id), "interrupted; job left running")
        return JobResult(submission_id, stop(client, submission_id), "interrupted; stopped")
    info = client.get_job_info(submission_id)
    return JobResult(submission_id, final, info.message)
