"""End to end on a local Ray: build, reopen, refresh, kill and resume."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import PROFILE_MODELS, load_config
from pipeline.data.backgrounds import BUNDLED_BACKGROUNDS
from pipeline.data.build import INPUTS_FILE, build_dataset
from pipeline.data.sources import SourceError
from pipeline.data.versions import DatasetStore
from stages.write import DATA_SCHEMA
from tests.imagefiles import EXPECTED_REASON, broken_files, jpeg_bytes, make_source, photo, tricky_files
from tests.tinydata import publish_dataset

# Small photos keep matting fast.
SETTINGS = [
    "profile=tiny",
    "data.decode.size=96",
]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = make_source(tmp_path_factory.mktemp("src"), {"dog": "dog", "cat": "cat", "ghost": "ghost"}, per_subject=3)
    (root / "ghost").rmdir()
    for name, data in tricky_files().values():
        (root / "dog" / name).write_bytes(data)
    for name, data in broken_files().values():
        (root / "cat" / name).write_bytes(data)
    (root / "unlisted").mkdir()
    (root / "unlisted" / "x.jpg").write_bytes(jpeg_bytes(photo(7)))
    (root / "captions.csv").write_text("photo,caption\ndog/00.jpg,a dog on the grass\n")
    return root


@pytest.fixture(scope="module")
def built(ray_local, source, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    result = build_dataset(source, out, load_config(overrides=SETTINGS), incremental=False, progress=False)
    return out, result


def read_rows(version_dir):
    return pq.read_table(version_dir / "data")


def test_counts_add_up_and_every_input_is_accounted_for(built):
    _, result = built
    m = result.manifest
    assert result.status == "built" and m["version"] == "v0001" and m["parent_version"] is None
    n_broken, n_tricky = len(broken_files()), len(tricky_files())
    assert m["inputs"] == 3 + n_tricky + 3 + n_broken + 1
    assert m["inputs"] == m["accepted"] + m["rejected"]
    assert m["rows"] == 2 * m["accepted"]
    assert m["rejects_by_stage"]["decode"] == n_broken and m["rejects_by_stage"]["scan"] == 1
    assert any("'ghost' but the source has no folder" in w for w in m["warnings"])
    ledger = pq.read_table(result.path / INPUTS_FILE).to_pylist()
    assert len(ledger) == m["inputs"]
    assert sum(r["rows"] for r in ledger) == m["rows"]


def test_each_broken_file_has_its_reason_and_tricky_ones_are_accepted(built):
    _, result = built
    rejects = {r["source_uri"]: r for r in pq.read_table(result.path / "rejects.parquet").to_pylist()}
    for key, (name, _) in broken_files().items():
        row = rejects[f"cat/{name}"]
        assert row["stage"] == "decode" and EXPECTED_REASON[key] in row["reason"], row
    assert rejects["unlisted/x.jpg"]["stage"] == "scan"
    accepted = set(read_rows(result.path)["source_uri"].to_pylist())
    for name, _ in tricky_files().values():
        assert f"dog/{name}" in accepted or rejects[f"dog/{name}"]["stage"] != "decode"


def test_every_accepted_row_has_a_caption_and_the_users_win(built):
    _, result = built
    rows = read_rows(result.path).to_pylist()
    assert rows and all(r["caption"].strip() for r in rows)
    by_source = Counter((r["source_uri"] == "dog/00.jpg", r["caption_source"]) for r in rows)
    assert set(by_source) == {(True, "user"), (False, "model")}
    assert {r["caption"] for r in rows if r["source_uri"] == "dog/00.jpg"} == {"a dog on the grass"}
    ledger = {r["source_uri"]: r for r in pq.read_table(result.path / INPUTS_FILE).to_pylist()}
    assert ledger["dog/00.jpg"]["caption"] == "a dog on the grass" and ledger["dog/01.jpg"]["caption"] == ""
    assert result.manifest["models"]["captioner"].endswith("tiny-captioner")


def test_parquet_reopens_and_images_decode(built):
    _, result = built
    table = read_rows(result.path)
    assert table.schema == DATA_SCHEMA
    for row in table.slice(0, 6).to_pylist():
        image = Image.open(io.BytesIO(row["image"]))
        composite = Image.open(io.BytesIO(row["composite"]))
        alpha = Image.open(io.BytesIO(row["alpha"]))
        assert min(image.size) == 96 and image.size == composite.size == alpha.size == (row["width"], row["height"])
        assert alpha.mode == "L" and image.mode == "RGB"
        assert row["dataset_version"] == "v0001" and row["background_id"]
    per_photo = Counter(table["source_uri"].to_pylist())
    assert set(per_photo.values()) == {2}
    assert (result.path / "config.yaml").exists()
    assert load_config(result.path / "config.yaml").data.decode.size == 96


def test_refresh_without_changes_processes_nothing(built, source):
    out, _ = built
    result = build_dataset(source, out, load_config(overrides=SETTINGS), incremental=True, progress=False)
    assert result.status == "unchanged" and "processed 0 photos" in result.message
    assert DatasetStore(out).versions() == ["v0001"]


def test_refresh_after_add_and_remove_then_kill_and_rerun(built, source, tmp_path):
    out, first = built
    (source / "dog" / "brand new.jpg").write_bytes(jpeg_bytes(photo(11, (150, 130))))
    removed = source / "cat" / "01.jpg"
    shutil.move(removed, tmp_path / "01.jpg")
    result = build_dataset(source, out, load_config(overrides=SETTINGS), incremental=True, progress=False)
    m = result.manifest
    assert result.status == "built" and m["version"] == "v0002" and m["parent_version"] == "v0001"
    assert m["processed"] == 1 and m["new"] == 1 and m["removed"] == 1 and m["removed_uris"] == ["cat/01.jpg"]
    assert m["unchanged"] == first.manifest["inputs"] - 1 - 1  # minus the removed one and the scan reject
    assert m["inputs"] == first.manifest["inputs"] and m["inputs"] == m["accepted"] + m["rejected"]
    rows = read_rows(result.path)
    per_photo = Counter(rows["source_uri"].to_pylist())
    assert set(per_photo.values()) == {2} and "cat/01.jpg" not in per_photo and per_photo["dog/brand new.jpg"] == 2
    # Carried rows are the parent's rows, byte for byte; new ones are stamped with the new version.
    old = {(r["source_uri"], r["composite_index"]): r["composite"] for r in read_rows(first.path).to_pylist()}
    for r in rows.to_pylist():
        if r["source_uri"] == "dog/brand new.jpg":
            assert r["dataset_version"] == "v0002"
        else:
            assert r["dataset_version"] == "v0001" and old[(r["source_uri"], r["composite_index"])] == r["composite"]
    assert os.readlink(out / "latest") == "v0002"

    # Kill a refresh midway (SIGKILL to its whole process group, Ray included), then rerun.
    for i in range(3):
        (source / "dog" / f"extra{i}.jpg").write_bytes(jpeg_bytes(photo(20 + i)))
    cmd = [sys.executable, "-m", "pipeline", "data", "refresh", "--source", str(source), "--out", str(out), "--no-progress"]
    for s in SETTINGS:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = out / ".staging"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (staging.is_dir() and any(staging.iterdir())):
        time.sleep(0.2)
    assert staging.is_dir() and any(staging.iterdir()), "the refresh never started writing"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert os.readlink(out / "latest") == "v0002" and DatasetStore(out).versions() == ["v0001", "v0002"]

    result = build_dataset(source, out, load_config(overrides=SETTINGS), incremental=True, progress=False)
    m = result.manifest
    assert result.status == "built" and m["version"] == "v0003" and m["parent_version"] == "v0002"
    assert m["processed"] == 3 and m["inputs"] == m["accepted"] + m["rejected"]
    per_photo = Counter(read_rows(result.path)["source_uri"].to_pylist())
    assert set(per_photo.values()) == {2}  # no duplicates
    assert not staging.exists()  # the killed refresh's staging swept, the empty folder removed


@pytest.fixture(scope="module")
def duplicated(ray_local, tmp_path_factory):
    """A source holding a copy inside a subject (dog/01.jpg of dog/00.jpg) and one across
    subjects (dog/02.jpg of cat/00.jpg), built once with the default data.duplicates (reject)."""
    root = make_source(tmp_path_factory.mktemp("dupsrc"), {"cat": "cat", "dog": "dog"}, per_subject=2)
    (root / "dog" / "01.jpg").write_bytes((root / "dog" / "00.jpg").read_bytes())
    (root / "dog" / "02.jpg").write_bytes((root / "cat" / "00.jpg").read_bytes())
    out = tmp_path_factory.mktemp("dupout")
    return root, out, build_dataset(root, out, load_config(overrides=SETTINGS), incremental=False, progress=False)


def _rejects(version_dir):
    return {r["source_uri"]: (r["stage"], r["reason"]) for r in pq.read_table(version_dir / "rejects.parquet").to_pylist()}


def _ledger(version_dir):
    return {r["source_uri"]: r["status"] for r in pq.read_table(version_dir / INPUTS_FILE).to_pylist()}


def test_a_copy_of_a_photo_is_a_reject_naming_the_kept_one(duplicated):
    _, _, result = duplicated
    m = result.manifest
    assert result.status == "built" and (m["inputs"], m["accepted"], m["rejected"]) == (5, 3, 2)
    assert _rejects(result.path) == {
        "dog/01.jpg": ("scan", "duplicate of dog/00.jpg (same bytes)"),  # the same subject
        "dog/02.jpg": ("scan", "duplicate of cat/00.jpg (same bytes)"),  # another subject: the first in path order is kept
    }
    assert _ledger(result.path) == {"cat/00.jpg": "accepted", "cat/01.jpg": "accepted", "dog/00.jpg": "accepted",
                                    "dog/01.jpg": "rejected", "dog/02.jpg": "rejected"}
    assert set(Counter(read_rows(result.path)["source_uri"].to_pylist()).items()) == {
        ("cat/00.jpg", 2), ("cat/01.jpg", 2), ("dog/00.jpg", 2)
    }


def _copy_built(duplicated, tmp_path):
    """The duplicated source and its built dataset, copied, for a refresh of its own."""
    root, out, _ = duplicated
    shutil.copytree(root, tmp_path / "src")
    shutil.copytree(out, tmp_path / "out", symlinks=True)
    return tmp_path / "src", tmp_path / "out"


def test_a_copy_added_before_a_refresh_is_the_only_new_reject(duplicated, tmp_path):
    source, out = _copy_built(duplicated, tmp_path)
    shutil.copy(source / "cat" / "01.jpg", source / "dog" / "03.jpg")
    result = build_dataset(source, out, load_config(overrides=SETTINGS), incremental=True, progress=False)
    m = result.manifest
    assert result.status == "built" and (m["processed"], m["new"], m["unchanged"]) == (0, 1, 3)
    assert (m["inputs"], m["accepted"], m["rejected"]) == (6, 3, 3)
    assert _rejects(result.path)["dog/03.jpg"] == ("scan", "duplicate of cat/01.jpg (same bytes)")
    assert set(read_rows(result.path)["dataset_version"].to_pylist()) == {"v0001"}  # every row carried


def test_removing_the_kept_photo_makes_its_copy_the_kept_one(duplicated, tmp_path):
    source, out = _copy_built(duplicated, tmp_path)
    (source / "dog" / "00.jpg").unlink()
    (source / "cat" / "00.jpg").unlink()
    result = build_dataset(source, out, load_config(overrides=SETTINGS), incremental=True, progress=False)
    m = result.manifest
    assert result.status == "built" and (m["processed"], m["removed"], m["unchanged"]) == (2, 2, 1)
    assert (m["inputs"], m["accepted"], m["rejected"]) == (3, 3, 0)
    assert _ledger(result.path) == {"cat/01.jpg": "accepted", "dog/01.jpg": "accepted", "dog/02.jpg": "accepted"}
    versions = {(r["source_uri"], r["dataset_version"]) for r in read_rows(result.path).to_pylist()}
    assert versions == {("cat/01.jpg", "v0001"), ("dog/01.jpg", "v0002"), ("dog/02.jpg", "v0002")}
    assert m["affected_subjects"] == {"cat": {"new": 0, "changed": 0, "removed": 1, "reprocessed": 0},
                                      "dog": {"new": 0, "changed": 0, "removed": 1, "reprocessed": 2}}


def test_duplicates_keep_makes_every_copy_a_photo_on_the_next_refresh(duplicated, tmp_path):
    source, out = _copy_built(duplicated, tmp_path)
    result = build_dataset(source, out, load_config(overrides=[*SETTINGS, "data.duplicates=keep"]), incremental=True, progress=False)
    m = result.manifest
    assert result.status == "built" and (m["processed"], m["unchanged"]) == (2, 3)  # the copies only
    assert (m["inputs"], m["accepted"], m["rejected"]) == (5, 5, 0)
    assert set(Counter(read_rows(result.path)["source_uri"].to_pylist()).values()) == {2}


@pytest.mark.slow
def test_changed_settings_reprocess_everything(ray_local, source, tmp_path):
    small = make_source(tmp_path / "src", {"dog": "dog"}, per_subject=2)
    out = tmp_path / "out"
    build_dataset(small, out, load_config(overrides=SETTINGS), incremental=True, progress=False)
    changed = load_config(overrides=[*SETTINGS, "data.composite.per_photo=1"])
    result = build_dataset(small, out, changed, incremental=True, progress=False)
    m = result.manifest
    assert m["processed"] == 2 and m["unchanged"] == 0 and m["rows"] == 2
    assert any("every photo is reprocessed" in w for w in m["warnings"])
    # Another captioner (the same files in another folder) reprocesses; the same one again does not.
    captioner = shutil.copytree(PROFILE_MODELS["tiny"]["captioner"], tmp_path / "captioner")
    recaptioned = load_config(overrides=[*SETTINGS, "data.composite.per_photo=1", f"models.captioner={captioner}"])
    result = build_dataset(small, out, recaptioned, incremental=True, progress=False)
    assert (result.status, result.manifest["processed"], result.manifest["version"]) == ("built", 2, "v0003")
    again = build_dataset(small, out, recaptioned, incremental=True, progress=False)
    assert again.status == "unchanged" and "processed 0 photos" in again.message
    # An edited caption of the user's reprocesses that photo alone.
    (small / "captions.csv").write_text("photo,caption\ndog/01.jpg,a dog by the sea\n")
    result = build_dataset(small, out, recaptioned, incremental=True, progress=False)
    m = result.manifest
    assert (m["processed"], m["unchanged"], m["inputs"]) == (1, 1, m["accepted"] + m["rejected"])
    rows = {r["source_uri"]: r for r in read_rows(result.path).to_pylist()}
    assert (rows["dog/01.jpg"]["caption"], rows["dog/01.jpg"]["caption_source"]) == ("a dog by the sea", "user")


def test_too_many_rejects_fails_without_moving_latest(ray_local, tmp_path):
    root = make_source(tmp_path / "src", {"cat": "cat"}, sample=False)
    for name, data in broken_files().values():
        (root / "cat" / name).write_bytes(data)
    (root / "cat" / "ok.jpg").write_bytes(jpeg_bytes(photo()))
    out = tmp_path / "out"
    result = build_dataset(root, out, load_config(overrides=SETTINGS), incremental=False, progress=False)
    assert result.status == "failed" and "data.max_reject_fraction" in result.message
    assert result.manifest["status"] == "failed" and DatasetStore(out).latest_version() is None
    assert np.isclose(result.manifest["rejected"] / result.manifest["inputs"], 6 / 7)


@pytest.mark.slow
def test_torch_matting_backend_end_to_end(ray_local, tmp_path):
    src = make_source(tmp_path / "src", {"dog": "dog"}, per_subject=2)
    config = load_config(overrides=[*SETTINGS, "data.matte.backend=torch"])
    result = build_dataset(src, tmp_path / "out", config, incremental=False, progress=False)
    m = result.manifest
    assert result.status == "built" and m["inputs"] == m["accepted"] + m["rejected"] == 2
    assert m["config"]["data"]["matte"]["backend"] == "torch"


def _all_rejected_at_scan(root):
    """A source whose every input is a scan reject, so a build of it fails its reject limit
    without starting Ray."""
    make_source(root, {"dog": "dog"}, sample=False)
    (root / "stray").mkdir()
    for i in range(2):
        (root / "stray" / f"{i}.jpg").write_bytes(jpeg_bytes(photo(i)))
    return root


def test_failed_refreshes_stay_out_of_the_sequence_and_are_bounded(tmp_path):
    source = _all_rejected_at_scan(tmp_path / "src")
    out = tmp_path / "out"
    config = load_config(overrides=[*SETTINGS, "data.keep_failed=2"])
    paths = [build_dataset(source, out, config, incremental=True, progress=False).path for _ in range(3)]
    store = DatasetStore(out)
    assert store.versions() == [] and store.latest_version() is None and store.next_version() == "v0001"
    assert sorted((out / "failed").iterdir()) == sorted(paths[1:])
    assert all(json.loads((p / "manifest.json").read_text())["status"] == "failed" for p in paths[1:])


def test_an_out_inside_the_source_is_refused(tmp_path):
    source = _all_rejected_at_scan(tmp_path / "src")
    with pytest.raises(SourceError, match="inside the source"):
        build_dataset(source, source / "dataset", load_config(overrides=SETTINGS), incremental=False, progress=False)
    assert not (source / "dataset").exists()


def test_the_next_build_removes_a_version_orphaned_by_a_kill(tmp_path):
    # A build killed after renaming its version into place but before switching `latest`.
    out = tmp_path / "out"
    publish_dataset(out, {"dog": "dog"})
    orphan = out / "v0002"
    shutil.copytree(out / "v0001", orphan)
    (orphan / "manifest.json").write_text(json.dumps({"version": "v0002", "status": "ok", "parent_version": "v0001"}))
    os.symlink("v0002", out / ".latest-0123abcd")
    (out / ".publishing-v0002").touch()  # DatasetStore.publish's record, made before the rename
    result = build_dataset(_all_rejected_at_scan(tmp_path / "src"), out, load_config(overrides=SETTINGS), incremental=False, progress=False)
    assert result.status == "failed" and not orphan.exists() and not list(out.glob(".latest-*"))
    assert DatasetStore(out).versions() == ["v0001"] and os.readlink(out / "latest") == "v0001"
    assert not list(out.glob(".publishing-*"))


def test_links_planted_in_out_take_no_write_outside_it(tmp_path):
    # OUT/.staging, OUT/.lock and OUT/failed -> elsewhere: the build, and its failed copy, were
    # written where the links led, and the lock file opened there.
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "stage").mkdir(parents=True)
    (elsewhere / "fail").mkdir()
    (elsewhere / "lockfile").write_text("not the build's")
    out = tmp_path / "out"
    out.mkdir()
    for name, target in ((".staging", "stage"), (".lock", "lockfile"), ("failed", "fail")):
        os.symlink(elsewhere / target, out / name)
    result = build_dataset(_all_rejected_at_scan(tmp_path / "src"), out, load_config(overrides=SETTINGS), incremental=False, progress=False)
    assert result.status == "failed" and result.path.parent == out / "failed" and result.path.is_dir()
    assert not (out / "failed").is_symlink() and sorted(os.listdir(out)) == ["failed"]  # no .staging or .lock left
    assert not list((elsewhere / "stage").iterdir()) and not list((elsewhere / "fail").iterdir())
    assert (elsewhere / "lockfile").read_text() == "not the build's"


def test_a_build_that_raises_leaves_no_staging_or_lock(tmp_path, monkeypatch):
    from pipeline.data import build

    def broken(*args, **kwargs):
        raise RuntimeError("a stage failed")

    monkeypatch.setattr(build, "_write_version", broken)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RuntimeError, match="a stage failed"):
        build_dataset(_all_rejected_at_scan(tmp_path / "src"), out, load_config(overrides=SETTINGS), incremental=False, progress=False)
    assert os.listdir(out) == []


def test_a_relative_backgrounds_folder_is_recorded_absolute(tmp_path, monkeypatch):
    # Online composites read the pool from the manifest (pipeline/train/data.py online_settings),
    # in a job whose working folder need not be the build's.
    shutil.copytree(BUNDLED_BACKGROUNDS, tmp_path / "bg")
    source = _all_rejected_at_scan(tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    config = load_config(overrides=[*SETTINGS, "data.backgrounds.folder=bg"])
    result = build_dataset(source, tmp_path / "out", config, incremental=False, progress=False)
    assert result.manifest["backgrounds"]["folder"] == str(tmp_path / "bg")
