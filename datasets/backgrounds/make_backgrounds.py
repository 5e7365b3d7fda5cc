"""Make the bundled procedural backgrounds (run from the repo root; output is committed).

    python datasets/backgrounds/make_backgrounds.py

Twelve 512x512 JPEGs: gradients, smooth colour noise, stripes, checkerboards and soft blobs,
seeded so the set is reproducible. They are ours (no licence to track). For real training,
point `data.backgrounds` (or `--backgrounds`) at a folder of photos, e.g. a scenery set.
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

SIZE = 512
OUT = Path(__file__).resolve().parent


def smooth_noise(rng, cells, size=SIZE):
    small = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC), np.float32)


def gradient(rng, size=SIZE):
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size
    t = np.clip((np.cos(angle) * xx + np.sin(angle) * yy) / (abs(np.cos(angle)) + abs(np.sin(angle))), 0, 1)[..., None]
    return a * (1 - t) + b * t


def stripes(rng, size=SIZE):
    period = rng.uniform(16, 64)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size]
    t = (0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period))[..., None]
    return gradient(rng) * t + gradient(rng) * (1 - t)


def checker(rng, size=SIZE):
    cell = int(rng.integers(24, 80))
    yy, xx = np.mgrid[0:size, 0:size]
    t = (((yy // cell) + (xx // cell)) % 2)[..., None].astype(np.float32)
    return rng.uniform(0, 255, 3) * t + rng.uniform(0, 255, 3) * (1 - t)


def blobs(rng, size=SIZE):
    img = gradient(rng)
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(int(rng.integers(4, 10))):
        cy, cx, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(30, 140)]
        w = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - w) + rng.uniform(0, 255, 3) * w
    return img


def main():
    rng = np.random.default_rng(20261123)
    makers = [gradient, gradient, smooth_noise, smooth_noise, stripes, stripes, checker, checker, blobs, blobs, blobs, smooth_noise]
    for i, make in enumerate(makers):
        img = make(rng, 4 + 4 * i) if make is smooth_noise else make(rng)
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))
        pil.save(OUT / f"{make.__name__}-{i:02d}.jpg", quality=88)


if __name__ == "__main__":
    main()
