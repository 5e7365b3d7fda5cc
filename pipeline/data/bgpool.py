"""`data backgrounds`: a versioned pool of background photos for the composites.

Every file under the source is an input and ends either in the pool or in its reject list with a
reason: decoded with the dataset's decode limits, resized and centre-cropped to a square of
`data.decode.size` px, de-duplicated by the hash of those pixels (a photo saved twice, or saved
again at another quality that decodes alike, is one background), then dropped where CLIPSeg finds
a salient object for any of `data.backgrounds.reject_prompts` (a dog in a background would be a
second subject in the composite). A pool is laid out like a dataset (OUT/<version>/, OUT/latest,
staging, lock: pipeline/data/versions.py): images/<id>.<ext> and a manifest with each file's
sha256 and the pool's digest, which `data build --backgrounds POOL` records as its backgrounds'.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.config import Config
from pipeline.data.backgrounds import POOL_KIND
from pipeline.data.sources import SourceError, not_a_file_reason, read_subjects_csv
from pipeline.data.verify import record_checksums
from pipeline.data.versions import MANIFEST, DatasetStore, utc_now, write_json_atomic
from pipeline.errors import JobFailed
from pipeline.hub import require_model
from pipeline.paths import remove_tree
from stages.decode import decode_image, read_bytes
from stages.records import Reject

log = logging.getLogger(__name__)

IMAGES = "images"
DEFAULT_REJECT_PROMPTS = ("person",)
_BATCH = 16  # photos per CLIPSeg forward

# (photos uint8 (B, S, S, 3), prompt) -> confidences float32 (B, h, w) in [0, 1]
Scorer = Callable[[list[np.ndarray], str], np.ndarray]


@dataclass
class PoolResult:
    version: str
    path: Path
    manifest: dict[str, Any]
    message: str


def centre_square(photo: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) with min(H, W) == size (decode_image's output) -> its centre (size, size, 3)."""
    h, w = photo.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(photo[top : top + size, left : left + size])


def salient_prompt(confidences: dict[str, np.ndarray], threshold: float, area: float) -> str | None:
    """The first prompt (in the given order) whose confidence map (float (h, w) in [0, 1]) is
    above `threshold` on more than `area` of the photo, with that share; None when none is."""
    for prompt, conf in confidences.items():
        share = float((conf > threshold).mean())
        if share > area:
            return f"CLIPSeg finds '{prompt}' on {share:.0%} of the photo (> data.backgrounds.reject_area {area:g})"
    return None


class ClipSegScorer:
    """CLIPSeg's raw sigmoid confidences at its own resolution, for `salient_prompt`. Never the
    per-photo min-max scaling the tiny profile segments with: that finds an object in every photo."""

    def __init__(self, model_path: str) -> None:
        from stages.segment import Segmenter, confidence_from_logits

        self.segmenter = Segmenter(model_path, prompt_template="{category}", batch_size=_BATCH, normalize="none")
        self._confidence = confidence_from_logits

    def __call__(self, photos: list[np.ndarray], prompt: str) -> np.ndarray:
        logits = self.segmenter.predict_logits(photos, [prompt] * len(photos))
        return self._confidence(logits, *logits.shape[-2:])


def reject_prompts(config: Config, categories_from: str | Path | None) -> list[str]:
    """`data.backgrounds.reject_prompts`, or by default the category nouns of the subjects.csv in
    `categories_from` (a dataset source) and "person"."""
    explicit = config.data.backgrounds.reject_prompts
    if explicit is not None:
        if categories_from is not None:  # the tiny profile sets [] too: say the flag is not read
            log.warning("--categories-from %s is not read: data.backgrounds.reject_prompts is set (%s)", categories_from, list(explicit))
        return list(explicit)
    prompts = []
    if categories_from is not None:
        csv = Path(categories_from) / "subjects.csv"
        if not csv.is_file():
            raise SourceError(f"--categories-from {categories_from}: no subjects.csv there")
        prompts = sorted(set(read_subjects_csv(csv).values()))
    else:
        log.warning("no --categories-from: only %s is looked for in the backgrounds", ", ".join(DEFAULT_REJECT_PROMPTS))
    return prompts + [p for p in DEFAULT_REJECT_PROMPTS if p not in prompts]


def build_background_pool(
    source: str | Path,
    out: str | Path,
    config: Config,
    *,
    categories_from: str | Path | None = None,
    scorer: Scorer | None = None,
) -> PoolResult:
    """Build a new pool version at `out` from every file under `source`; see the module
    docstring. `scorer` defaults to CLIPSeg (models.clipseg). Raises SourceError for a source that
    is not a folder or an `out` inside it, StoreError for an `out` that cannot be written, JobFailed
    when no photo is kept (nothing is published)."""
    root = Path(source)
    if not root.is_dir():
        raise SourceError(f"--source {root}: not a folder")
    if Path(out).resolve().is_relative_to(root.resolve()):
        raise SourceError(f"--out {out} is inside the source {root}: choose a folder outside it")
    prompts = reject_prompts(config, categories_from)
    if scorer is None:
        require_model("clipseg", config.model_path("clipseg"))
        scorer = ClipSegScorer(config.model_path("clipseg"))
    inputs = _inputs(root)
    accepted, rejects = _select(root, inputs, config, prompts, scorer)
    if not accepted:  # an empty pool would only fail later, in `data build --backgrounds`
        reasons = "; ".join(f"{uri}: {reason}" for uri, reason in list(rejects.items())[:5]) or "no files"
        raise JobFailed(f"no background kept from {len(inputs)} input(s) under {root}, nothing published ({reasons})")
    store = DatasetStore(out)
    with store.lock():
        store.recover()
        version = store.next_version()
        staging = store.new_staging(version)
        try:
            manifest = _write_pool(staging, version, root, inputs, accepted, rejects, config, prompts)
        except BaseException:  # a half-written pool (a full disk) is never left in OUT
            remove_tree(staging, store.root)
            raise
        path = store.publish(staging, version)
    message = f"{version}: {manifest['accepted']} backgrounds, {manifest['rejected']} of {manifest['inputs']} inputs rejected, at {path}"
    return PoolResult(version, path, manifest, message)


def _inputs(root: Path) -> list[Path]:
    """Every entry under `root` but the folders it lists, sorted: files, links (never followed),
    FIFOs and devices, and each folder that cannot be listed (its files unknown), which
    Path.rglob left out without a word."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(root, onerror=lambda exc: found.append(Path(exc.filename))):
        found.extend(Path(folder, name) for name in files)
        found.extend(Path(folder, name) for name in dirs if Path(folder, name).is_symlink())
    return sorted(found)


@dataclass
class _Kept:
    uri: str
    pixels: np.ndarray  # uint8 (S, S, 3)
    sha256: str  # of the pixels


def _select(
    root: Path, inputs: list[Path], config: Config, prompts: list[str], scorer: Scorer
) -> tuple[list[_Kept], dict[str, str]]:
    """(kept photos in input order, {source uri: reason} of the others)."""
    decode = config.data.decode
    bg = config.data.backgrounds
    rejects: dict[str, str] = {}
    kept: list[_Kept] = []
    seen: dict[str, str] = {}
    for path in inputs:
        uri = path.relative_to(root).as_posix()
        if path.is_symlink():
            rejects[uri] = "a link: links are not followed"
            continue
        mode = path.lstat().st_mode
        if stat.S_ISDIR(mode):  # only a folder that could not be listed is an input (_inputs)
            rejects[uri] = "cannot read the folder: its files are unknown"
            continue
        if not stat.S_ISREG(mode):  # reading a FIFO would wait for a writer forever
            rejects[uri] = not_a_file_reason(mode)
            continue
        try:
            photo = decode_image(
                read_bytes(str(path), decode.max_bytes), size=decode.size, min_side=decode.min_side,
                max_pixels=decode.max_pixels, max_aspect=decode.max_aspect,
            )  # fmt: skip
        except Reject as reject:
            rejects[uri] = f"decode: {reject.reason}"
            continue
        pixels = centre_square(photo, decode.size)
        digest = hashlib.sha256(pixels.tobytes()).hexdigest()
        if digest in seen:
            rejects[uri] = f"duplicate of {seen[digest]}"
            continue
        seen[digest] = uri
        kept.append(_Kept(uri, pixels, digest))
    salient: dict[str, str] = {}
    for start in range(0, len(kept), _BATCH):
        chunk = kept[start : start + _BATCH]
        maps = {prompt: scorer([k.pixels for k in chunk], prompt) for prompt in prompts}
        for j, k in enumerate(chunk):
            reason = salient_prompt({p: m[j] for p, m in maps.items()}, bg.reject_threshold, bg.reject_area)
            if reason is not None:
                salient[k.uri] = reason
    rejects.update(salient)
    return [k for k in kept if k.uri not in salient], dict(sorted(rejects.items()))


def _write_pool(
    staging: Path,
    version: str,
    root: Path,
    inputs: list[Path],
    accepted: list[_Kept],
    rejects: dict[str, str],
    config: Config,
    prompts: list[str],
) -> dict[str, Any]:
    """The kept photos as images/<id>.<ext> (id: the first 16 hex digits of the pixels' hash, so
    a photo keeps its id in every version) and the manifest."""
    write = config.data.write
    ext = "jpg" if write.image_format == "jpeg" else "png"
    (staging / IMAGES).mkdir()
    images = []
    for k in sorted(accepted, key=lambda k: k.sha256):
        name = f"{IMAGES}/{k.sha256[:16]}.{ext}"
        (staging / name).write_bytes(_encode(k.pixels, write.image_format, write.jpeg_quality))
        images.append({"id": k.sha256[:16], "file": name, "source_uri": k.uri})
    if len(images) + len(rejects) != len(inputs):
        raise RuntimeError(f"accounting error: {len(inputs)} inputs, {len(images)} kept + {len(rejects)} rejected")
    checksums = record_checksums(staging)
    bg = config.data.backgrounds
    manifest = {
        "kind": POOL_KIND,
        "version": version,
        "created_at": utc_now(),
        "source": root.resolve().as_uri(),
        "size": config.data.decode.size,
        "inputs": len(inputs),
        "accepted": len(images),
        "rejected": len(rejects),
        "reject_prompts": prompts,
        "reject_threshold": bg.reject_threshold,
        "reject_area": bg.reject_area,
        "models": {"clipseg": config.model_path("clipseg")},
        "digest": pool_digest(checksums),
        "images": images,
        "rejects": [{"source_uri": uri, "reason": reason} for uri, reason in rejects.items()],
        "checksums": checksums,
    }
    write_json_atomic(staging / MANIFEST, manifest)
    return manifest


def pool_digest(checksums: dict[str, str]) -> str:
    """The pool's identity: sha256 over its files' names and sha256s (every image, so adding,
    removing or changing one changes it)."""
    h = hashlib.sha256()
    for name, digest in sorted(checksums.items()):
        h.update(f"{name}\0{digest}\n".encode())
    return h.hexdigest()


def _encode(pixels: np.ndarray, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(pixels).save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    else:
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()
