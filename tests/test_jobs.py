"""Job submission against a real Ray head started here (with token authentication on)."""

import os
import re
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.commands.submit import validate_command
from pipeline.config import ConfigError
from pipeline.errors import UserError
from pipeline.jobs import JobEnv, build_entrypoint, build_runtime_env, forwarded_env, parse_env, stage_upload
from tests.imagefiles import make_source
from tests.rayhead import start_head, stop_head

# What a checkout may hold beside the code: none of it may reach the cluster.
KEPT_HOME = [
    ".env", "id_rsa", "credentials.json", "subjectforge-runs/pretrain/checkpoint_000001/model.pt",
    "subjectforge-subjects/dog/model.safetensors", "mlartifacts/1/model.pkl", "venv/bin/python",
    ".git/config", ".venv/lib/site.py", "mlruns/0/meta.yaml", "notes.txt", "README.md",
    "pipeline/__pycache__/cli.cpython-311.pyc", "pipeline/.env", "datasets/.DS_Store",
]
ALLOWED = {"pyproject.toml", "pipeline/__init__.py", "pipeline/configs/cluster.yaml", "stages/decode.py", "datasets/dogs/1.jpg"}


def make_project(root: Path) -> Path:
    for rel in [*ALLOWED, *KEPT_HOME]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"contents of {rel}\n")
    return root


def packed_files(runtime_env: dict) -> set[str]:
    """The files Ray's own packager zips for the runtime env's working_dir (what is sent)."""
    from ray._private.runtime_env.packaging import _zip_files

    zip_path = Path(runtime_env["working_dir"]).parent / "package.zip"
    _zip_files(runtime_env["working_dir"], runtime_env.get("excludes", []), str(zip_path), include_gitignore=True)
    with zipfile.ZipFile(zip_path) as z:
        return {name for name in z.namelist() if not name.endswith("/")}


def test_upload_holds_exactly_the_allowed_files(tmp_path):
    project = make_project(tmp_path / "project")
    staging = tmp_path / "up" / "staging"
    staging.mkdir(parents=True)
    upload = stage_upload(project, [], staging, max_mb=1)
    assert packed_files(build_runtime_env(JobEnv(), upload.root)) == ALLOWED
    assert upload.files == len(ALLOWED)
    assert upload.size_bytes == sum((project / rel).stat().st_size for rel in ALLOWED)


def test_include_adds_paths_inside_the_project_only(tmp_path):
    project = make_project(tmp_path / "project")
    (tmp_path / "outside.yaml").write_text("secret: 1\n")
    (project / "link.yaml").symlink_to(tmp_path / "outside.yaml")
    (project / "extra").mkdir()
    (project / "extra" / "my.yaml").write_text("a: 1\n")
    staging = tmp_path / "ok"
    staging.mkdir()
    upload = stage_upload(project, ["notes.txt", "extra"], staging, max_mb=1)
    assert packed_files(build_runtime_env(JobEnv(), upload.root)) == ALLOWED | {"notes.txt", "extra/my.yaml"}
    for bad, reason in [
        ("../outside.yaml", "without '..'"), (str(tmp_path / "outside.yaml"), "without '..'"),
        ("pipeline/../../outside.yaml", "without '..'"), ("link.yaml", "outside the project"),
        (".env", "hidden"), (".git", "hidden"), ("missing.yaml", "not found"),
    ]:
        staging = tmp_path / f"bad{abs(hash(bad))}"
        staging.mkdir()
        with pytest.raises(ConfigError, match=re.escape(reason)):
            stage_upload(project, [bad], staging, max_mb=1)
        assert not any(staging.iterdir()), f"--include {bad} copied files before it was refused"


def test_upload_refuses_key_files_links_out_and_oversize(tmp_path):
    project = make_project(tmp_path / "project")
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(ConfigError, match=r"over submit.max_upload_mb=1e-05"):
        stage_upload(project, [], staging, max_mb=0.00001)
    (project / "datasets" / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="key or credentials"):
        stage_upload(project, [], staging, max_mb=1)
    (project / "datasets" / "id_ed25519").unlink()
    (project / "datasets" / "etc").symlink_to("/etc")
    with pytest.raises(ConfigError, match="link to /etc"):
        stage_upload(project, [], staging, max_mb=1)
    assert not any(staging.iterdir())
    with pytest.raises(ConfigError, match="not a subjectforge checkout"):
        stage_upload(tmp_path / "staging", [], staging, max_mb=1)


def test_submit_prints_the_upload_and_refuses_it_over_the_limit(tmp_path, capsys):
    # Port 9 answers nothing: the upload is staged (and printed) before the cluster is asked.
    assert main(["submit", "--address", "http://127.0.0.1:9", "--", "demo"]) == 2
    printed = capsys.readouterr()
    assert re.search(r"upload: \d+ files, [\d.]+ MB from ", printed.out) and "cannot reach" in printed.err
    assert main(["submit", "--address", "http://127.0.0.1:9", "--set", "submit.max_upload_mb=0.5", "--", "demo"]) == 2
    printed = capsys.readouterr()
    assert "over submit.max_upload_mb=0.5" in printed.err and "upload:" not in printed.out
    assert main(["submit", "--address", "http://127.0.0.1:9", "--include", "../x", "--", "demo"]) == 2
    assert "--include ../x" in capsys.readouterr().err


def test_secrets_stay_on_the_cluster(monkeypatch, capsys):
    env = parse_env(["X=1", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN", "X=2"])
    assert env.values == {"X": "2"} and env.from_cluster == ("MLFLOW_TRACKING_PASSWORD", "HF_TOKEN")
    for item in ["MLFLOW_TRACKING_PASSWORD=hunter2", "HF_TOKEN=hf_x", "AWS_SECRET_ACCESS_KEY=k", "OPENAI_API_KEY=k",
                 "db_password=p", "RAY_AUTH_TOKEN=t", "1X=1", "A B=1", "=1", "X;rm -rf /"]:
        with pytest.raises(ConfigError, match=re.escape(item.partition("=")[0] or "=")):
            parse_env([item])
    # Refused before anything is staged or sent, with the alternative named.
    assert main(["submit", "--address", "http://127.0.0.1:9", "--env", "MLFLOW_TRACKING_PASSWORD=hunter2", "--", "demo"]) == 2
    printed = capsys.readouterr()
    assert "refusing to put a secret" in printed.err and "--env MLFLOW_TRACKING_PASSWORD " in printed.err
    assert "hunter2" not in printed.err + printed.out and "upload:" not in printed.out

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://admin:hunter2@mlflow:5000")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI holds a password"):
        forwarded_env()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    runtime_env = build_runtime_env(parse_env(["X=1", "MLFLOW_TRACKING_PASSWORD"]))
    assert runtime_env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "X": "1"}


def test_the_token_defaults_to_the_file_ray_start_writes(tmp_path, monkeypatch):
    """Without --auth-token-file or RAY_AUTH_TOKEN(_PATH), ~/.ray/auth_token is read here: Ray's
    own client reads it only when RAY_AUTH_MODE=token, which a user's shell does not set."""
    from pipeline.jobs import read_auth_token

    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert read_auth_token(None) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("the-token\n")
    assert read_auth_token(None) == "the-token"


@pytest.mark.parametrize(
    "content, named",
    [(b"\xab\xcd\x00\xff", "not UTF-8 text"), (b"abc\ndef", "white space"), (b"", "empty"), (b"a" * 70_000, "longer than")],
    ids=["binary", "two-lines", "empty", "huge"],
)
def test_a_token_file_that_holds_no_token_is_an_error_naming_it(tmp_path, content, named):
    """A file that cannot be an HTTP header's token (binary, two lines, empty, huge) is a
    JobError naming the file, before any request: not a UnicodeDecodeError's traceback, nor a
    header the client refuses as 'cannot reach the Ray dashboard'."""
    from pipeline.jobs import JobError, read_auth_token

    token = tmp_path / "token"
    token.write_bytes(content)
    with pytest.raises(JobError, match=named) as refused:
        read_auth_token(token)
    assert str(token) in str(refused.value)


def test_the_job_stops_when_the_cluster_lacks_a_variable_it_must_provide():
    entrypoint = build_entrypoint(["demo"], uploaded=False, from_cluster=["SF_TEST_SECRET", "SF_TEST_OTHER"])
    assert entrypoint.endswith("; exec subjectforge demo")
    script = entrypoint.removesuffix("subjectforge demo") + "echo ran"
    env = {"PATH": os.environ["PATH"], "SF_TEST_OTHER": "x"}
    missing = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "SF_TEST_SECRET is not set on the cluster" in missing.stderr
    assert missing.stdout == ""
    ok = subprocess.run(["sh", "-c", script], env={**env, "SF_TEST_SECRET": "s"}, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout == "ran\n"


def test_the_entrypoints_shell_becomes_the_command_so_a_stop_signal_reaches_it(tmp_path):
    # Ray signals the entrypoint's process and the children it finds at that instant. A shell that
    # forked the command could fork it just after that look, and the command outlived the stop.
    out = str(tmp_path / "never-written")
    shell = subprocess.Popen(["sh", "-c", build_entrypoint(["demo", "--out", out], uploaded=True)],
                             cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not _processes_writing(out) and shell.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _processes_writing(out) == [shell.pid]
    finally:
        shell.kill()
        shell.wait()
    assert _processes_writing(out) == []


def test_entrypoint_and_runtime_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert build_entrypoint(["data", "build", "--source", "a b"], uploaded=True) == "exec python -m pipeline data build --source 'a b'"
    assert build_entrypoint(["demo"], uploaded=False) == "exec subjectforge demo"
    env = build_runtime_env(JobEnv({"X": "1"}), Path("/staged"))
    assert env == {"env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "X": "1"}, "working_dir": "/staged"}
    assert "working_dir" not in build_runtime_env(JobEnv())


def test_submitted_command_is_checked_locally():
    assert validate_command(["--", "demo", "--out", "x"]) == ["demo", "--out", "x"]
    for bad in ([], ["--"], ["--", "dat", "build"], ["--", "data", "build"], ["--", "submit", "--address", "x", "--", "demo"]):
        with pytest.raises(UserError):
            validate_command(bad)


def test_submitted_command_config_is_checked_locally(tmp_path):
    """A --set key or value the job would refuse on the cluster is refused here, before the
    upload, naming it; a --config file only the cluster has is left to the cluster."""
    for bad, named in ((["--set", "train.stepz=5"], "stepz"), (["--set", "train.steps=many"], "steps")):
        with pytest.raises(ConfigError, match=named):
            validate_command(["--", "pretrain", "--data", "/cluster/data", *bad])
    with pytest.raises(ConfigError, match="not valid YAML|invalid configuration"):
        (tmp_path / "bad.yaml").write_text("train: [unclosed")
        validate_command(["--", "pretrain", "--config", str(tmp_path / "bad.yaml")])
    cluster_only = ["pretrain", "--config", "/cluster/only/pretrain.yaml", "--set", "train.steps=5"]
    assert validate_command(["--", *cluster_only]) == cluster_only


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` with the dashboard on 127.0.0.1 and token authentication."""
    tmp = tmp_path_factory.mktemp("head")
    token = tmp / "auth_token"
    token.write_text("subjectforge-test-token-" + os.urandom(8).hex())
    proc, address = start_head(tmp, token)
    try:
        yield address, token
    finally:
        stop_head(proc, tmp)


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
    assert re.search(r"upload: \d+ files", printed)
    assert os.readlink(out / "latest") == "v0001"

    # A job whose command fails reports that command's own exit code (2: bad source).
    code = main([
        "submit", "--address", address, "--wait", "--auth-token-file", str(token), "--",
        "data", "build", "--source", str(tmp_path / "missing"), "--out", str(out), "--profile", "tiny",
    ])
    printed = capsys.readouterr().out
    assert code == 2 and "source folder not found" in printed

    # A variable the cluster must provide but lacks: the job stops before its command, exit 2.
    code = main(["submit", "--address", address, "--wait", "--auth-token-file", str(token),
                 "--env", "SF_TEST_UNSET_SECRET", "--", "demo"])
    assert code == 2 and "SF_TEST_UNSET_SECRET is not set on the cluster" in capsys.readouterr().out

    assert main(["job", "status", "sf-test-ok", "--address", address, "--auth-token-file", str(token)]) == 0
    assert "sf-test-ok: SUCCEEDED" in capsys.readouterr().out
    assert main(["job", "logs", "sf-test-ok", "--address", address, "--auth-token-file", str(token)]) == 0
    assert "v0001: 2 accepted" in capsys.readouterr().out


def test_stop_a_running_job(ray_head, capsys, monkeypatch):
    address, token = ray_head
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    # `demo` on full-size photos runs long enough to be stopped mid-way.
    assert main(["submit", "--address", address, "--auth-token-file", str(token), "--submission-id", "sf-test-stop",
                 "--", "demo", "--out", "/tmp/sf-test-stop-demo"]) == 0
    assert main(["job", "stop", "sf-test-stop", "--address", address, "--auth-token-file", str(token)]) == 0
    from pipeline.jobs import connect, read_auth_token, wait

    assert wait(connect(address, read_auth_token(token)), "sf-test-stop", timeout=60) == "STOPPED"
    # Stopped means its process is gone too, not a demo left running (and writing) on the node.
    deadline = time.monotonic() + 30
    while _processes_writing("/tmp/sf-test-stop-demo") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_writing("/tmp/sf-test-stop-demo") == []


def _processes_writing(out: str) -> list[int]:
    """Pids of processes whose command line names `out`."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if out in (proc.info["cmdline"] or []):
            found.append(proc.info["pid"])
    return found


def test_wrong_token_is_a_clear_error(ray_head, tmp_path, capsys, monkeypatch):
    address, _ = ray_head
    bad = tmp_path / "bad_token"
    bad.write_text("not-the-token")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    code = main(["job", "status", "anything", "--address", address, "--auth-token-file", str(bad)])
    assert code == 2
    assert "token" in capsys.readouterr().err.lower()
