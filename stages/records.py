"""Column names and the reject convention shared by every stage.

A photo travels through the plan as one row. A stage that meets a failure it expects (a corrupt
file, an empty CLIPSeg mask, an unusable matte) does not drop the row: it raises `Reject` in its
pure core, and its batch adapter records the stage and the reason in the row's reject columns.
Later stages pass rejected rows through untouched, and the writer splits them into
`rejects.parquet`, so every input is accounted for. Unexpected exceptions propagate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

# Identity of a photo (set by the source scan).
SUBJECT_ID = "subject_id"
CATEGORY = "category"
SOURCE_URI = "source_uri"  # path relative to the source root, POSIX separators
SOURCE_PATH = "source_path"  # absolute path read by the decode stage
SOURCE_SHA256 = "source_sha256"
# The photo's caption, the text of its training prompt (stages/caption.py), and where it came
# from: CAPTION_USER (the source's captions.csv), CAPTION_MODEL (the captioner), or "" (none).
CAPTION = "caption"
CAPTION_SOURCE = "caption_source"
CAPTION_USER = "user"
CAPTION_MODEL = "model"

# Reject bookkeeping: empty strings while the row is healthy.
REJECT_STAGE = "reject_stage"
REJECT_REASON = "reject_reason"

# Arrays carried between stages (dropped before writing).
IMAGE = "image"  # uint8 (H, W, 3)
CONFIDENCE = "confidence"  # float32 (H, W) in [0, 1]
# TRIMAP and ALPHA leave the matte actor that composites (stages.matte_composite) as
# uint8 0-255, the levels the writer stores.
TRIMAP = "trimap"  # float32 (H, W): 0 background, 0.5 unknown, 1 foreground
ALPHA = "alpha"  # float32 (H, W) in [0, 1]
FOREGROUND = "foreground"  # uint8 (H, W, 3)
COMPOSITE = "composite"  # uint8 (H, W, 3)
WIDTH = "width"
HEIGHT = "height"
ALPHA_AREA = "alpha_area"  # mean alpha, fraction of the photo covered by the subject
BACKGROUND_ID = "background_id"
SEED = "seed"
PLACEMENT = "placement"  # JSON: where and how large the subject was pasted

# Seconds spent per stage, summed per row so the writer can report time per stage.
TIMING_PREFIX = "t_"

STAGES = ("scan", "decode", "segment", "trimap", "caption", "matte", "filter", "composite", "write")

# Stand-in for an array column of a rejected row: Ray Data needs every row of a tensor column
# to have the same number of dimensions, and a 1x1 placeholder costs nothing.
PLACEHOLDER_RGB = np.zeros((1, 1, 3), np.uint8)
PLACEHOLDER_MAP = np.zeros((1, 1), np.float32)

log = logging.getLogger(__name__)


class Reject(Exception):
    """An expected, per-photo failure: the photo is recorded as rejected, the job goes on."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


class _SkipLog:
    """Logs the first reject and then every Nth at WARNING, all of them at DEBUG."""

    def __init__(self, every: int = 100):
        self.every = every
        self.count = 0

    def __call__(self, uri: str, reject: Reject) -> None:
        self.count += 1
        if self.count == 1 or self.count % self.every == 0:
            log.warning(
                "rejected %s at %s: %s (%d so far in this worker)", uri, reject.stage, reject.reason, self.count
            )
        else:
            log.debug("rejected %s at %s: %s", uri, reject.stage, reject.reason)


log_reject = _SkipLog()


def healthy_rows(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Indices of rows no stage has rejected yet."""
    return np.flatnonzero(np.asarray(batch[REJECT_STAGE]) == "")


def reject_row(batch: dict[str, np.ndarray], i: int, reject: Reject) -> None:
    batch[REJECT_STAGE][i] = reject.stage
    batch[REJECT_REASON][i] = reject.reason
    log_reject(str(batch[SOURCE_URI][i]), reject)


def writable(batch: dict[str, np.ndarray], *names: str) -> None:
    """Make columns mutable object/str arrays (Ray hands out read-only zero-copy views)."""
    for name in names:
        batch[name] = np.array(batch[name], dtype=object)


def apply_per_row(
    batch: dict[str, np.ndarray],
    fn: Callable[[int], dict[str, object]],
    outputs: dict[str, object],
) -> dict[str, np.ndarray]:
    """Run `fn(i)` for each healthy row, storing what it returns; rejected rows get placeholders.

    `outputs` maps each output column to the placeholder used for rejected rows. `fn` returns a
    dict with exactly those keys, or raises Reject.
    """
    n = len(batch[SOURCE_URI])
    writable(batch, REJECT_STAGE, REJECT_REASON)
    columns = {name: [placeholder] * n for name, placeholder in outputs.items()}
    for i in healthy_rows(batch):
        try:
            result = fn(int(i))
        except Reject as reject:
            reject_row(batch, int(i), reject)
            continue
        for name in outputs:
            columns[name][i] = result[name]
    for name, values in columns.items():
        batch[name] = _as_column(values)
    return batch


def _as_column(values: list[object]) -> np.ndarray:
    if values and isinstance(values[0], np.ndarray):
        # Ragged arrays (photos differ in size) must go in an object array, not be stacked.
        column = np.empty(len(values), dtype=object)
        column[:] = values
        return column
    return np.asarray(values)


@contextmanager
def timed(batch: dict[str, np.ndarray], stage: str) -> Iterator[None]:
    """Add this batch's wall time for `stage`, split evenly over its rows, to column t_<stage>."""
    start = time.perf_counter()
    yield
    n = len(batch[SOURCE_URI])
    if n:
        batch[TIMING_PREFIX + stage] = np.full(n, (time.perf_counter() - start) / n, np.float64)
