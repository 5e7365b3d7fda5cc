import fcntl
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from pipeline.data import versions
from pipeline.data.versions import DatasetStore, StoreError


def test_version_numbers_and_publish(tmp_path):
    store = DatasetStore(tmp_path)
    assert store.versions() == [] and store.latest_version() is None
    assert store.next_version() == "v0001"
    staging = store.new_staging("v0001")
    (staging / "manifest.json").write_text('{"version": "v0001"}')
    store.publish(staging, "v0001")
    assert store.latest_version() == "v0001" and store.read_manifest("v0001")["version"] == "v0001"
    assert not staging.exists() and store.next_version() == "v0002"
    staging = store.new_staging("v0002")
    store.publish(staging, "v0002")
    assert store.versions() == ["v0001", "v0002"] and store.latest_version() == "v0002"
    with pytest.raises(FileExistsError):
        store.publish(store.new_staging("v0002"), "v0002")


def test_new_staging_removes_leftovers_of_killed_builds(tmp_path):
    store = DatasetStore(tmp_path)
    old = store.new_staging("v0001")
    (old / "data").mkdir()
    (old / "data" / "half.parquet").write_bytes(b"partial")
    fresh = store.new_staging("v0001")
    assert not old.exists() and fresh.exists()
    assert store.versions() == []  # a staging folder is never a version


def _hold_lock(root, seconds, started):
    with DatasetStore(root).lock():
        started.set()
        time.sleep(seconds)


def test_lock_serialises_builds(tmp_path):
    ctx = mp.get_context("fork")
    started = ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(tmp_path), 1.0, started))
    proc.start()
    assert started.wait(10)
    t0 = time.monotonic()
    with DatasetStore(tmp_path).lock():
        waited = time.monotonic() - t0
    proc.join()
    assert waited > 0.5  # blocked until the other holder let go
    assert not os.path.exists(tmp_path / ".lock")  # each holder deletes the lock file it made


def _publish(store, version, manifest=None):
    staging = store.new_staging(version)
    (staging / "manifest.json").write_text(json.dumps(manifest or {"version": version, "status": "ok"}))
    return store.publish(staging, version)


def test_a_kill_between_rename_and_latest_switch_is_cleaned_up(tmp_path, monkeypatch):
    store = DatasetStore(tmp_path)
    _publish(store, "v0001")

    def killed(*args):
        raise KeyboardInterrupt  # stands in for SIGKILL after the version's rename

    monkeypatch.setattr(versions.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        _publish(store, "v0002", {"version": "v0002", "status": "ok", "parent_version": "v0001"})
    monkeypatch.undo()
    assert store.versions() == ["v0001", "v0002"] and store.latest_version() == "v0001"
    assert [p.name for p in tmp_path.glob(".latest-*")]

    store.recover()
    # The orphan's job never finished (no lineage was recorded), so it is removed, not adopted.
    assert store.versions() == ["v0001"] and store.latest_version() == "v0001"
    assert not list(tmp_path.glob(".latest-*")) and store.next_version() == "v0002"


def test_recover_keeps_older_versions_and_versions_that_failed_their_check(tmp_path):
    store = DatasetStore(tmp_path)
    _publish(store, "v0001")
    old_failed = store.path("v0002")
    old_failed.mkdir()  # a failed build of an older release, kept in the sequence
    (old_failed / "manifest.json").write_text(json.dumps({"version": "v0002", "status": "failed"}))
    store.recover()
    assert store.versions() == ["v0001", "v0002"]


def test_a_first_build_killed_before_latest_is_cleaned_up(tmp_path, monkeypatch):
    store = DatasetStore(tmp_path)

    def killed(*args):
        raise KeyboardInterrupt  # killed before `latest` was made

    monkeypatch.setattr(versions.os, "symlink", killed)
    with pytest.raises(KeyboardInterrupt):
        _publish(store, "v0001")
    monkeypatch.undo()
    assert store.versions() == ["v0001"] and store.latest_version() is None
    store.recover()
    assert store.versions() == []


def test_recover_keeps_a_version_latest_was_rolled_back_from(tmp_path):
    # `ln -sfn v0002 latest` to go back from a bad v0003 looks like a build killed before it
    # switched `latest`, but v0003 was published (and trained on): it is not the build's to delete.
    store = DatasetStore(tmp_path)
    for version in ("v0001", "v0002", "v0003"):
        _publish(store, version)
    os.symlink("v0002", tmp_path / "rollback")
    os.replace(tmp_path / "rollback", tmp_path / "latest")
    store.recover()
    assert store.versions() == ["v0001", "v0002", "v0003"] and store.latest_version() == "v0002"
    assert store.next_version() == "v0004"


@pytest.mark.parametrize("latest", [None, "outside", "v0007"], ids=["no-latest", "link-outside", "not-a-version"])
def test_recover_deletes_no_published_version_when_latest_is_not_what_a_build_leaves(tmp_path, latest):
    # A copy that dropped its links, or a `latest` made by hand: the versions are the user's
    # history, not a killed build's, and a build used to delete every one of them.
    store = DatasetStore(tmp_path / "out")
    for version in ("v0001", "v0002", "v0003"):
        _publish(store, version)
    (tmp_path / "out" / "latest").unlink()
    if latest == "outside":
        (tmp_path / "elsewhere").mkdir()
        os.symlink(tmp_path / "elsewhere", tmp_path / "out" / "latest")
    elif latest:
        os.symlink(latest, tmp_path / "out" / "latest")
    if latest == "outside":  # refused before any work: it is not this dataset's version
        with pytest.raises(StoreError, match="not a version of this dataset"):
            store.recover()
    else:
        store.recover()
    assert store.versions() == ["v0001", "v0002", "v0003"]


@pytest.mark.parametrize("target", ["elsewhere", "../elsewhere", "v0001/../../elsewhere"])
def test_a_latest_that_leads_out_of_the_dataset_is_refused_not_read_as_the_parent(tmp_path, target):
    # `latest` -> a folder elsewhere holding a manifest was read as the parent of a refresh, and
    # `root / "/abs/path"` is the absolute path itself: its rows would be carried into OUT.
    store = DatasetStore(tmp_path / "out")
    _publish(store, "v0001")
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(store.path("v0001"), elsewhere)
    (tmp_path / "out" / "latest").unlink()
    os.symlink(elsewhere if target == "elsewhere" else target, tmp_path / "out" / "latest")
    with pytest.raises(StoreError, match="not a version of this dataset.*ln -sfn v0001"):
        store.latest_version()


def test_a_latest_that_is_a_folder_is_refused_before_any_work(tmp_path):
    # A copy made following links (cp -rL, rsync -L) turns `latest` into a folder: publishing
    # cannot replace it, so a build would run, place its version and fail without `latest`.
    store = DatasetStore(tmp_path)
    _publish(store, "v0001")
    (tmp_path / "latest").unlink()
    (tmp_path / "latest").mkdir()
    with pytest.raises(StoreError, match="latest is a folder, not a link"):
        store.latest_version()
    with pytest.raises(StoreError, match="latest is a folder, not a link"):
        with store.lock():
            store.recover()
    assert store.versions() == ["v0001"]


def test_failed_builds_stay_out_of_the_sequence_and_are_bounded(tmp_path):
    store = DatasetStore(tmp_path)
    _publish(store, "v0001")
    kept = []
    for _ in range(3):
        staging = store.new_staging("v0002")
        (staging / "manifest.json").write_text('{"status": "failed"}')
        kept.append(store.publish_failed(staging, "v0002", keep=2))
    assert store.versions() == ["v0001"] and store.next_version() == "v0002" and store.latest_version() == "v0001"
    assert sorted(p.name for p in (tmp_path / "failed").iterdir()) == sorted(p.name for p in kept[1:])
    assert all(p.parent == tmp_path / "failed" and p.name.startswith("v0002-") for p in kept)


def test_an_unwritable_out_is_a_clear_error(tmp_path):
    store = DatasetStore(tmp_path / "out")
    store.root.mkdir()
    with read_only(store.root), pytest.raises(StoreError, match="cannot write to the dataset folder .*out"):
        with store.lock():
            pass


@contextmanager
def read_only(path):
    """`path` read-only, for root too (a read-only bind mount), or skip where neither works."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, 0o755)
        return
    if subprocess.run(["mount", "--bind", "-o", "ro", str(path), str(path)], capture_output=True).returncode:
        pytest.skip("cannot make a read-only folder here")
    subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True)
    if os.access(path, os.W_OK):
        subprocess.run(["umount", str(path)], check=True)
        pytest.skip("cannot make a read-only folder here")
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


# Links planted at the store's own names (OUT/.staging, OUT/.lock, OUT/failed, the next
# version's name) must never take a write, or a deletion, outside OUT.


def _outside(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the store's")
    (outside / "keep").mkdir()  # a folder, which a sweep of stale staging would delete
    return outside


def test_a_staging_link_planted_in_out_takes_no_write_outside(tmp_path, monkeypatch):
    outside = _outside(tmp_path)
    store = DatasetStore(tmp_path / "out")
    store.root.mkdir()
    os.symlink(outside, store.root / ".staging")
    renamed = []
    rename = os.rename
    monkeypatch.setattr(versions.os, "rename", lambda src, dst: renamed.append(Path(src).resolve()) or rename(src, dst))
    with store.lock():
        _publish(store, store.next_version())
    assert renamed and all(src.is_relative_to(store.root.resolve()) for src in renamed)  # built inside OUT
    assert sorted(p.name for p in outside.iterdir()) == ["keep", "keep.txt"]  # nothing swept
    assert store.versions() == ["v0001"] and (store.root / "v0001" / "manifest.json").is_file()
    assert not os.path.lexists(store.root / ".staging")


def test_a_lock_link_planted_in_out_is_not_followed(tmp_path):
    outside = _outside(tmp_path)
    store = DatasetStore(tmp_path / "out")
    store.root.mkdir()
    os.symlink(outside / "keep.txt", store.root / ".lock")
    with store.lock():
        assert not (store.root / ".lock").is_symlink()
        with open(outside / "keep.txt") as fh:  # the outside file is not what the build locked
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.symlink(outside / "made.txt", store.root / ".lock")  # a link to nothing: open() made its target
    with store.lock():
        pass
    assert sorted(p.name for p in outside.iterdir()) == ["keep", "keep.txt"]
    assert (outside / "keep.txt").read_text() == "not the store's"


def test_a_failed_link_planted_in_out_takes_no_failed_build_outside(tmp_path):
    outside = _outside(tmp_path)
    store = DatasetStore(tmp_path / "out")
    store.root.mkdir()
    os.symlink(outside, store.root / "failed")
    with store.lock():
        staging = store.new_staging("v0001")
        kept = store.publish_failed(staging, "v0001", keep=0)  # keep 0 deletes the older ones too
    assert kept is None and sorted(p.name for p in outside.iterdir()) == ["keep", "keep.txt"]
    assert (store.root / "failed").is_dir() and not (store.root / "failed").is_symlink()


@pytest.mark.parametrize("planted", ["dangling", "file"])
def test_a_link_planted_at_the_next_version_is_numbered_past(tmp_path, planted):
    outside = _outside(tmp_path)
    store = DatasetStore(tmp_path / "out")
    _publish(store, "v0001")
    os.symlink(outside / ("gone" if planted == "dangling" else "keep.txt"), store.root / "v0002")
    with store.lock():
        store.recover()
        version = store.next_version()
        _publish(store, version)
    assert version == "v0003" and store.latest_version() == "v0003"
    assert sorted(p.name for p in outside.iterdir()) == ["keep", "keep.txt"]
    with pytest.raises(FileExistsError):
        store.publish(store.new_staging("v0002"), "v0002")


def test_a_build_that_fails_leaves_no_staging_or_lock(tmp_path):
    store = DatasetStore(tmp_path / "out")
    store.root.mkdir()
    with pytest.raises(RuntimeError), store.lock():
        staging = store.new_staging(store.next_version())
        shutil.rmtree(staging)  # what build_dataset does with its staging when the build raises
        raise RuntimeError("the build failed")
    assert sorted(os.listdir(store.root)) == []


def test_staging_and_lock_that_are_not_what_the_store_made_are_refused_by_name(tmp_path):
    store = DatasetStore(tmp_path / "out")
    store.root.mkdir()
    (store.root / ".staging").write_text("a user's file")
    with pytest.raises(StoreError, match=r"out/\.staging is not a folder"):
        store.new_staging("v0001")
    os.mkfifo(store.root / ".lock")
    with pytest.raises(StoreError, match=r"out/\.lock is not a regular file"):
        with store.lock():
            pass
    assert (store.root / ".staging").read_text() == "a user's file"
