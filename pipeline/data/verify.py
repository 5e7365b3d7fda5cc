"""Check a dataset version against its manifest: every file present, readable and unchanged.

The manifest's `checksums` maps each file of the version (all but manifest.json) to its sha256.
A checksum per file rather than a column of per-row checksums: the file's hash covers every byte
of it (image values, Parquet pages, metadata and footer), so one check catches flipped bytes,
truncation and a swapped file alike; the published schema and every reader of it stay as they
are; and a file is hashed in one sequential read. The price is granularity: a damaged file
condemns all its rows (at most `data.write.rows_per_file`), which are named by their photos and
can be reprocessed from them.

A refresh checks its parent with `check_version` before any work, and `data verify` checks a
version on demand. Versions written before checksums existed get the structural checks only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.versions import INPUTS_FILE, LATEST, MANIFEST, REJECTS_FILE, DatasetStore, read_manifest_file
from pipeline.errors import UserError

CHECKSUMS = "checksums"  # manifest key: {path relative to the version: sha256}
CONFIG_FILE = "config.yaml"
_REQUIRED_KEYS = ("version", "status", "inputs", "rows", "rejected", "source_digest", "processing_digest", "files")
_HASH_CHUNK = 1 << 22
_SHOW_URIS = 20


class DamagedVersion(UserError, ValueError):
    """A version's files do not match its manifest."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _hash_all(paths: Iterable[Path]) -> list[str]:
    # hashlib releases the GIL on large buffers, so a few threads hash files in parallel.
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(sha256_of, paths))


def record_checksums(version_dir: Path) -> dict[str, str]:
    """{relative POSIX path: sha256} of every file in `version_dir` except manifest.json."""
    paths = sorted(p for p in version_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    return dict(zip((p.relative_to(version_dir).as_posix() for p in paths), _hash_all(paths), strict=True))


@dataclass
class VersionCheck:
    """What `check_version` found. `problems` maps a file (relative to the version) to what is
    wrong with it; `damaged_uris` are the photos whose data rows sit in a damaged file."""

    version_dir: Path
    manifest: dict[str, Any] | None = None
    ledger: dict[str, dict[str, Any]] | None = None
    problems: dict[str, str] = field(default_factory=dict)
    damaged_data: set[str] = field(default_factory=set)  # data files, relative to the version
    damaged_uris: set[str] = field(default_factory=set)
    rejects_damaged: bool = False
    has_checksums: bool = False
    files_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def repairable(self) -> bool:
        """Damage confined to what a refresh makes anew: data rows and reject records (their
        photos can be processed again) and config.yaml (each version writes its own)."""
        rebuilt = self.damaged_data | {REJECTS_FILE, CONFIG_FILE}
        return self.manifest is not None and self.ledger is not None and set(self.problems) <= rebuilt

    def describe(self) -> str:
        lines = [f"dataset version {self.version_dir} is damaged:"]
        lines += [f"  {path}: {problem}" for path, problem in sorted(self.problems.items())]
        if self.damaged_uris:
            uris = sorted(self.damaged_uris)
            more = f" and {len(uris) - _SHOW_URIS} more" if len(uris) > _SHOW_URIS else ""
            lines.append(f"  rows of {len(uris)} photo(s) are damaged: {', '.join(uris[:_SHOW_URIS])}{more}")
        if self.rejects_damaged:
            lines.append("  its reject records cannot be trusted")
        hint = "run `subjectforge data build` to build a new version from the photos"
        if self.repairable:
            hint += ", or `subjectforge data refresh --reprocess-damaged` to process the damaged rows' photos again"
        return "\n".join(lines) + "\n" + hint[0].upper() + hint[1:]


def is_dataset_folder(path: Path) -> bool:
    """Whether `path` is a dataset root or version, whole or damaged: it holds a manifest, a
    ledger, reject records, version folders or a `latest` link. A version that lost its manifest
    is damaged; a folder with none of these (`data verify /`) was never a dataset."""
    traces = (path / name for name in (MANIFEST, INPUTS_FILE, REJECTS_FILE, LATEST))
    return any(p.exists() or p.is_symlink() for p in traces) or bool(DatasetStore(path).versions())


def check_version(version_dir: str | Path) -> VersionCheck:
    """Read `version_dir`'s manifest and check each file it names: present, sha256 as recorded
    (when the manifest has checksums), a readable Parquet file with the rows the manifest says,
    and no data file the manifest does not list."""
    check = VersionCheck(Path(version_dir))
    manifest = _read_manifest(check)
    if manifest is None:
        return check
    check.manifest = manifest
    checksums = manifest.get(CHECKSUMS) or {}
    check.has_checksums = bool(checksums)
    expected = {f["path"]: f["rows"] for f in manifest["files"]}
    expected[INPUTS_FILE] = manifest["inputs"]
    expected[REJECTS_FILE] = manifest["rejected"]
    present = {p.relative_to(check.version_dir).as_posix() for p in (check.version_dir / "data").glob("*.parquet")}
    for extra in sorted(present - set(expected)):
        check.problems[extra] = "a data file the manifest does not list"
    listed = [path for path in sorted(expected) if (check.version_dir / path).is_file()]
    for path in sorted(set(expected) - set(listed)):
        check.problems[path] = "missing"
    hashed = [path for path in listed if path in checksums]
    for path, digest in zip(hashed, _hash_all(check.version_dir / p for p in hashed), strict=True):
        if digest != checksums[path]:
            check.problems[path] = f"sha256 {digest[:16]}... differs from the manifest's {checksums[path][:16]}..."
    for path in listed:
        if path not in check.problems:
            _check_parquet(check, path, expected[path])
    for path, digest in checksums.items():  # config.yaml and anything else recorded
        if path not in expected and not (check.version_dir / path).is_file():
            check.problems[path] = "missing"
        elif path not in expected and sha256_of(check.version_dir / path) != digest:
            check.problems[path] = "sha256 differs from the manifest's"
    check.files_checked = len(set(expected) | set(checksums))
    check.damaged_data = {path for path in check.problems if path.startswith("data/")}
    check.rejects_damaged = REJECTS_FILE in check.problems
    if INPUTS_FILE not in check.problems:
        table = pq.read_table(check.version_dir / INPUTS_FILE)
        check.ledger = {row["source_uri"]: row for row in table.to_pylist()}
        check.damaged_uris = _damaged_uris(check, set(expected) - {INPUTS_FILE, REJECTS_FILE})
    return check


def _read_manifest(check: VersionCheck) -> dict[str, Any] | None:
    path = check.version_dir / MANIFEST
    try:
        manifest = read_manifest_file(path)
    except FileNotFoundError:
        check.problems[MANIFEST] = "missing"
        return None
    except (OSError, ValueError) as exc:
        check.problems[MANIFEST] = f"not readable JSON (truncated?): {exc}"
        return None
    missing = [key for key in _REQUIRED_KEYS if not isinstance(manifest, dict) or key not in manifest]
    if missing:
        check.problems[MANIFEST] = f"lacks {', '.join(missing)}"
        return None
    shape = manifest_shape_problem(manifest)
    if shape:
        check.problems[MANIFEST] = shape
        return None
    return manifest


def manifest_shape_problem(manifest: dict[str, Any]) -> str | None:
    """What makes a manifest's lists of files unusable, in JSON that reads (a hand edit, or damage
    the checksums cannot show: they do not cover the manifest): `files` a list of {path, rows},
    `checksums` a map of path to sha256, each path inside the version. A wrong shape was a
    TypeError or KeyError stack trace, and a path such as ../../etc/passwd was read."""
    files = manifest["files"]
    if not isinstance(files, list) or not all(
        isinstance(f, dict) and _inside(f.get("path")) and type(f.get("rows")) is int for f in files
    ):
        return "files is not a list of {path, rows} inside the version"
    checksums = manifest.get(CHECKSUMS) or {}
    if not isinstance(checksums, dict) or not all(_inside(p) and isinstance(d, str) for p, d in checksums.items()):
        return "checksums is not a map of paths inside the version to sha256 digests"
    return None


def _inside(path: object) -> bool:
    """Whether `path` names a file of the version: relative, no '..', no NUL."""
    if not isinstance(path, str) or not path.strip() or "\0" in path:
        return False
    parts = PurePosixPath(path)
    return not parts.is_absolute() and ".." not in parts.parts


def _check_parquet(check: VersionCheck, path: str, rows: int) -> None:
    try:
        found = pq.ParquetFile(check.version_dir / path).metadata.num_rows
    except (OSError, pa.ArrowException) as exc:
        check.problems[path] = f"not a readable Parquet file (truncated?): {exc}"
        return
    if found != rows:
        check.problems[path] = f"{found} rows, the manifest says {rows}"


def _damaged_uris(check: VersionCheck, data_files: set[str]) -> set[str]:
    """Photos with rows in a damaged data file: those read from it where it still reads, and
    accepted photos with no rows in any intact file (where it does not)."""
    if not check.damaged_data:
        return set()
    found: set[str] = set()
    for path in sorted(data_files - check.damaged_data):
        found.update(pq.read_table(check.version_dir / path, columns=["source_uri"])["source_uri"].to_pylist())
    accepted = {uri for uri, row in check.ledger.items() if row["status"] == "accepted"}
    damaged = accepted - found
    for path in sorted(check.damaged_data):
        try:
            damaged.update(pq.read_table(check.version_dir / path, columns=["source_uri"])["source_uri"].to_pylist())
        except (OSError, pa.ArrowException):
            pass  # unreadable: its photos are the accepted ones found nowhere else
    return damaged & accepted
