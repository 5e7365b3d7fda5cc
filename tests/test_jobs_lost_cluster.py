"""`submit --wait` and `job status|logs|stop` when the Ray cluster froze, died or was never there:
exit 2 with a message naming the address and what to do, in bounded time, never a hang or a
traceback. One small head of its own (tests/test_jobs.py's is shared and must live on), frozen
and then killed under a job whose log is being followed."""

import contextlib
import os
import signal
import socket
import threading
import time

import pytest

import pipeline.jobs
from pipeline.cli import main
from tests.processes import stop_process_group
from tests.rayhead import start_head

# A job that runs until the head goes: what it runs does not matter, only that it does not end.
SLEEPER = "exec sleep 600"


@pytest.fixture
def short_timeouts(monkeypatch):
    """The client's limits cut to seconds, so a frozen head is given up on quickly here."""
    from ray.job_submission import JobSubmissionClient

    # pipeline.jobs.connect bounds requests through this method: without it these tests hang.
    assert callable(getattr(JobSubmissionClient, "_do_request", None)), "Ray's job client no longer has _do_request"
    monkeypatch.setattr(pipeline.jobs, "REQUEST_TIMEOUT_S", (2.0, 3.0))
    monkeypatch.setattr(pipeline.jobs, "LOG_QUIET_PROBE_S", 1.0)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)


@pytest.fixture
def doomed_head(tmp_path_factory):
    """`ray start --head --block` (token authentication, every port picked free), which the test
    freezes and kills; the yield gives (address, token file, process group id)."""
    tmp_path = tmp_path_factory.mktemp("lost")  # short: the head's socket paths must fit 107 bytes
    token = tmp_path / "auth_token"
    token.write_text("subjectforge-lost-" + os.urandom(8).hex())
    proc, address = start_head(tmp_path, token, "--include-log-monitor=false", num_cpus=1)
    try:
        yield address, token, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)  # a frozen head cannot act on SIGTERM
        stop_process_group(proc, grace_s=1)


def _signal_once_submitted(address: str, token, job_id: str, pgid: int, sig: signal.Signals) -> threading.Thread:
    """In the background: once `job_id` is known to the cluster and a second has passed (the
    command under test follows its log by then), send `sig` to the whole head. Waiting for the
    job to run as well would cost the seconds a fresh head takes to start its first job's
    process; the log stream is open either way."""
    from ray.job_submission import JobSubmissionClient

    def submitted() -> bool:
        try:
            client.get_job_status(job_id)
            return True
        except RuntimeError:  # not yet
            return False

    def act() -> None:
        deadline = time.monotonic() + 60
        try:
            while not submitted() and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1.0)
        finally:  # whatever happened here, the command under test must not wait forever
            os.killpg(pgid, sig)

    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token.read_text().strip()}"})
    thread = threading.Thread(target=act, daemon=True)
    thread.start()
    return thread


def _run(argv: list[str], capsys) -> tuple[int, str, float]:
    start = time.monotonic()
    code = main(argv)
    took = time.monotonic() - start
    printed = capsys.readouterr()
    assert "Traceback" not in printed.err
    return code, printed.out + printed.err, took


def test_a_frozen_then_dead_head_ends_the_wait_with_a_clear_error(doomed_head, short_timeouts, monkeypatch, capsys):
    address, token, pgid = doomed_head
    monkeypatch.setattr(pipeline.jobs, "build_entrypoint", lambda *args, **kwargs: SLEEPER)
    auth = ["--address", address, "--auth-token-file", str(token)]

    # Frozen (a hung head, or one cut off by the network): the log stream stays open and silent.
    froze = _signal_once_submitted(address, token, "sf-lost", pgid, signal.SIGSTOP)
    code, printed, took = _run(["submit", *auth, "--no-upload", "--wait", "--submission-id", "sf-lost", "--", "demo"], capsys)
    froze.join()
    assert code == 2, printed
    assert f"lost the Ray cluster at {address}" in printed and f"job status sf-lost --address {address}" in printed
    assert took < 30, f"submit --wait took {took:.0f} s to give up on a frozen head"

    # Thawed and then killed (`ray stop --force`, a lost node) while the log is followed.
    os.killpg(pgid, signal.SIGCONT)
    died = _signal_once_submitted(address, token, "sf-lost", pgid, signal.SIGKILL)
    code, printed, took = _run(["job", "logs", "sf-lost", "--follow", *auth], capsys)
    died.join()
    assert code == 2 and f"lost the Ray cluster at {address}" in printed, printed
    assert took < 30

    # Nothing listens there any more.
    for action in ("status", "logs", "stop"):
        code, printed, took = _run(["job", action, "sf-lost", *auth], capsys)
        assert code == 2 and f"cannot reach the Ray dashboard at {address}" in printed, printed


def test_an_address_that_never_answers_is_given_up_on(short_timeouts, monkeypatch, capsys):
    monkeypatch.setattr(pipeline.jobs, "REQUEST_TIMEOUT_S", (0.5, 0.5))
    # A listening socket nobody accepts from: connections open, requests are never answered.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"http://127.0.0.1:{silent.getsockname()[1]}"
        for argv in (["job", "status", "x", "--address", address], ["submit", "--address", address, "--no-upload", "--", "demo"]):
            code, printed, took = _run(argv, capsys)
            assert code == 2 and f"cannot reach the Ray dashboard at {address}" in printed and "answer" in printed, printed
            assert took < 10
