"""Ray job submission: run any subjectforge command on a cluster and follow it.

The entrypoint is the same command line a user types locally, prefixed with `python -m
pipeline` (code uploaded as the job's working directory) or `subjectforge` (the cluster's image
has the package installed). Token authentication (Ray's default for new clusters): the token comes from
`--auth-token-file`, else RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.config import REPO_DIR

log = logging.getLogger(__name__)

# Never uploaded with the working directory: history, local outputs, wheels, caches.
UPLOAD_EXCLUDES = [
    ".git",
    ".whl",
    "**/__pycache__",
    "*.egg-info",
    "subjectforge-demo",
    "mlruns",
    "mlruns.db",
    ".venv*",
    ".pytest_cache",
    ".ruff_cache",
]
# Variables a job inherits from the submitter's environment when set there.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE", "HF_HOME")

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_SECONDS = 60.0


class JobError(RuntimeError):
    """The cluster could not be reached or refused the request."""


def read_auth_token(path: str | Path | None) -> str | None:
    """The cluster token from `path`, else RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH, else None
    (then Ray's client looks in ~/.ray/auth_token itself when RAY_AUTH_MODE=token)."""
    if path is None:
        if os.environ.get("RAY_AUTH_TOKEN"):
            return os.environ["RAY_AUTH_TOKEN"].strip()
        path = os.environ.get("RAY_AUTH_TOKEN_PATH")
        if not path:
            return None
    path = Path(path).expanduser()
    if not path.is_file():
        raise JobError(f"auth token file not found: {path}")
    return path.read_text().strip()


def connect(address: str, token: str | None = None):
    """A JobSubmissionClient for the dashboard at `address`, sending `token` if given.

    The token goes in our own Authorization header: Ray's automatic one depends on
    RAY_AUTH_MODE as it was when Ray was first imported in this process.
    """
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as exc:  # connection and authentication errors surface as several types
        raise JobError(f"cannot reach the Ray dashboard at {address}: {exc}") from None


def build_entrypoint(command: Sequence[str], upload: bool) -> str:
    program = "python -m pipeline" if upload else "subjectforge"
    return f"{program} {shlex.join(command)}"


def build_runtime_env(upload: bool, env: dict[str, str], working_dir: Path | None = None) -> dict[str, Any]:
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env_vars.update(env)
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    if upload:
        root = working_dir or REPO_DIR
        if not (root / "pyproject.toml").is_file():
            raise JobError(f"{root} is not a subjectforge checkout; use --no-upload where the cluster has it installed")
        runtime_env["working_dir"] = str(root)
        runtime_env["excludes"] = UPLOAD_EXCLUDES
    return runtime_env


def submit(client, command: Sequence[str], *, upload: bool, env: dict[str, str], submission_id: str | None = None) -> str:
    entrypoint = build_entrypoint(command, upload)
    runtime_env = build_runtime_env(upload, env)
    # A freshly started head answers HTTP before its job agent is up, and says "try again later".
    deadline = time.monotonic() + AGENT_WAIT_SECONDS
    while True:
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id)
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise JobError(f"the cluster refused the job: {exc}") from None
            log.info("the cluster's job agent is not up yet; retrying")
            time.sleep(2.0)
    log.info("submitted %s: %s", job_id, entrypoint)
    return job_id


def follow_logs(client, job_id: str, out=None) -> None:
    """Stream the job's log to `out` (default: this process's stdout) until the job ends."""
    out = out or sys.stdout

    async def pump() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(pump())


def wait(client, job_id: str, poll_seconds: float = 1.0, timeout: float | None = None) -> str:
    """Block until the job is in a terminal state; returns the status name."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise JobError(f"job {job_id} still {status} after {timeout} s")
        time.sleep(poll_seconds)


def exit_code(client, job_id: str) -> int:
    """The job's own exit code when Ray reports it, else 0 for SUCCEEDED and 1 otherwise."""
    info = client.get_job_info(job_id)
    if info.driver_exit_code is not None:
        return int(info.driver_exit_code)
    return 0 if str(info.status.value) == "SUCCEEDED" else 1
