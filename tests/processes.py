"""Stopping what a test started in its own process group (`Popen(..., start_new_session=True)`)."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to `proc`'s process group, then SIGKILL if `proc` has not exited after `grace_s`
    seconds (uvicorn, under mlflow's servers, waits for idle keep-alive connections to close).
    Returns once `proc` has exited."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:  # the whole group has exited already
        proc.wait()
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
