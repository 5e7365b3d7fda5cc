import multiprocessing as mp
import os
import time

import pytest

from pipeline.versions import DatasetStore


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
    store.publish(staging, "v0002", make_latest=False)
    assert store.versions() == ["v0001", "v0002"] and store.latest_version() == "v0001"
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
    assert os.path.exists(tmp_path / ".lock")
