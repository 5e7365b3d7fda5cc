"""Scan a source folder of subject photos: which files are inputs, their subject and hash.

Layout: SRC/subjects.csv (columns subject_id,category) and one folder per subject holding its
photos (nested folders are walked). Every non-hidden file in a subject folder is an input; one
in a folder that subjects.csv does not list is rejected here with stage `scan`. Problems with
subjects.csv itself are SourceErrors (the job cannot start); subjects listed without a folder
are warnings.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import check_name

log = logging.getLogger(__name__)

SUBJECTS_CSV = "subjects.csv"
_HASH_CHUNK = 1 << 20
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic"}


class SourceError(ValueError):
    """The source folder cannot be read as a dataset source."""


@dataclass(frozen=True)
class SourcePhoto:
    subject_id: str
    category: str
    source_uri: str  # relative to the source root, POSIX separators
    source_path: str  # absolute
    sha256: str


@dataclass
class SourceScan:
    root: Path
    photos: list[SourcePhoto] = field(default_factory=list)
    # Inputs rejected before decoding: (photo, reason).
    rejects: list[tuple[SourcePhoto, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def inputs(self) -> list[SourcePhoto]:
        return self.photos + [photo for photo, _ in self.rejects]

    def digest(self) -> str:
        """sha256 over every input's (uri, content hash, category): equal iff nothing changed."""
        h = hashlib.sha256()
        for photo in sorted(self.inputs, key=lambda p: p.source_uri):
            h.update(f"{photo.source_uri}\t{photo.sha256}\t{photo.category}\n".encode())
        return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_subjects_csv(path: Path) -> dict[str, str]:
    """subjects.csv -> {subject_id: category}; SourceError naming the line for any problem."""
    if not path.is_file():
        raise SourceError(f"{path} not found: the source needs a subjects.csv with columns subject_id,category")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = {"subject_id", "category"} - set(reader.fieldnames or [])
        if missing:
            raise SourceError(f"{path}: missing column(s) {', '.join(sorted(missing))} (header: {reader.fieldnames})")
        subjects: dict[str, str] = {}
        for line_no, row in enumerate(reader, start=2):
            subject_id = (row["subject_id"] or "").strip()
            category = (row["category"] or "").strip()
            if not subject_id or not category:
                raise SourceError(f"{path} line {line_no}: subject_id and category must both be non-empty")
            try:
                check_name(subject_id)
            except ValueError as exc:
                raise SourceError(f"{path} line {line_no}: subject_id {exc}") from None
            if subject_id in subjects:
                raise SourceError(f"{path} line {line_no}: duplicate subject_id {subject_id!r}")
            subjects[subject_id] = category
    if not subjects:
        raise SourceError(f"{path} lists no subjects")
    return subjects


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def scan_source(root: str | Path) -> SourceScan:
    """Walk `root` and hash every input photo. Raises SourceError if `root` is not a source."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise SourceError(f"source folder not found: {root}")
    subjects = read_subjects_csv(root / SUBJECTS_CSV)
    scan = SourceScan(root=root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for name in sorted(set(subjects) - {p.name for p in folders}):
        scan.warnings.append(f"subjects.csv lists {name!r} but the source has no folder {name}/")
    # Documents beside subjects.csv (README, licence) are normal; a photo there is a mistake.
    for stray in sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES):
        scan.warnings.append(f"photo {stray!r} at the source root is not in a subject folder; ignored")
    hidden = 0
    for folder in folders:
        category = subjects.get(folder.name, "")
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            if _is_hidden(path, root):
                hidden += 1
                continue
            photo = SourcePhoto(
                subject_id=folder.name,
                category=category,
                source_uri=path.relative_to(root).as_posix(),
                source_path=str(path),
                sha256=sha256_file(path),
            )
            if folder.name in subjects:
                scan.photos.append(photo)
            else:
                scan.rejects.append((photo, f"subject folder {folder.name!r} is not listed in subjects.csv"))
    counts = {p.subject_id for p in scan.photos}
    for folder in folders:
        if folder.name in subjects and folder.name not in counts:
            scan.warnings.append(f"subject {folder.name!r} has no photos in {folder.name}/")
    if hidden:
        scan.warnings.append(f"{hidden} hidden file(s) (names starting with '.') ignored")
    for warning in scan.warnings:
        log.warning("source: %s", warning)
    return scan
