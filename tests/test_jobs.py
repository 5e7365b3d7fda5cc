"""Job submission against a real Ray head started here (with token authentication on)."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from pipeline.cli import main
from pipeline.commands.submit import validate_command
from pipeline.config import ConfigError
from pipeline.jobs import UPLOAD_EXCLUDES, build_entrypoint, build_runtime_env
from tests.imagefiles import make_source


def test_entrypoint_and_runtime_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert build_entrypoint(["data", "build", "--source", "a b"], upload=True) == "python -m pipeline data build --source 'a b'"
    assert build_entrypoint(["demo"], upload=False) == "subjectforge demo"
    env = build_runtime_env(upload=True, env={"X": "1"})
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "X": "1"}
    assert os.path.isfile(os.path.join(env["working_dir"], "pyproject.toml")) and ".git" in env["excludes"] == UPLOAD_EXCLUDES
    assert "working_dir" not in build_runtime_env(upload=False, env={})


def test_submitted_command_is_checked_locally():
    assert validate_command(["--", "demo", "--out", "x"]) == ["demo", "--out", "x"]
    for bad in ([], ["--"], ["--", "dat", "build"], ["--", "data", "build"], ["--", "submit", "--address", "x", "--", "demo"]):
        with pytest.raises(ConfigError):
            validate_command(bad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_head(proc: subprocess.Popen, temp_dir) -> None:
    """SIGTERM to `ray start --block`'s process group, then make sure nothing of it survives
    (`ray stop` would also stop the tests' own local Ray)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except ProcessLookupError:
        pass  # it already exited
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-9", "-f", f"temp-dir={temp_dir}"], check=False)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` with the dashboard on 127.0.0.1 and token authentication."""
    tmp = tmp_path_factory.mktemp("head")
    token = tmp / "auth_token"
    token.write_text("subjectforge-test-token-" + os.urandom(8).hex())
    # Every port the head listens on is picked free: fixed defaults (10001 for the client
    # server, 52365 for the agent) collide with any other Ray on the machine.
    port, dash, agent, client = _free_port(), _free_port(), _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    temp_dir = tmp / "ray"
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
        f"--ray-client-server-port={client}", "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp_dir}",
    ]
    head_log = tmp / "head.log"
    with open(head_log, "wb") as log_file:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log_file, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(address + "/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break  # it answers (401 without the token): the dashboard is up
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = head_log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"the Ray head did not come up:\n{tail}") from None
                time.sleep(0.5)
        yield address, token
    finally:
        _stop_head(proc, temp_dir)


@pytest.mark.slow
def test_submit_wait_streams_logs_and_returns_the_exit_code(ray_head, tmp_path, capsys, monkeypatch):
    address, token = ray_head
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    src = make_source(tmp_path / "src", {"dog": "dog"}, per_subject=2)
    out = tmp_path / "out"
    code = main([
        "submit", "--address", address, "--wait", "--auth-token-file", str(token), "--submission-id", "sf-test-ok",
        "--", "data", "build", "--source", str(src), "--out", str(out), "--profile", "tiny",
        "--set", "data.decode.size=64", "--no-progress",
    ])
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0, captured.err
    assert "v0001: 2 accepted" in printed and "SUCCEEDED" in printed
    assert os.readlink(out / "latest") == "v0001"

    # A job whose command fails reports that command's own exit code (2: bad source).
    code = main([
        "submit", "--address", address, "--wait", "--auth-token-file", str(token), "--",
        "data", "build", "--source", str(tmp_path / "missing"), "--out", str(out), "--profile", "tiny",
    ])
    printed = capsys.readouterr().out
    assert code == 2 and "source folder not found" in printed

    assert main(["job", "status", "sf-test-ok", "--address", address, "--auth-token-file", str(token)]) == 0
    assert "sf-test-ok: SUCCEEDED" in capsys.readouterr().out
    assert main(["job", "logs", "sf-test-ok", "--address", address, "--auth-token-file", str(token)]) == 0
    assert "v0001: 2 accepted" in capsys.readouterr().out


@pytest.mark.slow
def test_stop_a_running_job(ray_head, capsys, monkeypatch):
    address, token = ray_head
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    # `demo` on full-size photos runs long enough to be stopped mid-way.
    assert main(["submit", "--address", address, "--auth-token-file", str(token), "--submission-id", "sf-test-stop",
                 "--", "demo", "--out", "/tmp/sf-test-stop-demo"]) == 0
    assert main(["job", "stop", "sf-test-stop", "--address", address, "--auth-token-file", str(token)]) == 0
    from pipeline.jobs import connect, read_auth_token, wait

    assert wait(connect(address, read_auth_token(token)), "sf-test-stop", timeout=60) == "STOPPED"


def test_wrong_token_is_a_clear_error(ray_head, tmp_path, capsys, monkeypatch):
    address, _ = ray_head
    bad = tmp_path / "bad_token"
    bad.write_text("not-the-token")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    code = main(["job", "status", "anything", "--address", address, "--auth-token-file", str(bad)])
    assert code == 2
    assert "token" in capsys.readouterr().err.lower()
