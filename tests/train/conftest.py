import pytest

from tests.mlflowserver import mlflow_server_at


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One `mlflow server` for the training tests (test_trainer.py, test_finetune.py): starting
    one costs seconds. Each module logs to its own experiment and registers its own model names
    (subjectforge-base, subjectforge-<subject>), so none reads another's runs."""
    with mlflow_server_at(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri
