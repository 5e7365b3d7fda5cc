"""Versioned dataset folders: OUT/<version>/, OUT/latest, staging, locking, atomic publish.

A version is built in OUT/.staging/ and renamed into place only when complete (same
filesystem, so the rename is atomic), then `latest` is switched by replacing a symlink. A build
killed at any point leaves only a staging folder, which the next build removes. One build at a
time holds OUT/.lock (an advisory flock), so concurrent refreshes queue instead of racing.
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
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LATEST = "latest"
MANIFEST = "manifest.json"
_VERSION_RE = re.compile(r"^v(\d{4,})$")


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
        link = self.root / LATEST
        if not link.is_symlink():
            return None
        return os.readlink(link)

    def path(self, version: str) -> Path:
        return self.root / version

    def read_manifest(self, version: str) -> dict[str, Any]:
        return json.loads((self.path(version) / MANIFEST).read_text())

    # -- writing -------------------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold OUT/.lock for the duration; waits (and says so) if another build holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as fh:
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

    def publish(self, staging: Path, version: str, make_latest: bool = True) -> Path:
        """Move a complete staging folder to OUT/<version>; point `latest` at it if asked."""
        final = self.path(version)
        if final.exists():
            raise FileExistsError(f"{final} already exists; refusing to overwrite a published version")
        os.rename(staging, final)
        if make_latest:
            tmp = self.root / f".latest-{uuid.uuid4().hex[:8]}"
            os.symlink(version, tmp)
            os.replace(tmp, self.root / LATEST)
        _fsync_dir(self.root)
        return final


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
