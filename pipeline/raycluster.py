"""The one way every job joins Ray: the data build, training, fine-tuning, evaluation and serving."""

from __future__ import annotations

import os
from pathlib import Path

import ray

from pipeline.config import RayConfig

# What every worker of a Ray that ensure_ray starts runs first (pipeline/ray_worker_setup.py).
LOCAL_RUNTIME_ENV = {"worker_process_setup_hook": "pipeline.ray_worker_setup.quiet_worker_logs"}


def ensure_ray(cfg: RayConfig, *, logs: Path | None = None) -> bool:
    """Join the configured cluster (or RAY_ADDRESS), else start a local Ray; reuse if running.
    True when this call connected, so that the caller may `ray.shutdown()` what it started.

    Without `logs`, every worker's output is printed here too, prefixed with its actor and pid.
    With `logs`, a Ray connected here keeps that output in its own log files only, and `logs`
    becomes a link to them (link_ray_logs)."""
    connected = not ray.is_initialized()
    if connected:
        # A Ray this may start has no dashboard; a cluster named by address or RAY_ADDRESS keeps
        # its own settings.
        local = cfg.address in (None, "local") and not os.environ.get("RAY_ADDRESS")
        ray.init(
            address=cfg.address,
            num_cpus=cfg.num_cpus if cfg.address is None else None,
            include_dashboard=False,
            log_to_driver=logs is None,
            runtime_env=LOCAL_RUNTIME_ENV if local else None,
        )
    if logs is not None:
        link_ray_logs(logs)
    return connected


def link_ray_logs(link: Path) -> Path | None:
    """Make `link` a symbolic link to this machine's Ray log folder (every worker's stdout and
    stderr, Ray Data's and Ray Train's logs), replacing an older link there, and return it.

    A link, not Ray's temp dir under the run folder: Ray's sockets live in that dir, and a
    socket's path may hold at most 107 bytes. None when this process has no local Ray node
    (a Ray client) or `link` is a file or folder of its own, which is left as it is."""
    node = ray._private.worker._global_node  # the public API does not name the session folder
    if node is None or (link.exists() and not link.is_symlink()):
        return None
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    link.symlink_to(node.get_logs_dir_path(), target_is_directory=True)
    return link
