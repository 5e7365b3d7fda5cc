"""Filter stage: reject photos whose matte is unusable for compositing, and photos of what the
dataset must not hold (`data.filter.exclude_prompts`: BLIP-Diffusion's pretraining removes
human-related images).

The matte checks run before compositing (the issue lists them after) because a rejected photo
needs no composites. The exclusion check runs in the segment actor, on the CLIPSeg pass that
scores the prompts (stages/segment.py), so that an excluded photo is never matted or captioned.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from stages.records import ALPHA, ALPHA_AREA, Reject, apply_per_row, timed

STAGE = "filter"

# A pixel shows an excluded prompt where CLIPSeg's confidence for it (its sigmoid) reaches this:
# CLIPSeg's own decision boundary, the trimap's default foreground threshold.
EXCLUDE_CONFIDENCE = 0.5


def prompt_areas(logits: torch.Tensor) -> np.ndarray:
    """CLIPSeg logits (..., h, w) -> float64 (...): the fraction of each map whose confidence is
    at least EXCLUDE_CONFIDENCE. Taken at model resolution: CLIPSeg stretches the photo to its
    square input, and a stretch keeps fractions of the area."""
    return (torch.sigmoid(logits.float()) >= EXCLUDE_CONFIDENCE).double().mean(dim=(-2, -1)).cpu().numpy()


def check_excluded(areas: Mapping[str, float], category: str, exclude_area: float) -> None:
    """Reject when an excluded prompt covers more than `exclude_area` of the photo. `areas` maps
    each prompt to its fraction (prompt_areas); a prompt equal to the photo's category is not
    applied, so a dataset of people may still exclude them from other subjects' photos."""
    for prompt, area in areas.items():
        if area > exclude_area and prompt.strip().lower() != category.strip().lower():
            raise Reject(
                STAGE, f"excluded content: CLIPSeg finds {prompt!r} on {area:.1%} of the photo > exclude_area {exclude_area:.1%}"
            )


def check_matte(alpha: np.ndarray, *, min_area: float = 0.01, max_area: float = 0.95) -> float:
    """float32 (H, W) alpha in [0, 1] -> its area (mean alpha); Reject when outside the bounds."""
    if alpha.size == 0:
        return check_matte_stats(0.0, 0.0, min_area=min_area, max_area=max_area)
    return check_matte_stats(float(alpha.max()), float(alpha.mean()), min_area=min_area, max_area=max_area)


def check_matte_stats(peak: float, area: float, *, min_area: float = 0.01, max_area: float = 0.95) -> float:
    """check_matte on the two numbers it looks at, the matte's peak (max) and area (mean): what
    a device that holds the matte sends back."""
    if peak < 0.5:
        raise Reject(STAGE, "empty matte: no pixel is at least half foreground")
    if area < min_area:
        raise Reject(STAGE, f"subject too small: matte covers {area:.1%} of the photo < min_area {min_area:.1%}")
    if area > max_area:
        raise Reject(STAGE, f"subject fills the photo: matte covers {area:.1%} > max_area {max_area:.1%}")
    return area


def filter_batch(batch: dict[str, np.ndarray], *, min_area: float, max_area: float) -> dict[str, np.ndarray]:
    """Ray Data adapter: adds ALPHA_AREA, rejects rows whose matte fails check_matte."""

    def one(i: int) -> dict[str, object]:
        return {ALPHA_AREA: check_matte(batch[ALPHA][i], min_area=min_area, max_area=max_area)}

    with timed(batch, STAGE):
        return apply_per_row(batch, one, {ALPHA_AREA: 0.0})
