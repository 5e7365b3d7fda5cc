"""MLflow helpers on a local SQLite store (the server-backed run is in test_trainer.py)."""

from pathlib import Path

import pytest

from pipeline import tracking


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
