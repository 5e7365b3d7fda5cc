"""Matte stage: closed-form matting (Levin et al. 2008) -> the subject's alpha and colours.

Backends are picked by name from BACKENDS; `auto` resolves to the best one for the device the
stage runs on. The pymatting backend solves one photo at a time on a CPU core; the torch backend
(stages/matting_torch.py) solves the same system on the GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from stages.records import (
    ALPHA,
    FOREGROUND,
    IMAGE,
    PLACEHOLDER_MAP,
    PLACEHOLDER_RGB,
    TRIMAP,
    Reject,
    apply_per_row,
    timed,
)

STAGE = "matte"

MatteFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def matte_pymatting(image: np.ndarray, trimap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (H, W, 3) photo + float32 (H, W) trimap -> (alpha float32 (H, W) in [0, 1],
    foreground uint8 (H, W, 3)), with pymatting's estimate_alpha_cf and estimate_foreground_ml."""
    from pymatting import estimate_alpha_cf, estimate_foreground_ml

    rgb = image.astype(np.float64) / 255.0
    try:
        alpha = estimate_alpha_cf(rgb, trimap.astype(np.float64))
    except ValueError as exc:  # pymatting's own trimap checks (e.g. no known pixels)
        raise Reject(STAGE, f"closed-form matting refused the trimap: {exc}") from None
    alpha = np.clip(alpha, 0.0, 1.0)
    if not np.isfinite(alpha).all():
        raise Reject(STAGE, "closed-form matting diverged (non-finite alpha)")
    foreground = estimate_foreground_ml(rgb, alpha)
    foreground = np.clip(np.rint(foreground * 255.0), 0, 255).astype(np.uint8)
    return alpha.astype(np.float32), foreground


def matte_torch(image: np.ndarray, trimap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Same contract as matte_pymatting, solved by stages/matting_torch.py on the GPU when
    there is one (CPU otherwise); alpha within ~1e-3 of pymatting's (see its tests)."""
    from stages.matting_torch import estimate_alpha_cf_torch, estimate_foreground_torch

    rgb = image.astype(np.float32) / 255.0
    try:
        alpha = estimate_alpha_cf_torch(rgb, trimap.astype(np.float32))
    except ValueError as exc:  # no foreground or no background in the trimap
        raise Reject(STAGE, f"closed-form matting refused the trimap: {exc}") from None
    if not np.isfinite(alpha).all():
        raise Reject(STAGE, "closed-form matting diverged (non-finite alpha)")
    foreground = estimate_foreground_torch(rgb, alpha)
    foreground = np.clip(np.rint(foreground * 255.0), 0, 255).astype(np.uint8)
    return alpha.astype(np.float32), foreground


BACKENDS: dict[str, MatteFn] = {"pymatting": matte_pymatting, "torch": matte_torch}


def resolve_backend(name: str) -> str:
    """`auto` -> the torch solver when it is installed and a GPU is present, else pymatting."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown matting backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
        return name
    import torch

    return "torch" if "torch" in BACKENDS and torch.cuda.is_available() else "pymatting"


def matte_batch(batch: dict[str, np.ndarray], *, backend: str = "auto") -> dict[str, np.ndarray]:
    """Ray Data adapter: IMAGE + TRIMAP -> ALPHA and FOREGROUND for each healthy row."""
    matte = BACKENDS[resolve_backend(backend)]

    def one(i: int) -> dict[str, object]:
        alpha, foreground = matte(batch[IMAGE][i], batch[TRIMAP][i])
        return {ALPHA: alpha, FOREGROUND: foreground}

    with timed(batch, STAGE):
        return apply_per_row(batch, one, {ALPHA: PLACEHOLDER_MAP, FOREGROUND: PLACEHOLDER_RGB})
