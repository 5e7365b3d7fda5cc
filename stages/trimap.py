"""Trimap stage: a CLIPSeg confidence map -> foreground / unknown / background.

Defaults (see TrimapConfig): confidence >= 0.5 is foreground and <= 0.2 background. CLIPSeg's
sigmoid crosses 0.5 where it prefers the prompt, so 0.5 is its own decision boundary; 0.2 keeps
the background well clear of the soft, low-resolution (352 px, 16 px patches) edge the decoder
draws. Both regions are then eroded a few pixels (3 fg, 6 bg at 512 px) so the unknown band
covers the real boundary, which CLIPSeg places only to within a patch; closed-form matting
resolves the band from colour, and a wider band costs solve time, not accuracy.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from stages.records import CATEGORY, CONFIDENCE, PLACEHOLDER_MAP, TRIMAP, Reject, apply_per_row, healthy_rows, timed

STAGE = "trimap"

BACKGROUND, UNKNOWN, FOREGROUND = 0.0, 0.5, 1.0


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (yy * yy + xx * xx) <= radius * radius


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0 or not mask.any():
        return mask
    # border_value=1: the photo's edge is not a boundary of the region.
    return ndimage.binary_erosion(mask, structure=_disk(radius), border_value=1)


def _check_thresholds(high: float, low: float) -> None:
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"need 0 <= low < high <= 1, got low={low}, high={high}")


def make_trimap(
    confidence: np.ndarray, *, high: float = 0.5, low: float = 0.2, erode_fg_px: int = 3, erode_bg_px: int = 6
) -> np.ndarray:
    """float32 (H, W) confidence in [0, 1] -> float32 (H, W) trimap of 0 / 0.5 / 1.

    Foreground is confidence >= high eroded by erode_fg_px, background is confidence <= low
    eroded by erode_bg_px, everything else unknown.
    """
    _check_thresholds(high, low)
    fg = _erode(confidence >= high, erode_fg_px)
    bg = _erode(confidence <= low, erode_bg_px)
    trimap = np.full(confidence.shape, UNKNOWN, np.float32)
    trimap[fg] = FOREGROUND
    trimap[bg] = BACKGROUND
    return trimap


def erode_torch(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """`_erode` for a (B, H, W) bool tensor, on its device: a pixel stays when no pixel of the
    disk around it is outside the region, and beyond the photo's edge counts as inside. The
    count is a convolution of 0/1 values, exact in float32 (and in TF32, up to 2048)."""
    if radius <= 0:
        return mask
    disk = torch.from_numpy(_disk(radius)).to(mask.device, torch.float32)[None, None]
    outside = F.conv2d((~mask).to(torch.float32)[:, None], disk, padding=radius)[:, 0]
    return mask & (outside < 0.5)


def make_trimap_torch(
    confidence: torch.Tensor, *, high: float = 0.5, low: float = 0.2, erode_fg_px: int = 3, erode_bg_px: int = 6
) -> torch.Tensor:
    """`make_trimap` for a (B, H, W) batch of confidence maps, on their device: the same trimaps.
    The CLIPSeg actor's GPU makes them in a few kernels, where scipy's erosions took ~25 ms of
    the actor's CPU per 512 px photo on the H100 node and capped the build at ~85 photos/s
    (BENCHMARKS.md, "CLIPSeg and trimap actor")."""
    _check_thresholds(high, low)
    fg = erode_torch(confidence >= high, erode_fg_px)
    bg = erode_torch(confidence <= low, erode_bg_px)
    trimap = torch.full(confidence.shape, UNKNOWN, dtype=torch.float32, device=confidence.device)
    return trimap.masked_fill_(fg, FOREGROUND).masked_fill_(bg, BACKGROUND)


def _trimaps_on_device(batch: dict[str, np.ndarray], device: torch.device, **settings: float) -> dict[int, np.ndarray]:
    """The trimaps of the batch's healthy rows, made on `device` one stack per map size."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i in healthy_rows(batch):
        by_shape.setdefault(np.shape(batch[CONFIDENCE][i]), []).append(int(i))
    trimaps: dict[int, np.ndarray] = {}
    for rows in by_shape.values():
        maps = torch.from_numpy(np.stack([batch[CONFIDENCE][i] for i in rows]).astype(np.float32)).to(device)
        made = make_trimap_torch(maps, **settings).cpu().numpy()
        trimaps.update(zip(rows, made, strict=True))
    return trimaps


def check_trimap(trimap: np.ndarray, confidence: np.ndarray, category: str, high: float, low: float) -> None:
    """Reject trimaps that matting cannot use: no foreground or no background at all."""
    if not (trimap == FOREGROUND).any():
        if confidence.max() < high:
            reason = f"CLIPSeg confidence for '{category}' peaks at {confidence.max():.2f}, below the foreground threshold {high}"
        else:
            reason = (
                f"the foreground region (confidence >= {high}) for '{category}' is too thin and vanished under erosion"
            )
        raise Reject(STAGE, f"no foreground: {reason}")
    if not (trimap == BACKGROUND).any():
        if confidence.min() > low:
            reason = f"CLIPSeg confidence for '{category}' never drops to {low} (minimum {confidence.min():.2f}); the subject fills the photo"
        else:
            reason = f"the background region (confidence <= {low}) is too thin and vanished under erosion"
        raise Reject(STAGE, f"no background: {reason}")


def trimap_batch(
    batch: dict[str, np.ndarray],
    *,
    high: float,
    low: float,
    erode_fg_px: int,
    erode_bg_px: int,
    device: torch.device | None = None,
) -> dict[str, np.ndarray]:
    """Ray Data adapter: CONFIDENCE -> TRIMAP for each healthy row; drops CONFIDENCE. With a
    CUDA `device` (the CLIPSeg actor's), the trimaps are made there (make_trimap_torch)."""
    settings = {"high": high, "low": low, "erode_fg_px": erode_fg_px, "erode_bg_px": erode_bg_px}

    def one(i: int) -> dict[str, object]:
        conf = batch[CONFIDENCE][i]
        trimap = made[i] if i in made else make_trimap(conf, **settings)
        check_trimap(trimap, conf, str(batch[CATEGORY][i]), high, low)
        return {TRIMAP: trimap}

    with timed(batch, STAGE):
        made = _trimaps_on_device(batch, device, **settings) if device is not None and device.type == "cuda" else {}
        batch = apply_per_row(batch, one, {TRIMAP: PLACEHOLDER_MAP})
    del batch[CONFIDENCE]
    return batch
