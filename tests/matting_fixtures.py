"""Synthetic matting scenes with known ground truth, for tests of the trimap and matte stages.

A scene is a smooth foreground colour composited with a soft-edged blob alpha over a textured
background, I = a F + (1 - a) B. Noise and 8-bit quantisation make the photo look like a decoded
JPEG. Without them every 3x3 window of a two-colour blend has a rank-deficient colour
covariance. That is a corner case of the matting Laplacian (see stages/matting_torch.py), not
the common case. The trimap is derived from the true alpha the way the trimap stage derives one
from a soft mask: sure regions, eroded, around an unknown band.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage


class MattingScene(NamedTuple):
    image: np.ndarray  # float32 (H, W, 3) in [0, 1], the composite (noisy, quantised to 1/255)
    alpha: np.ndarray  # float32 (H, W) in [0, 1], ground truth
    foreground: np.ndarray  # float32 (H, W, 3) in [0, 1]
    background: np.ndarray  # float32 (H, W, 3) in [0, 1]
    trimap: np.ndarray  # float32 (H, W): 0 background, 1 foreground, 0.5 unknown


def make_alpha(height: int, width: int, rng: np.random.Generator, edge_px: float = 4.0) -> np.ndarray:
    """float32 (H, W) in [0, 1]: a wobbly disc near the centre whose edge ramps linearly from 1
    to 0 over about `edge_px` pixels."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    cy = height * rng.uniform(0.42, 0.58)
    cx = width * rng.uniform(0.42, 0.58)
    angle = np.arctan2(yy - cy, xx - cx)
    # The radius wobbles with the angle, so the edge has convex and concave parts.
    radius = (
        0.28
        * min(height, width)
        * (1.0 + sum(rng.uniform(0.03, 0.1) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)))
    )
    distance = np.hypot(yy - cy, xx - cx)
    return np.clip((radius - distance) / edge_px + 0.5, 0.0, 1.0).astype(np.float32)


def make_background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """float32 (H, W, 3) in [0.1, 0.9]: blurred colour noise plus stripes, a texture at several
    scales."""
    noise = ndimage.gaussian_filter(rng.uniform(size=(height, width, 3)), sigma=(2.0, 2.0, 0.0))
    noise = (noise - noise.min()) / (np.ptp(noise) + 1e-12)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (rng.uniform(3, 8) * xx + rng.uniform(1, 4) * yy))
    tint = rng.uniform(0.2, 0.8, size=3)
    texture = 0.55 * noise + 0.25 * stripes[..., None] + 0.2 * tint
    return (0.1 + 0.8 * np.clip(texture, 0.0, 1.0)).astype(np.float32)


def make_foreground(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """float32 (H, W, 3) in [0, 1]: a slow gradient between two colours."""
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    start, end = rng.uniform(0.15, 0.95, size=(2, 3))
    t = np.clip(0.6 * xx + 0.4 * yy, 0.0, 1.0)[..., None]
    return ((1.0 - t) * start + t * end).astype(np.float32)


def make_trimap(alpha: np.ndarray, erode_px: int = 2) -> np.ndarray:
    """float32 (H, W): 1 where alpha > 0.98 and 0 where alpha < 0.02, both eroded by `erode_px`,
    and 0.5 in the band between."""
    structure = np.ones((3, 3), dtype=bool)
    fg = ndimage.binary_erosion(alpha > 0.98, structure, iterations=erode_px) if erode_px else alpha > 0.98
    bg = ndimage.binary_erosion(alpha < 0.02, structure, iterations=erode_px) if erode_px else alpha < 0.02
    trimap = np.full(alpha.shape, 0.5, dtype=np.float32)
    trimap[fg] = 1.0
    trimap[bg] = 0.0
    return trimap


def make_scene(
    height: int = 96,
    width: int = 96,
    seed: int = 0,
    *,
    edge_px: float = 4.0,
    erode_px: int = 2,
    noise: float = 0.01,
) -> MattingScene:
    """One synthetic scene. The same seed always gives the same scene. `noise` is the std of the
    Gaussian noise added before 8-bit quantisation."""
    rng = np.random.default_rng(seed)
    alpha = make_alpha(height, width, rng, edge_px)
    foreground = make_foreground(height, width, rng)
    background = make_background(height, width, rng)
    a = alpha[..., None]
    image = a * foreground + (1.0 - a) * background + rng.normal(0.0, noise, size=foreground.shape)
    image = (np.round(np.clip(image, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)
    return MattingScene(image, alpha, foreground, background, make_trimap(alpha, erode_px))


def ellipse_trimap(height: int, width: int, inner: float = 0.30, outer: float = 0.46) -> np.ndarray:
    """float32 (H, W) rough trimap for a centred subject: foreground inside an ellipse, background
    outside a larger one, and the ring between unknown (~30% of the pixels with the defaults)."""
    yy, xx = np.mgrid[0:height, 0:width]
    d = np.sqrt(((yy + 0.5) / height - 0.5) ** 2 / 0.9 + ((xx + 0.5) / width - 0.5) ** 2 / 0.8)
    trimap = np.full((height, width), 0.5, dtype=np.float32)
    trimap[d < inner] = 1.0
    trimap[d > outer] = 0.0
    return trimap


def subject_confidence(height: int, width: int, seed: int, falloff: float = 1.1) -> np.ndarray:
    """float32 (H, W) CLIPSeg-like confidence for a subject near the centre: an ellipse of random
    size, aspect and offset (from `seed`): 0.5 on its edge, 0.02 at `falloff` radii outside it,
    near 1 deep inside. A stand-in for a trained CLIPSeg's map where only random weights exist (benchmarks):
    with the trimap stage's defaults (0.5 / 0.2, eroded 3 / 6 px) it leaves 17-36% (mean 24%) of a
    512 px photo unknown, the quarter the matting benchmarks assume, where a random CLIPSeg's
    speckle leaves 0.15%."""
    rng = np.random.default_rng(seed)
    cy, cx = 0.5 + rng.uniform(-0.08, 0.08, size=2)
    ry, rx = rng.uniform(0.22, 0.34, size=2)
    # Separable in float32: the benchmark's CLIPSeg actors make one per photo on their CPU.
    ys = (((np.arange(height, dtype=np.float32) + 0.5) / height - cy) / ry) ** 2
    xs = (((np.arange(width, dtype=np.float32) + 0.5) / width - cx) / rx) ** 2
    d = np.sqrt(ys[:, None] + xs[None, :], dtype=np.float32)
    return (1.0 / (1.0 + np.exp((d - 1.0) * np.float32(4.0 / falloff)))).astype(np.float32)
