"""The one way every job joins Ray: the data build, training, fine-tuning, evaluation and serving."""

from __future__ import annotations

import ray

from pipeline.config import RayConfig


def ensure_ray(cfg: RayConfig) -> None:
    """Join the configured cluster (or RAY_ADDRESS), else start a local Ray; reuse if running."""
    if ray.is_initialized():
        return
    ray.init(
        address=cfg.address,
        num_cpus=cfg.num_cpus if cfg.address is None else None,
        include_dashboard=False,
        log_to_driver=True,
    )
