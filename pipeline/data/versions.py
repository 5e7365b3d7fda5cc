"""Versioned dataset folders: OUT/<version>/, OUT/latest, staging, locking, atomic publish.

A version is built in OUT/.staging/ and renamed into place only when complete (same
filesystem, so the rename is atomic), then `latest` is switched by replacing a symlink. A build
killed at any point leaves a staging folder, or a version newer than `latest`, its
`.publishing-<version>` record and a `.latest-*` link when killed between the rename and the
switch; the next build removes them (`recover`).
One build at a time holds OUT/.lock (an advisory flock), so concurrent refreshes queue instead
of racing. A build that fails its own check goes to OUT/failed/, outside the version sequence,
where only the newest few are kept.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

log = logging.getLogger(__name__)

LATEST = "latest"
MANIFEST = "manifest.json"
INPUTS_FILE = "inputs.parquet"  # the ledger: one row per input, accepted or rejected
REJECTS_FILE = "rejects.parquet"
FAILED = "failed"
_PUBLISHING = ".publishing-"  # + version: exists from just before its rename until `latest` names it
_VERSION_RE = re.compile(r"^v(\d{4,})$")


class StoreError(UserError, ValueError):
    """OUT cannot hold datasets (e.g. it is read-only)."""


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
        copy that followed links): publishing could not replace it, after a whole build."""
        link = self.root / LATEST
        if not link.is_symlink():
            if link.exists():
                kind = "folder" if link.is_dir() else "file"
                raise StoreError(
                    f"{link} is a {kind}, not a link to a version (a copy that followed links?): "
                    f"replace it with one, e.g. ln -sfn {self.versions()[-1] if self.versions() else 'vNNNN'} {link}"
                )
            return None
        return os.readlink(link)

    def path(self, version: str) -> Path:
        return self.root / version

    def read_manifest(self, version: str) -> dict[str, Any]:
        return json.loads((self.path(version) / MANIFEST).read_text())

    # -- writing -------------------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold OUT/.lock for the duration; waits (and says so) if another build holds it.
        StoreError when OUT cannot be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fh = open(self.root / ".lock", "a+")  # closed by the with below
        except OSError as exc:
            raise StoreError(f"cannot write to the dataset folder {self.root}: {exc.strerror}") from None
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("another build holds %s; waiting for it to finish", self.root / ".lock")
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def next_version(self) -> str:
        existing = self.versions()
        number = int(existing[-1][1:]) + 1 if existing else 1
        return f"v{number:04d}"

    def new_staging(self, version: str) -> Path:
        """A fresh staging folder; call under lock(). Removes staging left by killed builds."""
        staging_root = self.root / ".staging"
        if staging_root.is_dir():
            for stale in staging_root.iterdir():
                log.warning("removing %s left by an interrupted build", stale)
                shutil.rmtree(stale, ignore_errors=True)
        path = staging_root / f"{version}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
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
                shutil.rmtree(self.path(version))
            record.unlink()
        _fsync_dir(self.root)

    def publish(self, staging: Path, version: str) -> Path:
        """Move a complete staging folder to OUT/<version> and point `latest` at it."""
        final = self.path(version)
        if final.exists():
            raise FileExistsError(f"{final} already exists; refusing to overwrite a published version")
        record = self.root / f"{_PUBLISHING}{version}"
        record.touch()
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
        failed = self.root / FAILED
        failed.mkdir(exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        final = failed / f"{version}-{stamp}"
        os.rename(staging, final)
        # Oldest first by time: the version part can repeat (it is the next version's number).
        kept = sorted(failed.iterdir(), key=lambda p: p.name.partition("-")[2])
        for old in kept[: max(len(kept) - keep, 0)]:
            log.info("removing %s (data.keep_failed=%d)", old, keep)
            shutil.rmtree(old)
        _fsync_dir(self.root)
        return final if final.exists() else None


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
