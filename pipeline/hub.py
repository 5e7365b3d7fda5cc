"""Checks that a model id or local path can be loaded, before any worker tries to.

A Ray actor that fails to load its model dies with a long remote traceback, long after the
job started; this preflight turns the same failure into one ConfigError naming the key.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import ConfigError


def require_model(key: str, path_or_id: str, marker: str = "config.json") -> None:
    """Raise ConfigError unless `path_or_id` is a local checkpoint folder holding `marker`, or a
    hub id whose `marker` file is cached or downloadable."""
    local = Path(path_or_id).expanduser()
    if local.exists() or path_or_id.startswith((".", "/", "~")):
        if not (local / marker).is_file():
            raise ConfigError(f"models.{key}: {local} is not a checkpoint folder (no {marker} in it)")
        return
    from huggingface_hub import hf_hub_download

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # one clear error below beats five retry warnings
    try:
        hf_hub_download(path_or_id, marker)
    except Exception as exc:  # the hub client raises many types for "not reachable / not found"
        first_line = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"models.{key}: cannot load {path_or_id!r} ({first_line}). On a machine without the hub, "
            f"download it elsewhere and pass --set models.{key}=/path/to/folder, "
            f"or use --profile tiny for the offline test models"
        ) from None
    finally:
        hub_log.setLevel(level)
