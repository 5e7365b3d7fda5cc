"""Filter stage: reject photos whose matte is unusable for compositing.

Runs before compositing (the issue lists it after) because a rejected photo needs no composites.
"""

from __future__ import annotations

import numpy as np

from stages.records import ALPHA, ALPHA_AREA, Reject, apply_per_row, timed

STAGE = "filter"


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
