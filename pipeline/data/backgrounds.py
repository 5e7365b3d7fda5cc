"""Background images for compositing: a folder of photos, each named by its relative path."""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pipeline.config import BUNDLED_DATASETS_DIR, ConfigError

BUNDLED_BACKGROUNDS = BUNDLED_DATASETS_DIR / "backgrounds"
_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def list_backgrounds(folder: str | Path | None) -> list[tuple[str, str]]:
    """[(background_id, absolute path)] sorted by id; every file is checked to open as an image.

    `None` means the bundled set. Raises ConfigError when the folder has no usable image or a
    file that claims an image suffix does not open (a bad background would fail every photo
    that draws it, so it is refused up front).
    """
    root = Path(folder) if folder is not None else BUNDLED_BACKGROUNDS
    if not root.is_dir():
        raise ConfigError(f"data.backgrounds: folder not found: {root}")
    found = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in _SUFFIXES and p.is_file()):
        try:
            with Image.open(path) as img:
                img.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ConfigError(f"data.backgrounds: {path} is not a readable image: {exc}") from None
        found.append((path.relative_to(root).with_suffix("").as_posix(), str(path.resolve())))
    if not found:
        raise ConfigError(f"data.backgrounds: no images ({', '.join(sorted(_SUFFIXES))}) in {root}")
    return found


def backgrounds_digest(backgrounds: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for background_id, path in backgrounds:
        h.update(background_id.encode() + b"\0" + Path(path).read_bytes())
    return h.hexdigest()
