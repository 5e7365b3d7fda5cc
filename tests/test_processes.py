"""tests/processes.py: the helper that stops the servers tests start."""

import signal
import subprocess
import sys

from tests.processes import stop_process_group


def _group(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE)


def test_a_group_that_ignores_sigterm_is_killed():
    proc = _group("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(600)")
    proc.stdout.readline()  # SIGTERM is ignored from here on
    stop_process_group(proc, grace_s=0.5)
    assert proc.returncode == -signal.SIGKILL


def test_a_group_that_exits_on_sigterm_or_is_gone_already():
    proc = _group("import time; print(flush=True); time.sleep(600)")
    proc.stdout.readline()
    stop_process_group(proc)
    assert proc.returncode == -signal.SIGTERM
    stop_process_group(proc)  # a second stop finds no group and returns
