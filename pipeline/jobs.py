"""Ray job submission: run any subjectforge command on a cluster and follow it.

The entrypoint is the same command line a user types locally, prefixed with `python -m
pipeline` (code uploaded as the job's working directory) or `subjectforge` (the cluster's image
has the package installed). The upload is staged from an allow-list (UPLOAD_PATHS), so nothing
else in the checkout can leave the machine, and secrets are never sent as job env values: the
cluster provides them (`--env NAME`). Token authentication (Ray's default for new clusters): the token comes from
`--auth-token-file`, else RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.config import ConfigError
from pipeline.errors import UserError

log = logging.getLogger(__name__)

# What a job's upload holds, relative to the checkout: the packages (with pipeline/configs/ and
# the tiny models in pipeline/assets/), the bundled data and the project file. An allow-list,
# so secrets (.env, keys), outputs (runs, checkpoints, mlartifacts) and environments (venv/)
# never leave the machine because nobody thought to exclude them. .dockerignore allows the same.
UPLOAD_PATHS = ("pipeline", "stages", "datasets", "pyproject.toml")
# Never uploaded from inside those folders, nor named by --include: hidden files (.env, .git)
# and Python's caches.
UPLOAD_SKIPPED = (".*", "__pycache__", "*.pyc")
# Files that hold keys or credentials: one inside an uploaded folder stops the upload.
SECRET_FILES = ("id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.pem", "*.key", "*.p12", "credentials*.json")
# Variables a job inherits from the submitter's environment when set there.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE", "HF_HOME")
# Where `ray start --head` and `ray get-auth-token --generate` keep the cluster token.
DEFAULT_TOKEN_FILE = "~/.ray/auth_token"
# Names whose values are secrets: a job's runtime env is shown by the dashboard and stored with
# the job, so these come from the cluster (`--env NAME`), never from the command line.
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|PRIVATE|(^|_)KEY$", re.IGNORECASE)
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_SECONDS = 60.0
# Ray's job client sets no timeout of its own: against a head that froze or dropped off the
# network, each request (and so `submit --wait` and `job ...`) waited forever. Seconds to
# connect, and to wait for each answer; a head that died refuses at once.
REQUEST_TIMEOUT_S = (10.0, 30.0)
# A followed job's log may be quiet for minutes. After this many seconds without a line, the
# job's status is asked for (one request, bounded as above), so that a log stream nobody serves
# any more ends the wait; a quiet job on a cluster that answers is followed on.
LOG_QUIET_PROBE_S = 30.0


class JobError(UserError, RuntimeError):
    """The cluster could not be reached or refused the request."""


@dataclass(frozen=True)
class Upload:
    """A staged upload: `root` holds exactly the files that are sent."""

    root: Path
    files: int
    size_bytes: int

    def describe(self) -> str:
        return f"{self.files} files, {self.size_bytes / 1e6:.1f} MB"


@dataclass(frozen=True)
class JobEnv:
    """`--env` split in two: values sent with the job, and names the cluster must provide."""

    values: dict[str, str] = field(default_factory=dict)
    from_cluster: tuple[str, ...] = ()


def looks_secret(name: str) -> bool:
    """Whether an environment variable's name says its value is a secret (e.g. *_TOKEN)."""
    return bool(SECRET_NAME.search(name))


def parse_env(items: Sequence[str]) -> JobEnv:
    """`--env KEY=VALUE` sends a value; `--env KEY` says the cluster's nodes provide KEY (from a
    Kubernetes secret, say), and the job checks that it is set before the command starts.

    Raises ConfigError for a bad name, and for a value under a secret-looking name.
    """
    values: dict[str, str] = {}
    from_cluster: list[str] = []
    for item in items:
        name, sep, value = item.partition("=")
        if not ENV_NAME.fullmatch(name):
            raise ConfigError(f"--env {item!r}: {name!r} is not a variable name (KEY=VALUE, or KEY alone)")
        if not sep:
            from_cluster.append(name)
        elif looks_secret(name):
            raise ConfigError(
                f"--env {name}=...: refusing to put a secret in the job's runtime env, which the Ray "
                f"dashboard shows to anyone who can reach it. Give it to the cluster's pods (a Kubernetes "
                f"secret, as infra/raycluster.yaml does for MLflow) and pass --env {name} to require it"
            )
        else:
            values[name] = value
    return JobEnv(values, tuple(dict.fromkeys(from_cluster)))


def _skipped(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in UPLOAD_SKIPPED)


def _checked_include(project: Path, item: str) -> Path:
    """`--include` as a path relative to the project; ConfigError if it leaves the project,
    is missing, or names a hidden or cached file."""
    rel = Path(item)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ConfigError(f"--include {item}: give a path inside the project, relative to {project}, without '..'")
    if not (project / rel).resolve().is_relative_to(project.resolve()):
        raise ConfigError(f"--include {item}: it leads outside the project {project}")
    if any(_skipped(part) for part in rel.parts):
        raise ConfigError(f"--include {item}: hidden files and caches are never uploaded")
    if not (project / rel).exists():
        raise ConfigError(f"--include {item}: not found in {project}")
    return rel


def _upload_files(project: Path, rel: Path) -> Iterator[Path]:
    """The files under project/rel (relative paths), skipping hidden files and caches. A link
    is uploaded as the file it points to, and only when that file is inside the project."""
    path = project / rel
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(project.resolve()) or not target.is_file():
            raise ConfigError(f"{path} is a link to {target}; only links to files inside the project are uploaded")
    if path.is_file():
        if any(fnmatch.fnmatchcase(path.name, pattern) for pattern in SECRET_FILES):
            raise ConfigError(f"{path} looks like a key or credentials file; refusing to upload it (move it out)")
        yield rel
    elif path.is_dir():
        for child in sorted(path.iterdir()):
            if not _skipped(child.name):
                yield from _upload_files(project, rel / child.name)
    else:
        raise ConfigError(f"{path} is not a file or folder; it cannot be uploaded")


def stage_upload(project: Path, includes: Sequence[str], dest: Path, max_mb: float) -> Upload:
    """Copy the allowed files of `project` (UPLOAD_PATHS, then `includes`) into the empty folder
    `dest`, which then becomes the job's working directory.

    Raises ConfigError when `project` is not a checkout, an include is not allowed, or the files
    add up to more than `max_mb` (checked before anything is copied).
    """
    missing = [p for p in UPLOAD_PATHS if not (project / p).exists()]
    if missing:
        raise ConfigError(
            f"{project} is not a subjectforge checkout (no {', '.join(missing)}); "
            "use --no-upload where the cluster has it installed"
        )
    roots = [Path(p) for p in UPLOAD_PATHS] + [_checked_include(project, item) for item in includes]
    files = sorted({f for root in roots for f in _upload_files(project, root)})
    size = sum((project / f).stat().st_size for f in files)
    if size > max_mb * 1e6:
        raise ConfigError(
            f"the upload is {size / 1e6:.1f} MB in {len(files)} files, over submit.max_upload_mb={max_mb:g}; "
            "put data on storage the cluster sees, or raise the limit with --set submit.max_upload_mb=..."
        )
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(project / rel, dest / rel)
    return Upload(dest, len(files), size)


def read_auth_token(path: str | Path | None) -> str | None:
    """The cluster token from `path`, else RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH, else
    DEFAULT_TOKEN_FILE when it exists, else None (a cluster without token authentication).

    DEFAULT_TOKEN_FILE is read here because Ray's client reads it only when RAY_AUTH_MODE=token,
    which a user's shell does not set."""
    if path is None:
        if os.environ.get("RAY_AUTH_TOKEN"):
            return os.environ["RAY_AUTH_TOKEN"].strip()
        path = os.environ.get("RAY_AUTH_TOKEN_PATH")
        if not path:
            default = Path(DEFAULT_TOKEN_FILE).expanduser()
            return _token_in(default) if default.is_file() else None
    path = Path(path).expanduser()
    if not path.is_file():
        raise JobError(f"auth token file not found: {path}")
    return _token_in(path)


# Bytes read of a token file: Ray's tokens are 64 hex digits; a file far longer is not one.
MAX_TOKEN_BYTES = 65_536


def _token_in(path: Path) -> str:
    """The token `path` holds, stripped: one printable word, or a JobError naming the file. It
    goes in an HTTP header, where a byte that is not text or a line break inside would be a
    traceback here or a header the client refuses, which reads as an unreachable cluster."""
    with path.open("rb") as f:
        data = f.read(MAX_TOKEN_BYTES + 1)
    if len(data) > MAX_TOKEN_BYTES:
        raise JobError(f"auth token file {path} is longer than {MAX_TOKEN_BYTES} bytes: not a token")
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise JobError(f"auth token file {path} is not UTF-8 text: not a token") from None
    if not token:
        raise JobError(f"auth token file {path} is empty")
    if not token.isprintable() or any(c.isspace() for c in token):
        raise JobError(f"auth token file {path} holds white space or control characters inside its token")
    return token


def connect(address: str, token: str | None = None):
    """A JobSubmissionClient for the dashboard at `address`, sending `token` if given, whose
    every request gives up after REQUEST_TIMEOUT_S.

    The token goes in our own Authorization header: Ray's automatic one depends on
    RAY_AUTH_MODE as it was when Ray was first imported in this process.
    """
    from ray.job_submission import JobSubmissionClient

    class BoundedClient(JobSubmissionClient):
        # Every request of the client (the version check, submit, status, logs, stop) goes
        # through _do_request, which hands its keyword arguments on to requests.
        def _do_request(self, method, endpoint, **kwargs):
            kwargs.setdefault("timeout", REQUEST_TIMEOUT_S)
            return super()._do_request(method, endpoint, **kwargs)

    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return BoundedClient(address, headers=headers)
    except Exception as exc:  # connection and authentication errors surface as several types
        reason = _no_answer(exc) or str(exc)
        raise JobError(
            f"cannot reach the Ray dashboard at {address}: {reason}. Check the address (the head's "
            "dashboard, port 8265 unless set otherwise) and that the cluster is up"
        ) from None


def _no_answer(exc: BaseException) -> str | None:
    """What to say of `exc` when it means the dashboard did not answer (refused, cut off, timed
    out), else None. requests' connection errors are OSErrors, and so are most of aiohttp's
    (the log stream); its ClientError covers the rest."""
    import aiohttp
    import requests

    if isinstance(exc, (requests.Timeout, TimeoutError)):
        return f"no answer within {REQUEST_TIMEOUT_S[1]:g} s"
    if isinstance(exc, (OSError, aiohttp.ClientError)):
        return "the connection was refused or cut off"
    return None


@contextlib.contextmanager
def cluster_errors(address: str, job_id: str | None) -> Iterator[None]:
    """JobErrors for what Ray's job client raises about `job_id` (None: a job being submitted,
    whose id is not known yet) at `address`: the dashboard not answering (refused, cut off,
    timed out), named with the address and how to learn what became of the job; and the
    RuntimeError of a request it refused (an unknown job id: a head that restarted has none of
    the jobs before). Other errors pass unchanged."""
    try:
        yield
    except JobError:
        raise
    except Exception as exc:
        reason = _no_answer(exc)
        if reason is None and isinstance(exc, RuntimeError) and job_id is not None:
            raise JobError(f"job {job_id}: {exc}") from None
        if reason is None:
            raise
        log.debug("the dashboard at %s did not answer", address, exc_info=True)
        lost = f"lost the Ray cluster at {address} ({reason}): it is down, frozen or out of reach"
        if job_id is None:
            raise JobError(f"{lost}, and whether the job was submitted is unknown") from None
        raise JobError(
            f"{lost}, and what became of job {job_id} is unknown. Once the cluster answers, "
            f"`subjectforge job status {job_id} --address {address}` tells"
        ) from None


def build_entrypoint(command: Sequence[str], uploaded: bool, from_cluster: Sequence[str] = ()) -> str:
    """The job's shell command: a check for each variable the cluster must provide (exit 2 with
    its name when unset), then the command, run from the upload or the installed package in the
    shell's own process."""
    checks = [
        f'[ -n "${{{name}:-}}" ] || {{ echo "subjectforge: {name} is not set on the cluster (submit --env {name})" >&2; exit 2; }}; '
        for name in from_cluster
    ]
    program = "python -m pipeline" if uploaded else "subjectforge"
    # `exec`: the shell becomes the command. Ray's stop signals the entrypoint's process and the
    # children it sees at that moment; a shell that forks the command may fork it just after.
    return "".join(checks) + f"exec {program} {shlex.join(command)}"


def forwarded_env() -> dict[str, str]:
    """FORWARDED_ENV as set here. Raises ConfigError for a tracking URI with a password in it."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    if urlsplit(env.get("MLFLOW_TRACKING_URI", "")).password:
        raise ConfigError(
            "MLFLOW_TRACKING_URI holds a password, which submit will not send with the job: give the "
            "cluster MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD from a secret, and the URI without them"
        )
    return env


def build_runtime_env(env: JobEnv, working_dir: Path | None = None) -> dict[str, Any]:
    """Ray's runtime env: the forwarded and --env values, and the staged upload if any."""
    runtime_env: dict[str, Any] = {"env_vars": {**forwarded_env(), **env.values}}
    if working_dir is not None:
        runtime_env["working_dir"] = str(working_dir)
    return runtime_env


def submit(client, command: Sequence[str], *, upload: Upload | None, env: JobEnv, submission_id: str | None = None) -> str:
    """Send the job; `upload` is the staged working directory, None to run the installed package."""
    entrypoint = build_entrypoint(command, upload is not None, env.from_cluster)
    runtime_env = build_runtime_env(env, upload.root if upload else None)
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
    """Stream the job's log to `out` (default: this process's stdout) until the job ends.

    The job's status is asked for first (an unknown id is Ray's RuntimeError naming it), and
    again after each LOG_QUIET_PROBE_S without a line: a cluster that stopped answering raises
    from that bounded request, where the stream alone would wait forever. A stream the cluster
    cut off raises ConnectionResetError.
    """
    out = out or sys.stdout
    client.get_job_status(job_id)

    async def pump() -> None:
        chunks = client.tail_job_logs(job_id)
        pending = asyncio.ensure_future(anext(chunks))
        try:
            while True:
                done, _ = await asyncio.wait({pending}, timeout=LOG_QUIET_PROBE_S)
                if not done:
                    await asyncio.to_thread(client.get_job_status, job_id)
                    continue
                try:
                    chunk = pending.result()
                except StopAsyncIteration:
                    return
                except RuntimeError as exc:  # Ray's word for a stream closed abnormally (code 1006) or broken
                    raise ConnectionResetError(f"the job's log stream broke off: {exc}") from None
                out.write(chunk)
                out.flush()
                pending = asyncio.ensure_future(anext(chunks))
        finally:
            pending.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):  # the outcome is raised already, or none
                await pending
            await chunks.aclose()

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
