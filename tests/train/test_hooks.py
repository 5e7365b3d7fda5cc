"""Hooks of the training loop that talk to MLflow, on a local SQLite store."""

import pytest

from pipeline import tracking
from pipeline.train.hooks import MetricsLog, RunInfo, TrainState


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    return RunInfo("r", str(tmp_path / "runs" / "r"), uri, tracking.start_run(uri, "exp", "r"), dataset={})


def _attempt(hook, start, stop, loss, every=2):
    """One attempt of the loop from checkpoint `start` to step `stop`, logging every `every` steps."""
    state = TrainState(method=None, batches=None, step=start, max_steps=10, start_step=start, samples_per_step=1)
    hook.on_start(state)
    for step in range(start + 1, stop + 1):
        state.step = step
        state.stats = {"loss": loss, "lr": 0.1} if step % every == 0 else None
        hook.after_step(state)


def test_steps_replayed_after_a_restart_are_logged_once(run):
    from mlflow import MlflowClient

    _attempt(MetricsLog(run), 0, 5, loss=1.0)  # checkpoint at 3, killed after 5
    _attempt(MetricsLog(run), 3, 8, loss=2.0)  # Ray Train restarts from step 3: 4 and 5 run again
    history = MlflowClient(run.tracking_uri).get_metric_history(run.mlflow_run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(2, 1.0), (4, 1.0), (6, 2.0), (8, 2.0)]
    assert len(MlflowClient(run.tracking_uri).get_metric_history(run.mlflow_run_id, "lr")) == 4
