"""The noise schedulers generation may use, chosen by name in one place."""

from __future__ import annotations

from pathlib import Path

from diffusers import DDIMScheduler, PNDMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from pipeline.model.checkpoint import CheckpointError, read_json

# Short name -> class. The released checkpoint ships PNDM (LAVIS samples with PNDM by default and
# DDIM for editing/inversion).
SCHEDULERS: dict[str, type[SchedulerMixin]] = {"pndm": PNDMScheduler, "ddim": DDIMScheduler}


def load_scheduler(folder: Path) -> SchedulerMixin:
    """The scheduler saved in `folder/scheduler_config.json` (its `_class_name` must be known)."""
    config = read_json(folder / "scheduler_config.json")
    name = config.get("_class_name")
    for cls in SCHEDULERS.values():
        if cls.__name__ == name:
            return cls.from_config(config)
    known = ", ".join(cls.__name__ for cls in SCHEDULERS.values())
    raise CheckpointError(f"{folder}: unsupported scheduler {name!r} (supported: {known})")


def fresh_scheduler(scheduler: SchedulerMixin, name: str | None = None) -> SchedulerMixin:
    """A new scheduler with `scheduler`'s config, as class `name` when given.

    Multistep schedulers (PNDM) keep per-run history, so every generation batch needs its own.
    """
    if name is None:
        return type(scheduler).from_config(scheduler.config)
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls = SCHEDULERS[name]
    if cls is DDIMScheduler and "clip_sample" not in scheduler.config:
        # DDIM's default clips each x0 estimate to [-1, 1], which suits pixels, not SD latents;
        # the released PNDM config does not say, and LAVIS samples DDIM with clip_sample=False.
        return cls.from_config(scheduler.config, clip_sample=False)
    return cls.from_config(scheduler.config)
