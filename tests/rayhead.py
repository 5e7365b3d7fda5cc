"""A `ray start --head --block` of a test's own: token authentication, the dashboard on
127.0.0.1, every port picked free (fixed defaults, 10001 for the client server and 52365 for
the agent, collide with any other Ray on the machine)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.processes import stop_process_group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(folder: Path, token: Path, *extra: str, num_cpus: int = 2) -> tuple[subprocess.Popen, str]:
    """Start a head in its own process group, with its temp dir in `folder` / "ray" and its log
    in `folder` / "head.log"; returns (the process, the dashboard's address) once the dashboard
    answers. A head that exits or is not up in 90 s is stopped (stop_head) and raises, with the
    end of its log."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    dash = free_port()
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={free_port()}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}", "--include-dashboard=true", f"--num-cpus={num_cpus}",
        f"--temp-dir={folder / 'ray'}", *extra,
    ]  # fmt: skip
    head_log = folder / "head.log"
    with open(head_log, "wb") as log_file:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log_file, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(address + "/api/version", timeout=2)
            return proc, address
        except urllib.error.HTTPError:
            return proc, address  # it answers (401 without the token): the dashboard is up
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_head(proc, folder)
                raise RuntimeError(f"the Ray head did not come up:\n{head_log.read_text(errors='replace')[-3000:]}") from None
            time.sleep(0.5)


def stop_head(proc: subprocess.Popen, folder: Path, grace_s: float = 5) -> None:
    """SIGTERM to `ray start --block`'s process group, then make sure nothing of the head of
    `folder` survives (`ray stop` would also stop the tests' own local Ray). A short grace: the
    blocked `ray start` outlived 30 s of SIGTERM in CI (a 30 s teardown), and nothing of a test
    head needs a clean exit."""
    stop_process_group(proc, grace_s=grace_s)
    subprocess.run(["pkill", "-9", "-f", f"temp-dir={folder / 'ray'}"], check=False)
