"""Ray Train's edges (pipeline/train/dist.py) that run without a cluster."""

from __future__ import annotations

import ray.train

from pipeline.train import dist


def test_a_restart_ray_hands_no_checkpoint_resumes_from_the_run_folder(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "pretrain-v0001"
    for name in ("step-0000003", "step-0000006", ".partial-step-0000009"):
        (run / name).mkdir(parents=True)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    with dist.resume_folder(str(run)) as folder:
        assert folder == run / "step-0000006"  # the newest complete one, never a partial
    with dist.resume_folder(f"s3://bucket/{run.name}") as folder:
        assert folder is None  # remote storage: Ray's answer stands
    with dist.resume_folder(str(tmp_path / "fresh")) as folder:
        assert folder is None
