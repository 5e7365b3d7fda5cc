"""Decode stage: file bytes -> an upright RGB photo with its short side at the configured size.

Guards run in the order that keeps bad files cheap: the byte count before reading, the header's
claimed size before decoding pixels (decompression bombs), then the decode itself.
"""

from __future__ import annotations

import io
import os
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stages.records import (
    HEIGHT,
    IMAGE,
    PLACEHOLDER_RGB,
    SOURCE_PATH,
    WIDTH,
    Reject,
    apply_per_row,
    timed,
)

STAGE = "decode"

# Formats a camera, phone or web export produces; anything else PIL may half-support is refused
# rather than decoded into surprises.
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF"})



def read_bytes(path: str, max_bytes: int) -> bytes:
    """The file's bytes; Reject when it is empty, too large or unreadable."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            raise Reject(STAGE, "empty file (0 bytes)")
        if size > max_bytes:
            raise Reject(STAGE, f"file too large: {size} bytes > limit {max_bytes}")
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise Reject(STAGE, f"cannot read file: {exc.strerror or exc}") from None


def to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float gray as 8-bit gray ("L"), rescaled; any other mode as it is.
    PIL's own convert('RGB') clips 16-bit values at 255 (a white photo). Also the CLI's reader
    (pipeline/model/image_processing.py)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is flattened onto white; 16/32-bit gray is rescaled."""
    img = to_8bit(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


# What PIL raises on damaged bytes, at open (header) or load (pixels); found by cutting and
# flipping bytes of JPEG, PNG and WebP files (tests/stages/test_decode.py).
CORRUPT_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


def decode_image(
    data: bytes,
    *,
    size: int = 512,
    min_side: int = 32,
    max_pixels: int = 60_000_000,
    max_aspect: float = 4.0,
) -> np.ndarray:
    """Decode an encoded photo to uint8 (H, W, 3) RGB with min(H, W) == size.

    EXIF orientation is applied, every PIL mode is brought to RGB, and the photo is resized with
    Lanczos (up or down) so its short side is `size` px. Raises Reject for anything that is not a
    usable photo.
    """
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        # PIL's own guard (2 x Image.MAX_IMAGE_PIXELS, 179 MP) stays on: it is process-wide, and
        # the CLI, the model and the server read photos with plain PIL in this same process.
        raise Reject(STAGE, f"image too large: {exc}") from None
    except UnidentifiedImageError:
        raise Reject(STAGE, "not an image: the content is not a recognised image format") from None
    except CORRUPT_IMAGE_ERRORS as exc:  # a recognised format cut or damaged inside its header
        raise Reject(STAGE, f"corrupt or truncated image: {exc}") from None
    if img.format not in ACCEPTED_FORMATS:
        raise Reject(STAGE, f"unsupported image format {img.format} (accepted: {', '.join(sorted(ACCEPTED_FORMATS))})")
    w, h = img.size
    if w * h > max_pixels:
        raise Reject(STAGE, f"image too large: header claims {w}x{h} = {w * h / 1e6:.0f} MP > limit {max_pixels / 1e6:.0f} MP")
    if min(w, h) < min_side:
        raise Reject(STAGE, f"image too small: {w}x{h}, short side below {min_side} px")
    if max(w, h) / min(w, h) > max_aspect:
        raise Reject(STAGE, f"aspect ratio {max(w, h) / min(w, h):.1f} above limit {max_aspect}")
    try:
        if img.format == "JPEG":
            # Let libjpeg downscale by a power of two while decoding: big photos decode faster.
            img.draft("RGB", (max(size, w * size // min(w, h)), max(size, h * size // min(w, h))))
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
    except CORRUPT_IMAGE_ERRORS as exc:
        raise Reject(STAGE, f"corrupt or truncated image: {exc}") from None
    w, h = img.size
    scale = size / min(w, h)
    target = (max(size, round(w * scale)), max(size, round(h * scale)))
    if target != (w, h):
        img = img.resize(target, Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    size: int,
    min_side: int,
    max_pixels: int,
    max_bytes: int,
    max_aspect: float,
) -> dict[str, np.ndarray]:
    """Ray Data adapter: adds IMAGE (uint8 HxWx3), WIDTH and HEIGHT to each healthy row."""

    def one(i: int) -> dict[str, object]:
        data = read_bytes(str(batch[SOURCE_PATH][i]), max_bytes)
        image = decode_image(data, size=size, min_side=min_side, max_pixels=max_pixels, max_aspect=max_aspect)
        return {IMAGE: image, WIDTH: image.shape[1], HEIGHT: image.shape[0]}

    with timed(batch, STAGE):
        return apply_per_row(batch, one, {IMAGE: PLACEHOLDER_RGB, WIDTH: 0, HEIGHT: 0})
