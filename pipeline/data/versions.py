"""Versioned dataset folders: OUT/<version>/, OUT/latest, staging, locking, atomic publish.

A version is built in OUT/.staging/ and renamed into place only when complete (same
filesystem, so the rename is atomic), then `latest` is switched by replacing a symlink. A build
killed at any point leaves a staging folder, or a version newer than `latest`, its
`.publishing-<version>` record and a `.latest-*` link when killed between the rename and the
switch; the next build removes them (`recover`).
One build at a time holds OUT/.lock (an advisory flock), so concurrent refreshes queue instead
of racing. A build that fails its own check goes to OUT/failed/, outside the version sequence,
where only the newest few are kept.

Nothing is written or deleted outside OUT: a link planted at one of the store's own names
(.staging, .lock, failed) is removed and the real folder or file made in its place; anything
else there that the store cannot use is a StoreError naming it; a new version is numbered past
every name of a version's form, whatever is there.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import stat
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.paths import hold_lock, remove_link, remove_tree

log = logging.getLogger(__name__)

LATEST = "latest"
MANIFEST = "manifest.json"
INPUTS_FILE = "inputs.parquet"  # the ledger: one row per input, accepted or rejected
REJECTS_FILE = "rejects.parquet"
FAILED = "failed"
STAGING = ".staging"
LOCK = ".lock"
_PUBLISHING = ".publishing-"  # + version: exists from just before its rename until `latest` names it
_VERSION_RE = re.compile(r"^v(\d{4,})$")


class StoreError(UserError, ValueError):
    """OUT cannot hold datasets (e.g. it is read-only)."""


def read_manifest_file(path: Path) -> Any:
    """The JSON of a manifest; ValueError for one that is not a regular file (reading a FIFO
    waited for a writer forever) or nests past Python's recursion (a RecursionError's stack
    trace), OSError for one that cannot be read (FileNotFoundError: none there)."""
    if path.exists() and not path.is_file():
        raise ValueError(f"{path.name} is not a regular file")
    try:
        return json.loads(path.read_text())
    except RecursionError:
        raise ValueError(f"{path.name} nests too deeply to be a manifest") from None


class DatasetStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- reading -------------------------------------------------------------------------------

    def versions(self) -> list[str]:
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if p.is_dir() and _VERSION_RE.match(p.name)]
        return sorted(found, key=lambda name: int(name[1:]))

    def latest_version(self) -> str | None:
        """What `latest` links to, or None without one. StoreError when it is a folder or file (a
        copy that followed links): publishing could not replace it, after a whole build; and when
        it links to anything but a version's name beside it (a path elsewhere, '..'): its folder
        would be read as this dataset's, the parent of a refresh."""
        link = self.root / LATEST
        if not link.is_symlink():
            if link.exists():
                kind = "folder" if link.is_dir() else "file"
                raise StoreError(f"{link} is a {kind}, not a link to a version (a copy that followed links?): replace it with one, e.g. {self._relink()}")
            return None
        target = os.readlink(link)
        if not _VERSION_RE.match(target):
            raise StoreError(f"{link} -> {target} is not a version of this dataset (a vNNNN folder beside it): point it at one, e.g. {self._relink()}")
        return target

    def _relink(self) -> str:
        """The command that points `latest` at the newest version, for an error's advice."""
        versions = self.versions()
        return f"ln -sfn {versions[-1] if versions else 'vNNNN'} {self.root / LATEST}"

    def path(self, version: str) -> Path:
        return self.root / version

    def read_manifest(self, version: str) -> dict[str, Any]:
        return read_manifest_file(self.path(version) / MANIFEST)

    # -- writing -------------------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold OUT/.lock for the duration; waits (and says so) if another build holds it.
        StoreError when OUT cannot be written.

        On the way out, whether the build succeeded or failed, an empty OUT/.staging is removed,
        and so is the lock file when this build made it (one an older release left stays). A
        waiter that then wins the lock of the deleted file sees that the name is no longer its
        file and tries again on the new one (pipeline.paths.hold_lock).
        """
        fd, made = self._hold_lock()
        try:
            yield
        finally:
            _remove_empty_folder(self.root / STAGING)
            if made:
                (self.root / LOCK).unlink(missing_ok=True)  # still held: no one else has it
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _hold_lock(self) -> tuple[int, bool]:
        """A descriptor of OUT/.lock, flocked, and whether this build made the file
        (`pipeline.paths.hold_lock`: a planted link there is removed, not followed)."""
        try:
            return hold_lock(self.root / LOCK, "the build locks OUT with it", StoreError)
        except OSError as exc:
            raise StoreError(f"cannot write to the dataset folder {self.root}: {exc.strerror}") from None

    def next_version(self) -> str:
        """The number after every name of a version's form in OUT, whatever it is: a link or
        file there (a planted v0002 -> elsewhere) is not a version, but the new one must not be
        renamed onto it."""
        names = [p.name for p in self.root.iterdir()] if self.root.is_dir() else []
        numbers = [int(match[1]) for name in names if (match := _VERSION_RE.match(name))]
        return f"v{max(numbers, default=0) + 1:04d}"

    def new_staging(self, version: str) -> Path:
        """A fresh staging folder; call under lock(). Removes staging left by killed builds."""
        staging_root = self._own_folder(STAGING)
        for stale in staging_root.iterdir():
            log.warning("removing %s left by an interrupted build", stale)
            try:
                remove_tree(stale, staging_root)  # a link there is removed, not followed
            except OSError as exc:
                log.warning("could not remove %s: %s", stale, exc.strerror or exc)
        path = staging_root / f"{version}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        return path

    def _own_folder(self, name: str) -> Path:
        """OUT/<name>, one of the store's own folders, made when missing. A link there is removed
        first, so nothing is written where it leads (a planted .staging -> elsewhere had each
        version built there, and the sweep of stale staging deleted what was there); StoreError
        for anything else that is not a folder."""
        path = self.root / name
        if path.is_symlink():
            remove_link(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # what is there is named below
        if not (os.path.lexists(path) and stat.S_ISDIR(os.lstat(path).st_mode)):
            raise StoreError(f"{path} is not a folder: remove it; the build keeps its work there")
        return path

    def recover(self) -> None:
        """Undo what a build killed while publishing left; call under lock(), before next_version().

        A version whose `.publishing-<version>` record is there and which `latest` does not name
        was renamed into place by a build killed before it switched `latest`. That job never
        finished, so its lineage was never recorded (pipeline.data.build.run_data_job): the version
        is removed rather than adopted, and the next build makes it again. Only that record marks
        a version as a killed build's: a version newer than `latest` without one is the user's
        (`latest` moved back by hand, a copy that dropped links) and stays.
        """
        latest = self.latest_version()  # a StoreError before any work for one publish could not replace
        for tmp in self.root.glob(".latest-*"):
            log.warning("removing %s left by an interrupted build", tmp)
            tmp.unlink(missing_ok=True)
        for record in self.root.glob(f"{_PUBLISHING}*"):
            version = record.name.removeprefix(_PUBLISHING)
            if _VERSION_RE.match(version) and self.path(version).is_dir() and latest != version:
                log.warning("removing %s: its build was killed before it became `latest`", self.path(version))
                remove_tree(self.path(version), self.root)
            record.unlink()
        _fsync_dir(self.root)

    def publish(self, staging: Path, version: str) -> Path:
        """Move a complete staging folder to OUT/<version> and point `latest` at it."""
        final = self.path(version)
        if os.path.lexists(final):
            raise FileExistsError(f"{final} already exists; refusing to overwrite a published version")
        record = self.root / f"{_PUBLISHING}{version}"
        record.unlink(missing_ok=True)  # a link there would be followed and its target made
        os.close(os.open(record, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
        _fsync_dir(self.root)  # on disk before the version is: `recover` must find it after a crash
        os.rename(staging, final)
        tmp = self.root / f".latest-{uuid.uuid4().hex[:8]}"
        os.symlink(version, tmp)
        os.replace(tmp, self.root / LATEST)
        record.unlink()
        _fsync_dir(self.root)
        return final

    def publish_failed(self, staging: Path, version: str, keep: int) -> Path | None:
        """Move a build that failed its check to OUT/failed/<version>-<UTC time>, outside the
        version sequence, and delete all but the newest `keep` there (with keep 0 this one too,
        and None is returned). Each nightly failure would otherwise keep a full copy."""
        failed = self._own_folder(FAILED)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        final = failed / f"{version}-{stamp}"
        os.rename(staging, final)
        # Oldest first by time: the version part can repeat (it is the next version's number).
        kept = sorted(failed.iterdir(), key=lambda p: p.name.partition("-")[2])
        for old in kept[: max(len(kept) - keep, 0)]:
            log.info("removing %s (data.keep_failed=%d)", old, keep)
            remove_tree(old, failed)
        _fsync_dir(self.root)
        return final if final.exists() else None


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _remove_empty_folder(path: Path) -> None:
    """Remove `path` if it is an empty folder (not a link); nothing otherwise."""
    if os.path.lexists(path) and stat.S_ISDIR(os.lstat(path).st_mode):
        try:
            path.rmdir()
        except OSError:
            pass  # not empty: leftovers the next build's new_staging sweeps


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
