"""Background images for compositing: a pool built by `data backgrounds` (pipeline/data/bgpool.py)
or a plain folder of photos, each named by an id."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pipeline.config import BUNDLED_DATASETS_DIR, ConfigError, is_utf8
from pipeline.data.sources import printable_name
from pipeline.data.verify import sha256_of
from pipeline.data.versions import LATEST, MANIFEST

BUNDLED_BACKGROUNDS = BUNDLED_DATASETS_DIR / "backgrounds"
_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
POOL_KIND = "background-pool"  # bgpool.py's manifest["kind"]


def list_backgrounds(folder: str | Path | None) -> list[tuple[str, str]]:
    """[(background_id, absolute path)] sorted by id.

    `None` means the bundled set. A pool (its root, whose `latest` is read, or a version folder)
    gives its manifest's images, each checked against the manifest's sha256; any other folder
    gives every image under it, each checked to open. Raises ConfigError when there is no usable
    image, or one that is damaged or does not open (a bad background would fail every photo that
    draws it, so it is refused up front).
    """
    root = Path(folder) if folder is not None else BUNDLED_BACKGROUNDS
    if root.exists() and not root.is_dir():
        raise ConfigError(f"data.backgrounds.folder: not a folder: {root} (a folder of background images, or a pool from `data backgrounds`)")
    if not root.is_dir():
        raise ConfigError(f"data.backgrounds.folder: folder not found: {root}")
    pool = pool_version(root)
    found = _pool_images(pool) if pool is not None else _folder_images(root)
    if not found:
        raise ConfigError(f"data.backgrounds.folder: no images ({', '.join(sorted(_SUFFIXES))}) in {root}")
    return found


def pool_version(root: Path) -> Path | None:
    """The pool version folder `root` names (itself, or its `latest`), or None for a plain folder."""
    for candidate in (root, root / LATEST):
        if candidate.is_dir() and (candidate / MANIFEST).is_file():
            try:
                kind = json.loads((candidate / MANIFEST).read_text()).get("kind")
            except (OSError, ValueError, AttributeError):
                raise ConfigError(f"data.backgrounds.folder: {candidate / MANIFEST} is not a readable manifest") from None
            if kind == POOL_KIND:
                return candidate.resolve() if candidate == root else root / os.readlink(root / LATEST)
    return None


def _pool_images(version: Path) -> list[tuple[str, str]]:
    manifest = json.loads((version / MANIFEST).read_text())
    checksums = manifest.get("checksums", {})
    found = []
    for image in manifest.get("images", []):
        path = version / image["file"]
        if not path.is_file():
            raise ConfigError(f"data.backgrounds.folder: background pool {version} is missing {image['file']}")
        if sha256_of(path) != checksums.get(image["file"]):
            raise ConfigError(f"data.backgrounds.folder: {path} differs from its pool's manifest (sha256): rebuild the pool")
        found.append((image["id"], str(path.resolve())))
    return sorted(found)


def _folder_images(root: Path) -> list[tuple[str, str]]:
    found = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in _SUFFIXES and p.is_file()):
        if not is_utf8(str(path)):  # its id would be each row's background_id, a UTF-8 string
            raise ConfigError(f"data.backgrounds.folder: {printable_name(str(path))}: the file name is not UTF-8: rename it")
        try:
            # Decoded, not just verify()'d: that checks a PNG's chunks, but passes a JPEG cut
            # short, which then failed the build in the composite stage. A JPEG decodes at 1/8
            # scale (draft), which still reads all its data.
            with Image.open(path) as img:
                img.draft("RGB", (1, 1))
                img.load()
        except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ConfigError(f"data.backgrounds.folder: {path} is not a readable image: {exc}") from None
        found.append((path.relative_to(root).with_suffix("").as_posix(), str(path.resolve())))
    return found


def backgrounds_digest(backgrounds: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for background_id, path in backgrounds:
        h.update(background_id.encode() + b"\0" + Path(path).read_bytes())
    return h.hexdigest()
