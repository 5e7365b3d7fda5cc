"""Scan a source folder of subject photos: which files are inputs, their subject and hash.

Layout: SRC/subjects.csv (columns subject_id,category) and one folder per subject holding its
photos (nested folders are walked). Every non-hidden entry in a subject folder is an input; one
in a folder that subjects.csv does not list is rejected here with stage `scan`. So is anything
that is not a photo file the scan may read: a link that leaves the source (unless
`data.source.follow_links`), a dangling link, a link loop, a FIFO, socket or device, and a file
over `data.decode.max_bytes` (checked before hashing, so a huge file costs no read). A reject
that was not read has an empty hash. With `data.duplicates: reject`, so is a photo whose bytes
equal an earlier photo's (see reject_duplicates): a copy would weigh double in training, and one
under two subjects is a labelling error. Problems with subjects.csv itself are SourceErrors (the job
cannot start); subjects listed without a folder are warnings.

SRC/captions.csv (optional; columns photo,caption) gives photos captions of their own: `photo` is
the path under SRC (dog/01.jpg). Such a caption is the photo's training text, in place of the
captioner's (stages/caption.py), and part of the photo's identity: editing it reprocesses the
photo. A row naming no input photo is a warning; a blank caption leaves the photo to the captioner.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import logging
import os
import re
import stat
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from pipeline.config import MAX_CATEGORY_CHARS, DataConfig, check_name, is_utf8
from pipeline.errors import UserError

log = logging.getLogger(__name__)

SUBJECTS_CSV = "subjects.csv"
CAPTIONS_CSV = "captions.csv"
_HASH_CHUNK = 1 << 20
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic"}


class SourceError(UserError, ValueError):
    """The source folder cannot be read as a dataset source."""


@dataclass(frozen=True)
class SourcePhoto:
    subject_id: str
    category: str
    source_uri: str  # relative to the source root, POSIX separators
    source_path: str  # absolute
    sha256: str
    caption: str = ""  # the photo's own caption (captions.csv), white space collapsed; "" = none
    duplicate_of: str = ""  # source_uri of the earlier photo with the same bytes it is rejected for; "" = none


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
        """sha256 over every input's (uri, content hash, category, own caption, the photo it is a
        duplicate of): equal iff nothing changed. A photo without a caption of its own, or not
        rejected as a duplicate, hashes as before those existed."""
        h = hashlib.sha256()
        for photo in sorted(self.inputs, key=lambda p: p.source_uri):
            caption = f"\t{photo.caption}" if photo.caption else ""
            duplicate = f"\tduplicate of {photo.duplicate_of}" if photo.duplicate_of else ""
            h.update(f"{photo.source_uri}\t{photo.sha256}\t{photo.category}{caption}{duplicate}\n".encode())
        return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _csv_rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of a UTF-8 CSV file whose header names exactly `columns`; SourceError
    naming the file (and the line) for a missing or unknown column, a row with more fields than
    the header, an unterminated quote, bytes that are not UTF-8 or another malformed row."""
    try:
        fh = open(path, newline="", encoding="utf-8-sig")
    except OSError as exc:  # no read permission
        raise SourceError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    with fh:
        # strict: a quote left open would otherwise swallow the rest of the file as one field
        reader = csv.DictReader(fh, strict=True)
        row_start = 1  # the line the row being read starts on (a quoted field may span lines)
        try:
            _check_header(path, reader.fieldnames or [], columns)
            row_start = reader.line_num + 1
            for row in reader:
                if None in row:  # DictReader's place for the fields past the header's
                    raise SourceError(f"{path} line {row_start}: {len(columns) + len(row[None])} fields, "
                                      f"but the header has {len(columns)} ({','.join(columns)})")
                yield row_start, row
                row_start = reader.line_num + 1
        except UnicodeDecodeError as exc:
            raise SourceError(f"{path}: not UTF-8 text near line {reader.line_num + 1} ({exc.reason})") from None
        except csv.Error as exc:
            raise SourceError(f"{path} line {row_start}: {_csv_problem(exc)}") from None


def _check_header(path: Path, header: list[str], columns: tuple[str, ...]) -> None:
    """SourceError naming the columns the header lacks, those it has beyond `columns` (no
    extra column is read, so one is most likely a typo or a file meant for something else), or
    one it names twice."""
    missing = set(columns) - set(header)
    if missing:
        raise SourceError(f"{path}: missing column(s) {', '.join(sorted(missing))} (header: {header})")
    unknown = [name for name in header if name not in columns]
    if unknown:
        raise SourceError(f"{path}: unknown column(s) {', '.join(unknown)}; the columns are {','.join(columns)}")
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:  # DictReader would keep the last one's values and drop the first's without a word
        raise SourceError(f"{path}: column(s) {', '.join(twice)} named twice in the header")


def _csv_problem(exc: csv.Error) -> str:
    """A csv.Error in words; in strict mode the end of the file inside quotes is its only
    'unexpected end of data' (no escapechar is set)."""
    if str(exc) == "unexpected end of data":
        return 'unterminated quote: a quoted field in the row that starts here has no closing "'
    return f"malformed row: {exc}"


def read_subjects_csv(path: Path) -> dict[str, str]:
    """subjects.csv -> {subject_id: category}; SourceError naming the line for any problem."""
    if not path.is_file():
        raise SourceError(f"{path} not found: the source needs a subjects.csv with columns subject_id,category")
    subjects: dict[str, str] = {}
    for line_no, row in _csv_rows(path, ("subject_id", "category")):
        subject_id = (row["subject_id"] or "").strip()
        category = (row["category"] or "").strip()
        if not subject_id or not category:
            raise SourceError(f"{path} line {line_no}: subject_id and category must both be non-empty")
        try:
            check_name(subject_id)
        except ValueError as exc:
            raise SourceError(f"{path} line {line_no}: subject_id {exc}") from None
        if len(category) > MAX_CATEGORY_CHARS:  # the limit of a class noun everywhere else (generate, serve, finetune)
            raise SourceError(f"{path} line {line_no}: category of at most {MAX_CATEGORY_CHARS} characters, got {len(category)}")
        if _first_control(category) is not None:  # a quoted line break, a tab or a NUL went into every prompt
            raise SourceError(f"{path} line {line_no}: category {category!r} holds a control character; "
                              "a class noun is one line of text, e.g. dog")
        if subject_id in subjects:
            raise SourceError(f"{path} line {line_no}: duplicate subject_id {subject_id!r}")
        subjects[subject_id] = category
    if not subjects:
        raise SourceError(f"{path} lists no subjects")
    return subjects


def read_captions_csv(path: Path) -> dict[str, str]:
    """captions.csv -> {photo path under the source: caption}, blank captions left out; {} when
    there is no such file; a caption's whitespace runs (line breaks, tabs) become one space.
    SourceError naming the line for a missing column, an empty or repeated photo path, a caption
    holding another control character, and naming the file when it is not a regular file or
    cannot be read."""
    if not path.is_file():
        if os.path.lexists(path):  # a folder, FIFO or dangling link: its captions would be lost without a word
            raise SourceError(f"{path} is not a regular file: make it a CSV file (photo,caption) or remove it")
        return {}
    captions: dict[str, str] = {}
    seen: set[str] = set()
    for line_no, row in _csv_rows(path, ("photo", "caption")):
        photo = Path((row["photo"] or "").strip()).as_posix()
        if photo in ("", "."):
            raise SourceError(f"{path} line {line_no}: photo must name a file under the source (subject/photo.jpg)")
        if photo in seen:
            raise SourceError(f"{path} line {line_no}: duplicate photo {photo!r}")
        seen.add(photo)
        raw = row["caption"] or ""
        control = _first_control(raw, allowed=_LAYOUT_WHITESPACE)
        if control is not None:  # a NUL or an escape sequence went into the photo's training prompt
            raise SourceError(f"{path} line {line_no}: caption holds a control character {raw[control]!r} "
                              f"(character {control + 1}); a caption is text, its line breaks and tabs become spaces")
        caption = _SPACES.sub(" ", raw).strip()
        if caption:
            captions[photo] = caption
    return captions


_SPACES = re.compile(r"\s+")
_LAYOUT_WHITESPACE = "\t\n\v\f\r"  # the control characters a caption may hold: folded into spaces by _SPACES


def _first_control(text: str, allowed: str = "") -> int | None:
    """The index of the first control character (Unicode category Cc: C0, DEL, C1) of `text` not
    in `allowed`; None when it holds none."""
    return next((i for i, char in enumerate(text) if unicodedata.category(char) == "Cc" and char not in allowed), None)


def _is_hidden(name: str) -> bool:
    """Dot files and folders are hidden; a name of dots only (`...`) is an ordinary name."""
    return name.startswith(".") and name.strip(".") != ""


_NOT_FILES = {stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket", stat.S_IFBLK: "block device", stat.S_IFCHR: "character device"}


def printable_name(name: str) -> str:
    """A file name with its non-UTF-8 bytes written as \\xNN, for a reject record."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def not_a_file_reason(mode: int) -> str:
    """The reject reason of an entry whose st_mode is neither a folder nor a regular file."""
    return f"not a regular file ({_NOT_FILES.get(stat.S_IFMT(mode), 'unknown type')})"


@dataclass(frozen=True)
class _Entry:
    """What a path in the source is, links followed: `kind` is dir, file or reject."""

    kind: str
    real: Path  # the path itself, or where its links lead
    size: int = 0
    reason: str = ""
    inode: tuple[int, int] = (0, 0)


def _inspect(path: Path, root: Path, follow_links: bool) -> _Entry:
    """Classify `path` by a stat, which reads no file content."""
    is_link = path.is_symlink()
    try:
        st = os.stat(path)
    except OSError as exc:
        if is_link and exc.errno == errno.ELOOP:
            return _Entry("reject", path, reason="link loop")
        if is_link and exc.errno == errno.ENOENT:
            return _Entry("reject", path, reason="dangling link")
        return _Entry("reject", path, reason=f"cannot read: {exc.strerror}")
    real = Path(os.path.realpath(path)) if is_link else path
    if is_link and not follow_links and not real.is_relative_to(root):
        return _Entry("reject", real, reason="link outside the source")
    if stat.S_ISDIR(st.st_mode):
        return _Entry("dir", real, inode=(st.st_dev, st.st_ino))
    if stat.S_ISREG(st.st_mode):
        return _Entry("file", real, size=st.st_size)
    return _Entry("reject", real, reason=not_a_file_reason(st.st_mode))


class _Walker:
    """Walks subject folders, hashing the files it may read and rejecting what it may not."""

    def __init__(self, scan: SourceScan, subjects: dict[str, str], follow_links: bool, max_bytes: int | None):
        self.scan = scan
        self.subjects = subjects
        self.follow_links = follow_links
        self.max_bytes = max_bytes
        self.hidden = 0

    def add(self, path: Path, entry: _Entry, subject_id: str) -> None:
        """Record one input: a photo, or a reject with its reason."""
        reason, digest = entry.reason, ""
        if entry.kind == "file" and self.max_bytes is not None and entry.size > self.max_bytes:
            reason = f"file too large: {entry.size} bytes > limit {self.max_bytes} (data.decode.max_bytes)"
        elif entry.kind == "file":
            try:
                digest = sha256_file(entry.real)
            except OSError as exc:
                reason = f"cannot read: {exc.strerror}"
        if not reason and subject_id not in self.subjects:
            reason = f"subject folder {subject_id!r} is not listed in subjects.csv"
        uri = path.relative_to(self.scan.root).as_posix()
        if not is_utf8(uri):  # rows and rejects are Parquet strings, which must be UTF-8
            reason, uri, subject_id = "file name is not UTF-8: rename it", printable_name(uri), printable_name(subject_id)
        photo = SourcePhoto(
            subject_id=subject_id,
            category=self.subjects.get(subject_id, ""),
            source_uri=uri,
            source_path=str(entry.real),
            sha256=digest,
        )
        if reason:
            self.scan.rejects.append((photo, reason))
        else:
            self.scan.photos.append(photo)

    def walk(self, folder: Path, subject_id: str, chain: frozenset[tuple[int, int]]) -> None:
        """Every input under `folder` (a subject folder or one inside it), in path order.

        `chain` holds the folders from the source root down to `folder` (device, inode): a link
        back to one of them is a loop.
        """
        try:
            listing = list(folder.iterdir())
        except OSError as exc:  # no read permission: its files are unknown, the folder is the input
            self.add(folder, _Entry("reject", folder, reason=f"cannot read the folder: {exc.strerror or exc}"), subject_id)
            return
        found: list[tuple[Path, _Entry]] = []
        for path in listing:
            if _is_hidden(path.name):
                self.hidden += _count_files(path)
                continue
            entry = _inspect(path, self.scan.root, self.follow_links)
            if entry.kind == "dir" and entry.inode in chain:
                entry = _Entry("reject", entry.real, reason="link loop")
            found.append((path, entry))
        for path, entry in sorted(found, key=lambda item: item[0]):
            if entry.kind == "dir":
                self.walk(path, subject_id, chain | {entry.inode})
            else:
                self.add(path, entry, subject_id)


def _count_files(path: Path) -> int:
    """Files at or under `path`, links not followed."""
    if path.is_symlink() or not path.is_dir():
        return 1
    return sum(1 for p in path.rglob("*") if not p.is_dir() or p.is_symlink())


def _apply_captions(scan: SourceScan, captions: dict[str, str]) -> None:
    """Give each photo its captions.csv caption; warn about rows that name no input photo."""
    scan.photos = [replace(p, caption=captions.get(p.source_uri, "")) for p in scan.photos]
    for photo in sorted(set(captions) - {p.source_uri for p in scan.inputs}):
        scan.warnings.append(f"{CAPTIONS_CSV} names {photo!r}, which is not an input photo; its caption is unused")


def scan_photo_folder(
    folder: str | Path, subject_id: str, category: str, suffixes: tuple[str, ...], *, follow_links: bool = False,
    max_bytes: int | None = None,
) -> SourceScan:
    """The files named `*<suffix>` under `folder`, one subject's photos without a subjects.csv,
    judged as scan_source judges a subject folder: a link leading outside `folder`, a dangling or
    looping link and a FIFO or device are rejects with their reason; hidden files are ignored."""
    root = Path(folder).resolve()
    scan = SourceScan(root=root)
    walker = _Walker(scan, {subject_id: category}, follow_links, max_bytes)
    walker.walk(root, subject_id, frozenset({(root.stat().st_dev, root.stat().st_ino)}))
    scan.photos = [p for p in scan.photos if Path(p.source_uri).suffix.lower() in suffixes]
    scan.rejects = [(p, reason) for p, reason in scan.rejects if Path(p.source_uri).suffix.lower() in suffixes]
    return scan


def duplicate_reason(original_uri: str) -> str:
    """The reject reason of a photo whose bytes equal those of `original_uri`, the kept one."""
    return f"duplicate of {original_uri} (same bytes)"


def reject_duplicates(scan: SourceScan) -> None:
    """Turn each photo whose bytes equal an earlier photo's into a reject naming the earlier one.

    Earlier means first in source_uri order (the path under the source, compared as text:
    cat/00.jpg before dog/00.jpg before dog/01.jpg), across subjects, so which copy is kept
    depends on the paths alone: the same source gives the same verdicts in a build and in a
    refresh, and removing the kept photo makes the next copy the kept one. Only photos take part;
    a scan reject (its hash may be empty) keeps nothing out.
    """
    kept: dict[str, str] = {}  # sha256 -> source_uri of its first photo
    duplicates: dict[str, str] = {}  # source_uri -> the kept photo's
    for photo in sorted(scan.photos, key=lambda p: p.source_uri):
        original = kept.setdefault(photo.sha256, photo.source_uri)
        if original != photo.source_uri:
            duplicates[photo.source_uri] = original
    scan.rejects += [(replace(p, duplicate_of=duplicates[p.source_uri]), duplicate_reason(duplicates[p.source_uri]))
                     for p in scan.photos if p.source_uri in duplicates]
    scan.photos = [p for p in scan.photos if p.source_uri not in duplicates]


def scan_source(
    root: str | Path, *, follow_links: bool = False, max_bytes: int | None = None,
    duplicates: Literal["reject", "keep"] = DataConfig.model_fields["duplicates"].default,
) -> SourceScan:
    """Walk `root` and hash every input photo. Raises SourceError if `root` is not a source.

    follow_links: read links that lead outside `root` (`data.source.follow_links`).
    max_bytes: files larger than this are rejected unread (`data.decode.max_bytes`).
    duplicates: "reject" makes a photo with an earlier photo's bytes a reject (`data.duplicates`,
    see reject_duplicates); "keep" leaves every copy a photo of its own.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise SourceError(f"source folder not found: {root}")
    subjects = read_subjects_csv(root / SUBJECTS_CSV)
    scan = SourceScan(root=root)
    walker = _Walker(scan, subjects, follow_links, max_bytes)
    try:
        listing = sorted(root.iterdir())
    except OSError as exc:  # subjects.csv can be read in a folder that cannot be listed
        raise SourceError(f"{root}: cannot list the source folder: {exc.strerror or exc}") from None
    top = {p: _inspect(p, root, follow_links) for p in listing if not _is_hidden(p.name)}
    # Documents beside subjects.csv (README, licence) are normal; a photo there is a mistake.
    # Anything else at the top is a subject folder, or an input that cannot be one.
    documents = sorted(p.name for p, entry in top.items() if entry.kind == "file")
    folders = {p: entry for p, entry in top.items() if entry.kind != "file"}
    for name in sorted(set(subjects) - {p.name for p in folders}):
        scan.warnings.append(f"subjects.csv lists {name!r} but the source has no folder {name}/")
    for stray in (name for name in documents if Path(name).suffix.lower() in _IMAGE_SUFFIXES):
        scan.warnings.append(f"photo {stray!r} at the source root is not in a subject folder; ignored")
    root_inode = (root.stat().st_dev, root.stat().st_ino)
    for folder, entry in folders.items():
        if entry.kind == "dir" and entry.inode != root_inode:
            walker.walk(folder, folder.name, frozenset({root_inode, entry.inode}))
        else:
            walker.add(folder, entry if entry.kind == "reject" else _Entry("reject", entry.real, reason="link loop"), folder.name)
    _apply_captions(scan, read_captions_csv(root / CAPTIONS_CSV))
    counts = {p.subject_id for p in scan.photos}
    for folder, entry in folders.items():
        if entry.kind == "dir" and folder.name in subjects and folder.name not in counts:
            scan.warnings.append(f"subject {folder.name!r} has no photos in {folder.name}/")
    if duplicates == "reject":  # after the warning above: a folder of copies is not an empty one
        reject_duplicates(scan)
    if walker.hidden:
        scan.warnings.append(f"{walker.hidden} hidden file(s) (names starting with '.') ignored")
    for warning in scan.warnings:
        log.warning("source: %s", warning)
    return scan
