"""The write stage's encoding cost per photo (`stages.write.encode_batch`), on CPU.

Rows are the bundled sample's photos resized to SIZE px, each with K composite rows (the
composite is the photo shifted, so it compresses like a photo), a radial alpha and its trimap.
Prints milliseconds of encoding per photo and bytes per row for each K, best of 3 passes.

    python benchmarks/bench_encode.py [--size 512] [--photos 16] [--format jpeg]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from stages.write import encode_batch

SAMPLE = Path(__file__).resolve().parents[1] / "datasets" / "dreambench-mini"


def make_batch(photos: list[np.ndarray], per_photo: int, size: int) -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    alpha = np.clip(1.2 - np.hypot(yy - size / 2, xx - size / 2) / (0.4 * size), 0, 1).astype(np.float32)
    trimap = np.where(alpha > 0.9, 1.0, np.where(alpha < 0.1, 0.0, 0.5)).astype(np.float32)
    n = len(photos) * per_photo
    cols = {name: np.empty(n, dtype=object) for name in ("image", "composite", "alpha", "trimap")}
    for p, image in enumerate(photos):
        for k in range(per_photo):
            i = p * per_photo + k
            cols["image"][i], cols["alpha"][i], cols["trimap"][i] = image, alpha, trimap
            cols["composite"][i] = np.roll(image, 37 * (k + 1), axis=1)
    cols["source_uri"] = np.array([f"s/{i // per_photo}.jpg" for i in range(n)], dtype=object)
    cols["reject_stage"] = np.full(n, "", dtype=object)
    cols["reject_reason"] = np.full(n, "", dtype=object)
    return cols


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--photos", type=int, default=16)
    parser.add_argument("--format", choices=("jpeg", "png"), default="jpeg")
    args = parser.parse_args()
    files = sorted(SAMPLE.glob("*/*.jpg"))[: args.photos]
    photos = [np.asarray(Image.open(f).convert("RGB").resize((args.size, args.size))) for f in files]
    results = []
    for per_photo in (1, 2, 4):
        batch = make_batch(photos, per_photo, args.size)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            out = encode_batch(batch, image_format=args.format, jpeg_quality=95, dataset_version="bench")
            best = min(best, time.perf_counter() - start)
        row_bytes = sum(len(out[c][0]) for c in ("image", "composite", "alpha", "trimap"))
        results.append({"per_photo": per_photo, "ms_per_photo": round(best / len(photos) * 1e3, 2), "bytes_first_row": row_bytes})
        print(json.dumps(results[-1]))


if __name__ == "__main__":
    main()
