"""The training loop's own file handling (the loop itself runs in test_trainer.py)."""

from functools import partial

import pytest
import torch

from pipeline.train.loop import TRAIN_STATE, _save_checkpoint, read_train_state
from pipeline.train.losses import warmup_factor


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
