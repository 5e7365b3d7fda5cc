"""Decode stage: file bytes -> an upright RGB photo with its short side at the configured size.

Guards run in the order that keeps bad files cheap: the byte count before reading, the count of
JPEG scans and PNG chunks and the header's claimed size before decoding pixels (decompression
bombs), then the decode itself.
"""

from __future__ import annotations

import io
import os
import re
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


# BMP compressions refused: PIL decodes run-length encoded BMPs in Python, a pixel at a time (a
# 125 KB RLE4 BMP of 4000x4000 px took 2 s), and no camera, phone or web export writes them.
BMP_RLE = frozenset({1, 2})  # RLE8, RLE4


# Segments a photo may hold. Its decoding costs time in its segments, not only in the pixels its
# header claims: PIL decodes each scan of a progressive JPEG over the whole image (a 550 KB JPEG
# of 7000x7000 px repeating a 26-byte scan 10,000 times took 22 s of a core), and parses each PNG
# chunk, GIF block before the image and TIFF strip in Python (6 MB of 500,000 empty PNG chunks
# took 3 s to open, 4 MB of 1-byte GIF comment blocks 1.3 s, and an 8 MB TIFF of 64x64 px in
# 1,000,000 strips 183 s to decode). A progressive JPEG has about 10 scans (NVIDIA's nvImageCodec
# refuses more than 256). libpng writes a PNG's pixels in 8 KiB chunks, 8,192 of them in
# data.decode.max_bytes (64 MiB); a TIFF of a strip a row within data.decode.max_pixels (60 MP)
# and max_aspect (4) has at most 15,492 strips.
MAX_JPEG_SCANS = 256
MAX_SEGMENTS = 16_384  # PNG chunks, GIF blocks before the first image, TIFF tags, strips or tiles
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
TIFF_SIGNATURES = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF


def check_segments(data: bytes) -> None:
    """Reject a JPEG of more than MAX_JPEG_SCANS scans, or a PNG, GIF or TIFF of more than
    MAX_SEGMENTS segments, counted in the bytes before PIL parses any."""
    if data.startswith(b"\xff\xd8"):
        if _jpeg_scans(data, MAX_JPEG_SCANS + 1) > MAX_JPEG_SCANS:
            raise Reject(STAGE, f"too many JPEG scans: more than {MAX_JPEG_SCANS} (a progressive JPEG has about 10)")
    elif data.startswith(PNG_SIGNATURE):
        _check_count("PNG chunks", _png_chunks(data, MAX_SEGMENTS + 1))
    elif data[:6] in GIF_SIGNATURES:
        _check_count("GIF blocks before the image", _gif_blocks(data, MAX_SEGMENTS + 1))
    elif data[:4] in TIFF_SIGNATURES:
        _check_count("TIFF tags, strips or tiles", _tiff_pieces(data))


def _check_count(what: str, count: int) -> None:
    if count > MAX_SEGMENTS:
        raise Reject(STAGE, f"too many {what}: more than {MAX_SEGMENTS}")


# A JPEG marker: FF and a byte other than 00 (an FF of coded data), a restart marker (D0-D7) or
# another FF (fill).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_STANDALONE_MARKERS = frozenset({0x01, 0xD8})  # TEM, SOI: no length follows


def _jpeg_scans(data: bytes, most: int) -> int:
    """The scans (SOS markers) of the first image of JPEG `data`, counted up to `most`. Marker
    segments are stepped over by their length, so metadata (an EXIF thumbnail) and what follows
    the end-of-image marker (an MPO's second image, a motion photo's video), which PIL does not
    decode, are not counted."""
    position, scans = 2, 0
    while scans < most:
        marker = _JPEG_MARKER.search(data, position)
        if marker is None or data[marker.start() + 1] == 0xD9:  # EOI
            break
        kind, position = data[marker.start() + 1], marker.end()
        scans += kind == 0xDA
        if kind not in _STANDALONE_MARKERS and position + 2 <= len(data):
            position += struct.unpack_from(">H", data, position)[0]
    return scans


def _gif_blocks(data: bytes, most: int) -> int:
    """The data blocks of the extensions before GIF `data`'s first image, counted up to `most`."""
    flags = data[10] if len(data) > 10 else 0
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # the header, then the global colour table
    count = 0
    while count < most and position + 1 < len(data) and data[position] == 0x21:  # an extension
        position += 2  # its introducer and label, then blocks of a size byte each, up to an empty one
        while count < most and position < len(data):
            size = data[position]
            position, count = position + 1 + size, count + 1
            if not size:
                break
    return count


def _tiff_pieces(data: bytes) -> int:
    """The entries of the first directory of TIFF `data`, or its strips or tiles (the count of
    its StripOffsets or TileOffsets tag) if more; 0 when the directory cannot be read (PIL names
    the damage)."""
    order = "<" if data.startswith(b"II") else ">"
    big = data[2:4] in (b"+\0", b"\0+")  # BigTIFF: 8-byte offsets and counts
    offset, number, entry, entry_size = ("Q", "Q", "HHQ", 20) if big else ("I", "H", "HHI", 12)
    try:
        (directory,) = struct.unpack_from(order + offset, data, 8 if big else 4)
        (entries,) = struct.unpack_from(order + number, data, directory)
        if entries > MAX_SEGMENTS:
            return entries
        start = directory + struct.calcsize(number)
        tags = [struct.unpack_from(order + entry, data, start + i * entry_size) for i in range(entries)]
    except struct.error:
        return 0
    return max([entries, *(count for tag, _, count in tags if tag in (273, 324))])  # StripOffsets, TileOffsets


def _png_chunks(data: bytes, most: int) -> int:
    """The chunks of PNG `data`, counted up to `most` (a damaged length ends the count early;
    PIL names the damage)."""
    position, count = len(PNG_SIGNATURE), 0
    while count < most and position + 8 <= len(data):
        (length,) = struct.unpack_from(">I", data, position)
        position += 12 + length  # length, type, data, CRC
        count += 1
    return count


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
    check_segments(data)
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
    if img.format == "BMP" and img.info.get("compression") in BMP_RLE:
        raise Reject(STAGE, "unsupported BMP compression: run-length encoded (RLE)")
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
