"""Output folders: checking and making a command's --out, and deleting and replacing folders
under an output root, and nowhere else.

Every `rmtree` of an artifact or checkpoint goes through `remove_tree`, which refuses a path
that does not resolve strictly inside the root it belongs to (a '..' or an absolute name, or a
link that leads out). `replace_tree` publishes a finished folder so that a crash leaves either
the old complete folder or the new one in place, never a half-copied one or none.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import UserError

log = logging.getLogger(__name__)

_PARTIAL = ".partial"  # suffix of a copy being written beside its final name
_OLD = ".old"  # suffix of the previous folder between the two renames of a replacement


def folder_flag(text: str) -> str:
    """An argparse type for a folder flag (--out, --source): an empty one, from an unset shell
    variable, would otherwise mean the current folder, and write or read there."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (an unset variable?); give . for the current folder")
    return text


def check_output_folder(path: str | Path, flag: str = "--out") -> None:
    """UserError naming `flag` unless `path` is a folder or could be made one (its nearest
    existing part is a folder we may write in). Nothing is left behind, so a command checks its
    output before loading a model and leaves nothing when a later input is refused."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is not a folder")
    _prove_writable(existing, f"{flag} {path}")


def _prove_writable(folder: Path, what: str) -> None:
    """UserError naming `what` unless a folder can be made in `folder`: made and removed at once,
    since os.access says yes to root in /sys or /proc, where generate then failed to make its
    --out only after denoising."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".subjectforge-check-", dir=folder))
    except OSError as exc:
        raise UserError(f"{what}: cannot write in {folder}: {exc.strerror or exc}") from None


def make_output_folder(path: str | Path, flag: str = "--out") -> Path:
    """`path`, made a folder (with its parents); UserError naming `flag` when it cannot be."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot make the folder: {exc.strerror or exc}") from None
    return path


def output_file(path: str | Path) -> Path:
    """`path`, ready for a command to write its file into its --out: a link there is removed
    first, so the file lands in the folder rather than where the link leads (a planted
    image_000.png -> ~/.bashrc was overwritten); UserError for anything else there that is not a
    regular file (writing to a FIFO blocks until something reads it; a folder cannot be written)."""
    path = Path(path)
    if path.is_symlink():
        path.unlink()
    elif path.exists() and not path.is_file():
        raise UserError(f"{path} is not a regular file: remove it or choose another --out")
    return path


class OutsideRootError(ValueError):
    """A path to delete or replace does not resolve inside its configured root."""


def inside(path: str | Path, root: str | Path) -> Path:
    """Where `path` is, after checking it lies strictly inside `root`. Its folders are resolved
    (links count where they lead) but not its last part, so a link is itself what is deleted or
    replaced. Raises OutsideRootError naming both."""
    path = Path(path)
    location, base = path.parent.resolve() / path.name, Path(root).resolve()
    if path.name in ("", ".", "..") or location == base or not location.is_relative_to(base):
        raise OutsideRootError(f"refusing to delete or replace {path}: it is not inside {base}")
    return location


def remove_tree(path: str | Path, root: str | Path) -> None:
    """Delete folder `path`, once it is known to lie inside `root`; nothing when it does not exist."""
    location = inside(path, root)
    if location.is_symlink() or location.is_file():
        location.unlink()
    elif location.exists():
        shutil.rmtree(location)


def replace_tree(src: str | Path, dst: str | Path, root: str | Path) -> Path:
    """Copy folder `src` to `dst` (inside `root`), replacing what `dst` held; returns `dst`.

    The copy is written beside `dst` and renamed into place: the old folder moves aside to
    <dst>.old, the new one takes its name, then the old one is deleted. A crash during the copy
    leaves the old folder untouched; one between the two renames leaves it as <dst>.old, which
    the next replacement puts back before it starts. Replacements of one `dst` take turns (a
    flock on .<name>.lock beside it), so two jobs finishing together each publish a whole copy.
    """
    dst = inside(dst, root)
    partial, old = dst.with_name(dst.name + _PARTIAL), dst.with_name(dst.name + _OLD)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with _holding(dst.with_name(f".{dst.name}.lock")):  # another job replacing it at once would take over our partial copy
        if old.is_dir() and not dst.exists():
            log.warning("restoring %s, left aside by an interrupted replacement", dst)
            os.rename(old, dst)
        remove_tree(partial, root)
        remove_tree(old, root)
        shutil.copytree(src, partial)
        if dst.exists():
            os.rename(dst, old)
        os.rename(partial, dst)
        remove_tree(old, root)
    return dst


@contextlib.contextmanager
def _holding(lock: Path) -> Iterator[None]:
    """An exclusive flock on the file `lock` (`hold_lock`), deleted before it is let go, so none
    is left beside the output."""
    fd, _ = hold_lock(lock, "a replacement of the folder beside it locks with it")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # still held: no one else has it
        os.close(fd)


def hold_lock(lock: Path, purpose: str, error: type[UserError] = UserError) -> tuple[int, bool]:
    """A descriptor of the file `lock` with an exclusive flock on it (waits for the holder, and
    says so; the kernel lets go when a holder dies), and whether this call made the file. A
    file opened for writing, not the folder: NFS emulates flock with byte-range locks, which
    need one. A holder deletes the file before letting go; a waiter that then wins the lock of
    the deleted file sees that the name is no longer its file and tries again on the new one.
    `open_lock_file` opens it (no link followed; `purpose` and `error` for what is not a file)."""
    while True:
        fd, made = open_lock_file(lock, purpose, error)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("another job holds %s; waiting for it to finish", lock)
                fcntl.flock(fd, fcntl.LOCK_EX)
            if same_file(fd, lock):
                return fd, made
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder before us deleted it: lock the file now at that name


def open_lock_file(path: Path, purpose: str, error: type[UserError] = UserError) -> tuple[int, bool]:
    """`path` opened read-write, made when missing, without following a link: a planted link
    (to a file elsewhere, which would be opened there, and made there when missing) is removed
    and the file made in its place. Returns (descriptor, whether this call made it). `error`
    naming `purpose` for anything else that is not a regular file; OSError when its folder
    cannot be written."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644), True
        except FileExistsError:
            pass
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # its holder deleted it meanwhile
        except IsADirectoryError:
            raise error(f"{path} is not a regular file: remove it; {purpose}") from None
        except OSError as exc:
            if exc.errno != errno.ELOOP:  # ELOOP: O_NOFOLLOW met a link
                raise
            remove_link(path)
            continue
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd, False
        os.close(fd)
        raise error(f"{path} is not a regular file: remove it; {purpose}")


def remove_link(path: Path) -> None:
    """Remove the link `path`, never what it points at, and say so."""
    log.warning("removing the link %s -> %s: nothing is written outside the output folder", path, os.readlink(path))
    path.unlink()


def same_file(fd: int, path: Path) -> bool:
    """Whether `path` (not followed) is still the file open as `fd`."""
    try:
        named = os.lstat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)
