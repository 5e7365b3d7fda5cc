"""Ray Train's edges (pipeline/train/dist.py) that run without a cluster."""

from __future__ import annotations

import json
import logging
from functools import partial

import ray.train
import torch

from pipeline.train import dist
from pipeline.train.loop import PROGRESS, TRAIN_STATE, _save_checkpoint
from pipeline.train.losses import warmup_factor


class _Method:
    """Saves one weights file, as a method's save() does."""

    def save(self, folder):
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"w": torch.ones(64)}, folder / "weights.pt")


def _checkpoint(run, step):
    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_factor, warmup_steps=4))
    folder = run / f"step-{step:07d}"
    _save_checkpoint(folder, _Method(), optimizer, schedule, step)
    return folder


def test_a_restart_ray_hands_no_checkpoint_resumes_from_the_run_folder(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "pretrain-v0001"
    for step in (3, 6):
        _checkpoint(run, step)
    (run / ".partial-step-0000009").mkdir()
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    with dist.resume_folder(str(run)) as folder:
        assert folder == run / "step-0000006"  # the newest complete one, never a partial
    with dist.resume_folder(f"s3://bucket/{run.name}") as folder:
        assert folder is None  # remote storage: Ray's answer stands
    with dist.resume_folder(str(tmp_path / "fresh")) as folder:
        assert folder is None


def test_a_checkpoint_whose_upload_was_killed_is_skipped_for_the_one_before(tmp_path, caplog):
    # Ray Train copies a reported checkpoint straight into <run>/step-N (no partial name), so a
    # kill mid-copy leaves files missing or short there; resuming must take step-6 and say why.
    run = tmp_path / "run"
    _checkpoint(run, 3)
    good = _checkpoint(run, 6)
    for damage in ("truncated", "missing", "no progress"):
        newest = _checkpoint(run, 9)
        if damage == "truncated":
            data = (newest / TRAIN_STATE).read_bytes()
            (newest / TRAIN_STATE).write_bytes(data[: len(data) // 2])
        elif damage == "missing":
            (newest / "weights.pt").unlink()
        else:
            (newest / PROGRESS).unlink()
        with caplog.at_level(logging.WARNING, logger="pipeline.train.dist"):
            assert dist.newest_checkpoint(run) == good, damage
        assert "step-0000009" in caplog.text and "incomplete" in caplog.text, damage
        caplog.clear()


def test_a_checkpoint_from_an_older_release_without_a_file_list_still_counts(tmp_path):
    run = tmp_path / "run"
    (run / "step-0000004").mkdir(parents=True)
    (run / "step-0000004" / PROGRESS).write_text(json.dumps({"step": 4}))
    assert dist.newest_checkpoint(run) == run / "step-0000004"


def test_pruning_never_counts_an_incomplete_checkpoint_among_the_ones_kept(tmp_path):
    # A Ray Train run killed while copying step-10, then the same run folder trained one worker
    # without Ray Train (finetune-many's actors): keeping the newest one must keep step-8, the
    # newest that can be resumed from, not the half-copied step-10.
    run = tmp_path / "run"
    _checkpoint(run, 5)
    broken = _checkpoint(run, 10)
    (broken / TRAIN_STATE).unlink()
    saved = _checkpoint(tmp_path / "tmp", 8)
    dist._store_checkpoint(saved, run, "step-0000008", keep=1)
    assert dist.newest_checkpoint(run) == run / "step-0000008"


def test_a_progress_record_of_the_wrong_shape_is_an_incomplete_checkpoint(tmp_path, caplog):
    # A stray or hand-edited progress record: a files list, a step that is text or missing. They
    # were an AttributeError in checkpoint_problem, or a TypeError/KeyError in the driver's
    # trainer.checkpoint_step, stack traces before any training; now skipped for the one before.
    run = tmp_path / "run"
    good = _checkpoint(run, 6)
    newest = run / "step-0000009"
    newest.mkdir()
    for record in ({"step": 9, "files": ["model"]}, {"step": "9"}, {"files": {}}, [9], {"step": 9, "files": {"a": "1"}}):
        (newest / PROGRESS).write_text(json.dumps(record))
        with caplog.at_level(logging.WARNING, logger="pipeline.train.dist"):
            assert dist.newest_checkpoint(run) == good, record
        assert "step-0000009" in caplog.text, record
        caplog.clear()
