"""Composite stage: paste the matted subject onto random backgrounds.

Each accepted photo becomes `per_photo` rows. Every random choice (background, scale, position)
comes from a generator seeded by the run's seed, the photo's sha256 and the composite index, so
a photo gets the same composites whatever the order, batching or number of workers.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from stages.decode import to_8bit
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


# Alpha above this counts as subject when boxing it (subject_bbox).
BBOX_THRESHOLD = 0.01


def subject_bbox(alpha: np.ndarray, threshold: float = BBOX_THRESHOLD) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), half-open, of the pixels with alpha above `threshold`."""
    mask = alpha > threshold
    return bbox_of_profiles(mask.any(axis=1), mask.any(axis=0))


def bbox_of_profiles(rows: np.ndarray, cols: np.ndarray) -> tuple[int, int, int, int]:
    """subject_bbox from which rows and which columns hold a subject pixel (bool (H,), (W,)):
    all a device needs to send back for the box."""
    rows, cols = np.flatnonzero(rows), np.flatnonzero(cols)
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


def draw_crop(rng: np.random.Generator, covered: tuple[int, int], height: int, width: int) -> tuple[int, int]:
    """(top, left) of a random (height, width) crop of a covered background of shape `covered`."""
    nh, nw = covered
    top = int(rng.integers(0, nh - height + 1))
    left = int(rng.integers(0, nw - width + 1))
    return top, left


def fit_background(background: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (h, w, 3) background -> uint8 (height, width, 3): scaled to cover, randomly cropped.

    The crop is a view of the covered background; copy it before writing to it."""
    covered = cover_background(background, height, width)
    top, left = draw_crop(rng, covered.shape[:2], height, width)
    return covered[top : top + height, left : left + width]


@dataclass(frozen=True)
class Placement:
    """One composite's random draws: the crop of the covered background (crop_top, crop_left),
    and the subject box's top-left `x`, `y` and size `width`, `height` in the composite (px),
    `scale` being the resize factor applied to the subject."""

    crop_top: int
    crop_left: int
    x: int
    y: int
    width: int
    height: int
    scale: float

    def as_dict(self) -> dict[str, float]:
        """What the PLACEMENT column holds (as JSON): where the subject went, not the crop."""
        return {"x": self.x, "y": self.y, "width": self.width, "height": self.height, "scale": self.scale}


def draw_placement(
    rng: np.random.Generator,
    height: int,
    width: int,
    covered: tuple[int, int],
    bbox: tuple[int, int, int, int],
    scale_min: float,
    scale_max: float,
) -> Placement:
    """The random draws of one composite on a (height, width) canvas, from a background covered
    to shape `covered`, of the subject box `bbox` (subject_bbox). Both the PIL and the torch
    composites take their draws from here, so they place every subject alike. The order of the
    draws (crop, scale, y, x) is what fixes every published placement: keep it."""
    crop_top, crop_left = draw_crop(rng, covered, height, width)
    top, bottom, left, right = bbox
    box_h, box_w = bottom - top, right - left
    # The subject's long side becomes a random fraction of the canvas' short side, but never
    # more than fits on the canvas.
    target = rng.uniform(scale_min, scale_max) * min(height, width)
    scale = min(target / max(box_h, box_w), height / box_h, width / box_w)
    new_h, new_w = max(1, round(box_h * scale)), max(1, round(box_w * scale))
    y = int(rng.integers(0, height - new_h + 1))
    x = int(rng.integers(0, width - new_w + 1))
    return Placement(crop_top, crop_left, x, y, new_w, new_h, float(scale))


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
    placement (Placement.as_dict). `bbox` is `subject_bbox(alpha)` when the caller already has
    it (a photo's K composites share it).
    """
    height, width = alpha.shape
    covered = cover_background(background, height, width)
    bbox = subject_bbox(alpha) if bbox is None else bbox
    placement = draw_placement(rng, height, width, covered.shape[:2], bbox, scale_min, scale_max)
    return paste_subject(foreground, alpha, covered, bbox, placement), placement.as_dict()


def paste_subject(
    foreground: np.ndarray,
    alpha: np.ndarray,
    covered: np.ndarray,
    bbox: tuple[int, int, int, int],
    placement: Placement,
) -> np.ndarray:
    """The pixel work of composite_subject, with PIL: the subject box of foreground (LANCZOS)
    and alpha (BILINEAR) resized to the placement and blended onto the placement's crop of the
    covered background (cover_background at the photo's size). uint8 (H, W, 3)."""
    height, width = alpha.shape
    p = placement
    composite = np.array(covered[p.crop_top : p.crop_top + height, p.crop_left : p.crop_left + width])
    top, bottom, left, right = bbox
    fg = Image.fromarray(foreground[top:bottom, left:right]).resize((p.width, p.height), Image.Resampling.LANCZOS)
    a = Image.fromarray(alpha[top:bottom, left:right].astype(np.float32), mode="F").resize(
        (p.width, p.height), Image.Resampling.BILINEAR
    )
    # Only the pasted box is blended, in float32; the rest of the canvas stays uint8. Per pixel
    # this is a * fg + (1 - a) * bg, rounded, as on a float canvas: the same bytes, less work.
    a_arr = np.array(a, np.float32)[..., None]
    np.clip(a_arr, 0.0, 1.0, out=a_arr)
    region = composite[p.y : p.y + p.height, p.x : p.x + p.width]
    blend = np.asarray(fg, np.float32)
    blend *= a_arr
    rest = region.astype(np.float32)
    rest *= 1.0 - a_arr
    blend += rest
    np.rint(blend, out=blend)
    np.clip(blend, 0, 255, out=blend)
    region[...] = blend
    return composite


@lru_cache(maxsize=64)
def load_background(path: str) -> np.ndarray:
    """A background file as uint8 (h, w, 3) RGB, short side at most 1024 px (cached per worker).
    16-bit gray is scaled to 8 as the decode stage scales it (to_8bit): convert("RGB") alone
    clipped it to white."""
    with Image.open(path) as img:
        img = to_8bit(img).convert("RGB")
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


@dataclass(frozen=True)
class CompositeDraw:
    """Everything random about one composite row: its COMPOSITE_INDEX, SEED, background and
    placement."""

    index: int
    seed: int
    background_id: str
    background_path: str
    placement: Placement


def draw_composites(
    sha256: str,
    height: int,
    width: int,
    bbox: tuple[int, int, int, int],
    *,
    backgrounds: list[tuple[str, str]],
    per_photo: int,
    seed: int,
    scale_min: float,
    scale_max: float,
    cover: Callable[[str, int, int], np.ndarray] = covered_background,
) -> list[CompositeDraw]:
    """The `per_photo` composites' draws of a (height, width) photo with content hash `sha256`
    and subject box `bbox`, each from its own seed (photo_seed)."""
    return [
        draw_composite(k, photo_seed(seed, sha256, k), height, width, bbox, backgrounds, scale_min, scale_max, cover)
        for k in range(per_photo)
    ]


def drawn_backgrounds(sha256: str, *, backgrounds: list[tuple[str, str]], per_photo: int, seed: int, **_: object) -> list[str]:
    """The background paths draw_composites picks for a photo, without its placements (which
    need the subject box): what a stage can load while the photo's matte is still being solved.
    Takes composite_batch's keyword arguments."""
    return [_draw_background(np.random.default_rng(photo_seed(seed, sha256, k)), backgrounds)[1] for k in range(per_photo)]


def _draw_background(rng: np.random.Generator, backgrounds: list[tuple[str, str]]) -> tuple[str, str]:
    """A composite's first draw, of (background_id, path)."""
    return backgrounds[int(rng.integers(len(backgrounds)))]


def draw_composite(
    index: int,
    row_seed: int,
    height: int,
    width: int,
    bbox: tuple[int, int, int, int],
    backgrounds: list[tuple[str, str]],
    scale_min: float,
    scale_max: float,
    cover: Callable[[str, int, int], np.ndarray] = covered_background,
) -> CompositeDraw:
    """One composite's draws from a generator seeded by `row_seed`: the background first, then
    draw_placement's. The build's composites (draw_composites) and training's online ones
    (stages/online_composite.py) both draw here, with their own seeds. `cover` gives the
    covered background (covered_background, or what a stage loaded ahead of time)."""
    rng = np.random.default_rng(row_seed)
    background_id, path = _draw_background(rng, backgrounds)
    covered = cover(path, height, width).shape[:2]
    placement = draw_placement(rng, height, width, covered, bbox, scale_min, scale_max)
    return CompositeDraw(index, row_seed, background_id, path, placement)


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
    SEED, PLACEMENT (JSON) and COMPOSITE_INDEX; rejected rows pass through once. FOREGROUND stays:
    with ALPHA it is the row's cutout, which training composites anew (train.composite online).

    `backgrounds` is a list of (background_id, path), in a fixed order.
    """
    start = time.perf_counter()
    made: dict[int, list[tuple[CompositeDraw, np.ndarray]]] = {}
    for i in healthy_rows(batch):
        foreground, alpha = batch[FOREGROUND][i], batch[ALPHA][i]
        height, width = alpha.shape
        bbox = subject_bbox(alpha)
        draws = draw_composites(
            str(batch[SOURCE_SHA256][i]),
            height,
            width,
            bbox,
            backgrounds=backgrounds,
            per_photo=per_photo,
            seed=seed,
            scale_min=scale_min,
            scale_max=scale_max,
        )
        made[int(i)] = []
        for d in draws:
            covered = covered_background(d.background_path, height, width)
            made[int(i)].append((d, paste_subject(foreground, alpha, covered, bbox, d.placement)))
    return composite_rows(batch, made, start)


# The columns the composite stage adds, and their values on a row that gets no composite.
_COMPOSITE_COLUMNS = (COMPOSITE, BACKGROUND_ID, SEED, PLACEMENT, COMPOSITE_INDEX)
_NO_COMPOSITE = (PLACEHOLDER_RGB, "", 0, "", 0)


def composite_rows(
    batch: dict[str, np.ndarray], made: dict[int, list[tuple[CompositeDraw, np.ndarray]]], start: float
) -> dict[str, np.ndarray]:
    """The composite stage's output rows: row i of `batch` becomes one row per composite in
    `made[i]` (its draw and uint8 (H, W, 3) composite), and a row not in `made` passes once with
    placeholders. `start` is when the stage's work on the batch began (time.perf_counter), for
    its per-photo timing."""
    take: list[int] = []
    new: dict[str, list] = {name: [] for name in _COMPOSITE_COLUMNS}
    for i in range(len(batch[SOURCE_URI])):
        if i in made:
            rows = [(c, d.background_id, d.seed, json.dumps(d.placement.as_dict()), d.index) for d, c in made[i]]
        else:
            rows = [_NO_COMPOSITE]
        for row in rows:
            take.append(i)
            for name, value in zip(_COMPOSITE_COLUMNS, row, strict=True):
                new[name].append(value)
    index = np.asarray(take, dtype=np.int64)
    out = {name: _take(column, index) for name, column in batch.items()}
    out[COMPOSITE] = np.empty(len(index), dtype=object)
    out[COMPOSITE][:] = new[COMPOSITE]
    out[BACKGROUND_ID] = np.asarray(new[BACKGROUND_ID], dtype=object)
    out[SEED] = np.asarray(new[SEED], dtype=np.int64)
    out[PLACEMENT] = np.asarray(new[PLACEMENT], dtype=object)
    out[COMPOSITE_INDEX] = np.asarray(new[COMPOSITE_INDEX], dtype=np.int64)
    # Per-photo time goes on the photo's first row only, so sums over index-0 rows stay per photo.
    per_photo_seconds = (time.perf_counter() - start) / max(len(batch[SOURCE_URI]), 1)
    out[TIMING_PREFIX + STAGE] = np.where(out[COMPOSITE_INDEX] == 0, per_photo_seconds, 0.0)
    return out
