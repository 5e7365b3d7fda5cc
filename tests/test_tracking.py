"""MLflow helpers on a local SQLite store (the server-backed run is in test_trainer.py)."""

from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.config import TrackingConfig


def test_tracking_uri_from_setting_env_or_default(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'mlruns.db'}"  # absolute, for workers
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.resolve_tracking_uri(None) == "http://mlflow:5000"
    assert tracking.resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"


def test_flatten_nested_config():
    assert tracking.flatten({"train": {"lr": 1e-5, "trainable": {"unet": True}}, "profile": "tiny"}) == {
        "train.lr": "1e-05",
        "train.trainable.unet": "True",
        "profile": "tiny",
    }


def test_git_commit_of_this_checkout():
    commit = tracking.git_commit()
    assert commit == "unknown" or len(commit.split("-")[0]) == 40
    assert tracking.git_commit(Path("/")) == "unknown"


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts under ./mlruns
    return f"sqlite:///{tmp_path / 'mlruns.db'}"


def test_a_rerun_reopens_its_run_and_params_keep_first_values(store, tmp_path):
    from mlflow import MlflowClient

    run_id = tracking.start_run(store, "exp", "pretrain-v0001")
    tracking.log_params(store, run_id, {"train.steps": "10", "train.lr": "0.1"})
    tracking.finish_run(store, run_id)
    again = tracking.start_run(store, "exp", "pretrain-v0001")
    assert again == run_id and MlflowClient(store).get_run(run_id).info.status == "RUNNING"
    tracking.log_params(store, run_id, {"train.steps": "20", "train.lr": "0.1", "train.seed": "0"})  # no error
    assert MlflowClient(store).get_run(run_id).data.params == {"train.steps": "10", "train.lr": "0.1", "train.seed": "0"}
    assert tracking.start_run(store, "exp", "other") != run_id


def test_dataset_input_is_logged_once_and_model_registered_with_tags(store, tmp_path):
    from mlflow import MlflowClient

    run_id = tracking.start_run(store, "exp", "r")
    for _ in range(2):
        tracking.log_dataset(store, run_id, name="sf", path=str(tmp_path / "v0002"), digest="abc123", version="v0002", rows=7)
    [inp] = MlflowClient(store).get_run(run_id).inputs.dataset_inputs
    assert inp.dataset.name == "sf@v0002" and inp.dataset.digest == "abc123"

    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    tags = {"dataset_version": "v0002", "git_commit": "deadbeef", "run_name": "r", "step": "5"}
    version = tracking.register_model(store, run_id, model, "sf-base", tags)
    assert tracking.find_model_version(store, "sf-base", {"run_name": "r", "step": "5"}) == version
    assert tracking.find_model_version(store, "sf-base", {"run_name": "r", "step": "6"}) is None
    assert tracking.find_model_version(store, "missing", {}) is None
    assert MlflowClient(store).get_model_version("sf-base", version).tags["git_commit"] == "deadbeef"


def _model_folder(tmp_path):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "model_index.json").write_text("{}")
    return model


@pytest.mark.parametrize("name", ["o'neil", 'say "hi"', "it's \"both\" \\"])
def test_names_with_quotes_reopen_their_run_and_find_their_versions(store, tmp_path, name):
    similar = "".join("_" if c in "'\"\\" else c for c in name)  # what a LIKE search also matches
    run_id = tracking.start_run(store, "exp", name)
    other_run = tracking.start_run(store, "exp", similar)
    assert other_run != run_id and tracking.start_run(store, "exp", name) == run_id

    model = _model_folder(tmp_path)
    for _ in range(2):
        tracking.register_model(store, other_run, model, f"sf-{similar}", {"step": "1"})
    version = tracking.register_model(store, run_id, model, f"sf-{name}", {"step": "2"})
    assert tracking.find_model_version(store, f"sf-{name}", {"step": "2"}) == version == "1"
    assert tracking.find_model_version(store, f"sf-{name}", {"step": "1"}) is None  # the similar name's tags
    assert tracking.set_alias(store, f"sf-{name}", "champion") == "1"  # its own newest, not the similar one's 2


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_does_not_answer_is_an_error_not_an_unregistered_model(monkeypatch):
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries take minutes
    down = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(MlflowException, match="127.0.0.1"):
        tracking.find_model_version(down, "sf-dog", {"finetune_key": "abc"})
    for lookup in (lambda: tracking.registered_version(down, "sf-dog", alias="candidate"),
                   lambda: tracking.download_model(down, "models:/sf-dog@candidate")):
        with pytest.raises(tracking.RegistryError) as caught:
            lookup()
        assert "not found" not in str(caught.value) and "failed" in str(caught.value)


def test_a_missing_alias_or_version_is_not_found(store):
    run_id = tracking.start_run(store, "exp", "r")
    tracking.register_model(store, run_id, _model_folder(Path.cwd()), "sf-dog", {})
    for lookup in (lambda: tracking.registered_version(store, "sf-dog", alias="nope"),
                   lambda: tracking.registered_version(store, "sf-dog", version="7"),
                   lambda: tracking.download_model(store, "models:/sf-cat@candidate")):
        with pytest.raises(tracking.RegistryError, match="not found in the registry"):
            lookup()


@pytest.mark.parametrize(
    "argv",
    [
        ["pretrain", "--data", "nowhere"],
        ["finetune", "--subject", "nowhere", "--subject-id", "dog"],
        ["finetune-many", "--data", "nowhere"],
        ["evaluate", "--model", "models:/sf-dog@candidate"],
        ["generate", "--model", "models:/sf-dog@candidate", "--prompt", "on the beach", "--out", "images"],
        ["promote", "sf-dog", "--alias", "champion"],
    ],
)
def test_every_command_stops_before_any_work_when_the_server_does_not_answer(argv, monkeypatch, tmp_path, capsys):
    from pipeline.cli import main

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # without the check each command waited minutes
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{_closed_port()}"
    assert main([*argv, "--profile", "tiny", "--set", f"tracking.uri={uri}"]) == 2
    err = capsys.readouterr().err
    assert f"MLflow tracking server {uri} does not answer" in err and "not found" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--subject", "models:/sf-dog@champion", "--prompt", "on the beach", "--out", "images"],
        ["generate", "--model", "models:/sf-dog/3", "--prompt", "on the beach", "--out", "images"],
        ["promote", "sf-dog", "--alias", "champion"],
        ["evaluate", "--model", "models:/sf-dog@candidate"],
    ],
)
def test_a_lookup_in_a_local_store_that_does_not_exist_creates_none(argv, monkeypatch, tmp_path, capsys):
    """A mistyped or unconfigured registry left an mlruns.db in the current folder, tracking off or not."""
    from pipeline.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--profile", "tiny", "--set", "tracking.enabled=false"]) == 2
    assert "the file does not exist (set tracking.uri" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_open_run_is_a_no_op_with_tracking_off_and_marks_a_failed_block(tmp_path):
    off = TrackingConfig(enabled=False, uri=f"sqlite:///{tmp_path / 'off.db'}")
    with tracking.open_run(off, "r", {}) as run_id:
        assert run_id is None
    assert not (tmp_path / "off.db").exists()
    on = TrackingConfig(uri=f"sqlite:///{tmp_path / 'on.db'}")
    with pytest.raises(KeyError), tracking.open_run(on, "broken", {"k": "v"}) as run_id:
        raise KeyError("boom")
    client = MlflowClient(on.uri)
    assert client.get_run(run_id).info.status == "FAILED"
    with tracking.open_run(on, "fine", {}) as run_id:
        pass
    assert client.get_run(run_id).info.status == "FINISHED"


def test_one_uri_policy_with_and_without_the_local_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(None, local_store=False) is None
    assert tracking.resolve_tracking_uri("sqlite:///x.db", local_store=False) == f"sqlite:///{tmp_path / 'x.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.resolve_tracking_uri(None, local_store=False) == "http://mlflow:5000"
