"""The training loop's own file handling and start-up (the loop itself runs in test_trainer.py)."""

import logging
import threading
import time
from functools import partial

import pytest
import torch

from pipeline.train import dist, loop
from pipeline.train.loop import TRAIN_STATE, _save_checkpoint, read_train_state
from pipeline.train.losses import warmup_factor
from tests.train import test_speed
from tests.train.test_speed import _train


class _Method:
    def save(self, folder):
        pass


class Payload:
    """Unpickling this runs code: what a doctored checkpoint could carry."""

    ran = False

    def __reduce__(self):
        return (Payload._run, ())

    @staticmethod
    def _run():
        Payload.ran = True
        return "ran"


def test_train_state_loads_tensors_and_never_runs_pickled_code(tmp_path, monkeypatch):
    # Undo torch's weights_only default for calls that do not pass it: the loop must ask itself.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_factor, warmup_steps=4))
    params[0].sum().backward()
    optimizer.step()
    schedule.step()
    _save_checkpoint(tmp_path, _Method(), optimizer, schedule, step=1)
    state = read_train_state(tmp_path)
    assert state["step"] == 1
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])

    torch.save({"step": Payload(), "optimizer": {}, "schedule": {}}, tmp_path / TRAIN_STATE)
    with pytest.raises(Exception, match="Weights only load failed"):
        read_train_state(tmp_path)
    assert not Payload.ran


@pytest.fixture
def startup_log(caplog):
    """The first step's line: the loop's worker logging stops `pipeline` propagating to caplog."""
    logger = logging.getLogger("pipeline.train.hooks")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def _first_step_line(caplog) -> str:
    # A set: with `pipeline` propagating (test order decides), the root's handler catches it too.
    [line] = {r.getMessage() for r in caplog.records if r.getMessage().startswith("first step done")}
    return line


def test_the_first_step_line_and_metrics_tell_where_the_startup_went(tmp_path, monkeypatch, startup_log):
    reported = []
    report = dist.report
    monkeypatch.setattr(dist, "report", lambda metrics, *a, **k: (reported.append(metrics), report(metrics, *a, **k)))
    # A compile earlier in the process (another test's; a reused worker's) is not this job's.
    torch.compile(lambda x: x + 1, backend="eager")(torch.ones(2))
    job_start = time.time()
    driver = {"checked": job_start + 0.01, "ray": job_start + 0.02, "data": job_start + 0.03, "fit": job_start + 0.04}
    _train(tmp_path, "startup", [], monkeypatch, job_start=job_start, marks=driver)

    line = _first_step_line(startup_log)
    # This process (pytest's) started, and imported pipeline.train, long before the job: named
    # so, never a negative time (CI printed "worker process -902.4, imports -897.9").
    assert "imports before the job" in line and " -" not in line.split(";")[0]
    for phase in ("checks 0.0", "Ray up 0.0", "data 0.0", "fit 0.0", "imports", "loop", "feed open", "model ready", "hooks", "first batch", "first forward"):
        assert f"{phase}" in line
    assert "no compile; compile caches: unused" in line  # the CPU loop does not compile
    metrics = reported[-1]  # the last step's: every logging step carries them, as MLflow metrics
    phases = ("checked", "ray", "data", "fit", "worker", "feed", "model", "hooks", "batch", "forward")
    at = {phase: metrics[f"startup_{phase}_s"] for phase in phases}
    assert at["fit"] == pytest.approx(0.04)
    assert at["fit"] <= at["worker"] <= at["model"] <= at["hooks"] <= at["batch"] <= at["forward"] <= metrics["time_to_first_step_s"]
    assert "startup_imports_s" not in metrics and all(value >= 0 for key, value in metrics.items() if key.startswith("startup_"))


def test_the_feed_starts_before_the_model_loads(tmp_path, monkeypatch):
    """Ray Data executes a plan from the first request for a batch: the loop asks before it loads
    the model, so both go on at once (the model's load waits here for the feed's first request)."""
    asked = threading.Event()
    iterate = test_speed._Shard.iter_torch_batches

    def iter_torch_batches(self, **kwargs):
        asked.set()
        return iterate(self, **kwargs)

    monkeypatch.setattr(test_speed._Shard, "iter_torch_batches", iter_torch_batches)
    get_method, seen = loop.get_method, []

    class AfterTheFeed:
        def __init__(self, name):
            self.method = get_method(name)

        def load(self, *args, **kwargs):
            seen.append(asked.wait(timeout=20))
            return self.method.load(*args, **kwargs)

    monkeypatch.setattr(loop, "get_method", AfterTheFeed)
    losses, _ = _train(tmp_path, "early", [], monkeypatch)
    assert seen == [True] and len(losses) == 3
