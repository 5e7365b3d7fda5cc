"""Photo files for tests: tricky-but-valid ones that must be accepted, and broken ones that
must become reject rows. Everything is made on the fly; nothing here is a bundled sample."""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE = Path(__file__).resolve().parent.parent / "datasets" / "dreambench-mini"


def photo(seed: int = 0, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A smooth RGB picture with a bright blob in the middle (W x H = size)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-(((yy - h / 2) / (h / 4)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2))[..., None]
    bg = rng.uniform(0, 120, 3) + 40 * np.sin(xx / 7.0)[..., None]
    img = bg * (1 - blob) + rng.uniform(150, 255, 3) * blob
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data is a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def jpeg_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kwargs)
    return buf.getvalue()


# name -> (file name, bytes); each must be rejected at `decode` (the reason is checked by tests).
def broken_files() -> dict[str, tuple[str, bytes]]:
    good = jpeg_bytes(photo(1))
    tga = io.BytesIO()
    photo(2).save(tga, format="TGA")
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 10, 10)).save(tiny, format="PNG")
    return {
        "empty": ("empty.jpg", b""),
        "truncated": ("truncated.jpg", good[: len(good) // 2]),
        "text": ("notes.jpg", b"this is a text file, not a photo\n" * 10),
        "unsupported": ("scan.tga", tga.getvalue()),
        "one_pixel": ("one_pixel.png", tiny.getvalue()),
        "bomb": ("bomb.png", png_header_only(30000, 30000)),
    }


EXPECTED_REASON = {
    "empty": "empty file",
    "truncated": "corrupt or truncated",
    "text": "not an image",
    "unsupported": "unsupported image format TGA",
    "one_pixel": "image too small",
    "bomb": "image too large",
}


def tricky_files() -> dict[str, tuple[str, bytes]]:
    """Valid photos in every awkward form; each must be accepted."""
    base = photo(3, (200, 150))
    out: dict[str, tuple[str, bytes]] = {}

    def save(name: str, img: Image.Image, fmt: str, **kwargs) -> None:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kwargs)
        out[name] = (name, buf.getvalue())

    save("gray.png", base.convert("L"), "PNG")
    save("palette.png", base.convert("P"), "PNG")
    rgba = base.convert("RGBA")
    rgba.putalpha(200)
    save("rgba.png", rgba, "PNG")
    save("cmyk.jpg", base.convert("CMYK"), "JPEG")
    gray16 = (np.asarray(base.convert("L"), np.uint32) * 257).astype(np.uint16)
    save("gray16.png", Image.fromarray(gray16), "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    out["rotated.jpg"] = ("rotated.jpg", jpeg_bytes(base, exif=exif.tobytes()))
    out["spaces"] = ("my photo 01.jpg", jpeg_bytes(photo(4)))
    out["unicode"] = ("café_ü_写真.jpg", jpeg_bytes(photo(5)))
    return out


def make_source(root: Path, subjects: dict[str, str], *, sample: bool = True, per_subject: int | None = None) -> Path:
    """A source folder: subjects.csv for `subjects` ({subject_id: category}); photo folders
    copied from the bundled sample where one exists (up to `per_subject` photos)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["subject_id,category"] + [f"{s},{c}" for s, c in subjects.items()]
    (root / "subjects.csv").write_text("\n".join(lines) + "\n")
    for subject_id in subjects:
        folder = root / subject_id
        folder.mkdir(exist_ok=True)
        if sample and (SAMPLE / subject_id).is_dir():
            for path in sorted((SAMPLE / subject_id).glob("*.jpg"))[:per_subject]:
                shutil.copy(path, folder / path.name)
    return root
