"""Composite stage: paste the matted subject onto random backgrounds.

Each accepted photo becomes `per_photo` rows. Every random choice (background, scale, position)
comes from a generator seeded by the run's seed, the photo's sha256 and the composite index, so
a photo gets the same composites whatever the order, batching or number of workers.
"""

from __future__ import annotations

import hashlib
import json
import time
from functools import lru_cache

import numpy as np
from PIL import Image

from stages.records import (
    ALPHA,
    BACKGROUND_ID,
    COMPOSITE,
    FOREGROUND,
    PLACEHOLDER_RGB,
    PLACEMENT,
    SEED,
    SOURCE_SHA256,
    SOURCE_URI,
    TIMING_PREFIX,
    healthy_rows,
)

STAGE = "composite"
COMPOSITE_INDEX = "composite_index"  # 0..per_photo-1; rejected rows keep 0

# Backgrounds larger than this (short side, px) are shrunk on load: a canvas is at most the
# decode size, so more pixels only cost memory in every worker's cache.
_BACKGROUND_MAX_SIDE = 1024


def photo_seed(seed: int, sha256_hex: str, index: int) -> int:
    """A 63-bit seed unique to (run seed, photo content, composite index)."""
    digest = hashlib.sha256(f"{seed}:{sha256_hex}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def subject_bbox(alpha: np.ndarray, threshold: float = 0.01) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), half-open, of the pixels with alpha above `threshold`."""
    mask = alpha > threshold
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("alpha has no subject pixels")
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def cover_background(background: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (h, w, 3) background -> the same scaled (bilinear) to cover (height, width), uncropped.

    A background that already covers the canvas with one side equal to it is returned as is, so
    covering twice gives the same array: a cached covered background crops like the original."""
    bh, bw = background.shape[:2]
    scale = max(height / bh, width / bw)
    nh, nw = max(height, round(bh * scale)), max(width, round(bw * scale))
    if (nh, nw) == (bh, bw):
        return background
    return np.asarray(Image.fromarray(background).resize((nw, nh), Image.Resampling.BILINEAR))


def fit_background(background: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (h, w, 3) background -> uint8 (height, width, 3): scaled to cover, randomly cropped.

    The crop is a view of the covered background; copy it before writing to it."""
    covered = cover_background(background, height, width)
    nh, nw = covered.shape[:2]
    top = int(rng.integers(0, nh - height + 1))
    left = int(rng.integers(0, nw - width + 1))
    return covered[top : top + height, left : left + width]


def composite_subject(
    foreground: np.ndarray,
    alpha: np.ndarray,
    background: np.ndarray,
    rng: np.random.Generator,
    *,
    scale_min: float = 0.4,
    scale_max: float = 0.9,
    bbox: tuple[int, int, int, int] | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """Alpha-blend the subject onto `background` at a random scale and position.

    foreground uint8 (H, W, 3), alpha float32 (H, W) in [0, 1], background uint8 (h, w, 3) of
    any size. Returns the composite uint8 (H, W, 3), on a canvas the size of the photo, and the
    placement: the subject box's top-left `x`, `y` and `width`, `height` in the composite (px),
    and `scale`, the resize factor applied to the subject. `bbox` is `subject_bbox(alpha)` when
    the caller already has it (a photo's K composites share it).
    """
    height, width = alpha.shape
    composite = np.array(fit_background(background, height, width, rng))
    top, bottom, left, right = subject_bbox(alpha) if bbox is None else bbox
    box_h, box_w = bottom - top, right - left
    # The subject's long side becomes a random fraction of the canvas' short side, but never
    # more than fits on the canvas.
    target = rng.uniform(scale_min, scale_max) * min(height, width)
    scale = min(target / max(box_h, box_w), height / box_h, width / box_w)
    new_h, new_w = max(1, round(box_h * scale)), max(1, round(box_w * scale))
    fg = Image.fromarray(foreground[top:bottom, left:right]).resize((new_w, new_h), Image.Resampling.LANCZOS)
    a = Image.fromarray(alpha[top:bottom, left:right].astype(np.float32), mode="F").resize(
        (new_w, new_h), Image.Resampling.BILINEAR
    )
    y = int(rng.integers(0, height - new_h + 1))
    x = int(rng.integers(0, width - new_w + 1))
    # Only the pasted box is blended, in float32; the rest of the canvas stays uint8. Per pixel
    # this is a * fg + (1 - a) * bg, rounded, as on a float canvas: the same bytes, less work.
    a_arr = np.array(a, np.float32)[..., None]
    np.clip(a_arr, 0.0, 1.0, out=a_arr)
    region = composite[y : y + new_h, x : x + new_w]
    blend = np.asarray(fg, np.float32)
    blend *= a_arr
    rest = region.astype(np.float32)
    rest *= 1.0 - a_arr
    blend += rest
    np.rint(blend, out=blend)
    np.clip(blend, 0, 255, out=blend)
    region[...] = blend
    return composite, {"x": x, "y": y, "width": new_w, "height": new_h, "scale": float(scale)}


@lru_cache(maxsize=64)
def load_background(path: str) -> np.ndarray:
    """A background file as uint8 (h, w, 3) RGB, short side at most 1024 px (cached per worker)."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        if min(img.size) > _BACKGROUND_MAX_SIDE:
            img.thumbnail((10**6, _BACKGROUND_MAX_SIDE) if img.width > img.height else (_BACKGROUND_MAX_SIDE, 10**6))
        return np.asarray(img, np.uint8)


@lru_cache(maxsize=64)
def covered_background(path: str, height: int, width: int) -> np.ndarray:
    """`load_background(path)` scaled to cover a (height, width) canvas, cached per worker: a
    photo size that recurs (decode makes most photos one size) resizes each background once,
    not once per composite. Cropping it gives what cropping the original does (cover_background)."""
    return cover_background(load_background(path), height, width)


def _take(column: np.ndarray, index: np.ndarray) -> np.ndarray:
    """column[index] without copying pixels: a stacked tensor column (Ray hands out an (N, H, W,
    ...) array when every row has one shape) becomes an object column of per-row views, since
    each photo's arrays are repeated on its K rows."""
    column = np.asarray(column)
    if column.ndim == 1:
        return column[index]
    taken = np.empty(len(index), dtype=object)
    for j, i in enumerate(index):
        taken[j] = column[i]
    return taken


def composite_batch(
    batch: dict[str, np.ndarray],
    *,
    backgrounds: list[tuple[str, str]],
    per_photo: int,
    seed: int,
    scale_min: float,
    scale_max: float,
) -> dict[str, np.ndarray]:
    """Ray Data adapter: each healthy row becomes `per_photo` rows with COMPOSITE, BACKGROUND_ID,
    SEED, PLACEMENT (JSON) and COMPOSITE_INDEX; rejected rows pass through once. FOREGROUND,
    used up here, is dropped.

    `backgrounds` is a list of (background_id, path), in a fixed order.
    """
    start = time.perf_counter()
    n = len(batch[SOURCE_URI])
    healthy = set(int(i) for i in healthy_rows(batch))
    take: list[int] = []
    new: dict[str, list] = {COMPOSITE: [], BACKGROUND_ID: [], SEED: [], PLACEMENT: [], COMPOSITE_INDEX: []}
    for i in range(n):
        if i not in healthy:
            take.append(i)
            for key, value in (
                (COMPOSITE, PLACEHOLDER_RGB),
                (BACKGROUND_ID, ""),
                (SEED, 0),
                (PLACEMENT, ""),
                (COMPOSITE_INDEX, 0),
            ):
                new[key].append(value)
            continue
        alpha = batch[ALPHA][i]
        height, width = alpha.shape
        bbox = subject_bbox(alpha)
        for k in range(per_photo):
            row_seed = photo_seed(seed, str(batch[SOURCE_SHA256][i]), k)
            rng = np.random.default_rng(row_seed)
            background_id, path = backgrounds[int(rng.integers(len(backgrounds)))]
            composite, placement = composite_subject(
                batch[FOREGROUND][i],
                alpha,
                covered_background(path, height, width),
                rng,
                scale_min=scale_min,
                scale_max=scale_max,
                bbox=bbox,
            )
            take.append(i)
            new[COMPOSITE].append(composite)
            new[BACKGROUND_ID].append(background_id)
            new[SEED].append(row_seed)
            new[PLACEMENT].append(json.dumps(placement))
            new[COMPOSITE_INDEX].append(k)
    index = np.asarray(take, dtype=np.int64)
    out = {name: _take(column, index) for name, column in batch.items() if name != FOREGROUND}
    out[COMPOSITE] = np.empty(len(index), dtype=object)
    out[COMPOSITE][:] = new[COMPOSITE]
    out[BACKGROUND_ID] = np.asarray(new[BACKGROUND_ID], dtype=object)
    out[SEED] = np.asarray(new[SEED], dtype=np.int64)
    out[PLACEMENT] = np.asarray(new[PLACEMENT], dtype=object)
    out[COMPOSITE_INDEX] = np.asarray(new[COMPOSITE_INDEX], dtype=np.int64)
    # Per-photo time goes on the photo's first row only, so sums over index-0 rows stay per photo.
    per_photo_seconds = (time.perf_counter() - start) / max(n, 1)
    out[TIMING_PREFIX + STAGE] = np.where(out[COMPOSITE_INDEX] == 0, per_photo_seconds, 0.0)
    return out
