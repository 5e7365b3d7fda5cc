"""A damaged parent version: a refresh checks it before any work, `data verify` checks a version
on demand, and `--reprocess-damaged` rebuilds the damaged rows from their photos."""

import json
import os
import shutil

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data.build import INPUTS_FILE, build_dataset
from pipeline.data.verify import record_checksums
from pipeline.data.versions import DatasetStore
from tests.data.test_versions import read_only
from tests.imagefiles import jpeg_bytes, make_source, photo

SETTINGS = ["profile=tiny", "data.decode.size=64", "data.composite.per_photo=1"]


@pytest.fixture(scope="module")
def built(ray_local, tmp_path_factory):
    """v0001 of two dog and two cat photos, one row each, in two Parquet files."""
    root = tmp_path_factory.mktemp("verify")
    source = make_source(root / "src", {"dog": "dog", "cat": "cat"}, per_subject=2)
    out = root / "out"
    result = build_dataset(source, out, load_config(overrides=SETTINGS), incremental=False, progress=False)
    assert result.status == "built" and result.manifest["rows"] == 4
    _split_data_file(result.path)
    return source, out


def _split_data_file(version_dir):
    """Two data files of two rows where the build wrote one (a small build makes one shard), with
    the manifest's list and checksums to match, as a larger build writes them."""
    manifest = json.loads((version_dir / "manifest.json").read_text())
    [entry] = manifest["files"]
    table = pq.read_table(version_dir / entry["path"])
    (version_dir / entry["path"]).unlink()
    manifest["files"] = []
    for i in range(2):
        path = f"data/part-{i:05d}-split.parquet"
        pq.write_table(table.slice(2 * i, 2), version_dir / path)
        manifest["files"].append({"path": path, "rows": 2})
    manifest["checksums"] = record_checksums(version_dir)
    (version_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))


@pytest.fixture
def copy(built, tmp_path, monkeypatch):
    """A private copy of the source (plus one new photo) and of OUT."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    source, out = built
    shutil.copytree(source, tmp_path / "src")
    shutil.copytree(out, tmp_path / "out", symlinks=True)
    (tmp_path / "src" / "dog" / "new.jpg").write_bytes(jpeg_bytes(photo(5)))
    return tmp_path / "src", tmp_path / "out"


def _refresh(source, out, *extra):
    sets = [a for s in SETTINGS for a in ("--set", s)]
    return main(["data", "refresh", "--source", str(source), "--out", str(out), "--no-progress", *sets, *extra])


def _first_data_file(out):
    manifest = json.loads((out / "v0001" / "manifest.json").read_text())
    return out / "v0001" / manifest["files"][0]["path"]


def _flip_image_bytes(path):
    """Flip 16 bytes inside the first row's `image` value of a Parquet file, in place."""
    image = pq.read_table(path, columns=["image"])["image"][0].as_py()
    raw = bytearray(path.read_bytes())
    at = raw.find(image[len(image) // 2 : len(image) // 2 + 32]) + 8
    assert at >= 8, "the image bytes are not stored verbatim"
    raw[at : at + 16] = bytes(b ^ 0xFF for b in raw[at : at + 16])
    path.write_bytes(bytes(raw))
    return pq.read_table(path, columns=["source_uri"])["source_uri"][0].as_py()


def _no_new_work(out):
    staging = out / ".staging"
    assert DatasetStore(out).versions() == ["v0001"] and DatasetStore(out).latest_version() == "v0001"
    assert not staging.exists() or not any(staging.iterdir())


def test_a_refresh_does_not_carry_flipped_bytes_forward(copy, capsys):
    source, out = copy
    path = _first_data_file(out)
    uri = _flip_image_bytes(path)
    assert _refresh(source, out) == 2
    err = capsys.readouterr().err
    assert path.name in err and uri in err and "data build" in err and "--reprocess-damaged" in err
    _no_new_work(out)


def test_data_verify_checks_a_version(copy, capsys):
    _, out = copy
    assert main(["data", "verify", str(out)]) == 0
    assert "v0001" in capsys.readouterr().out
    path = _first_data_file(out)
    uri = _flip_image_bytes(path)
    assert main(["data", "verify", str(out)]) == 2
    err = capsys.readouterr().err
    assert path.name in err and "sha256" in err and uri in err
    assert main(["data", "verify", str(out / "v0001")]) == 2


def test_reprocess_damaged_rebuilds_those_rows_from_their_photos(copy, capsys):
    source, out = copy
    uri = _flip_image_bytes(_first_data_file(out))
    assert _refresh(source, out, "--reprocess-damaged") == 0
    manifest = json.loads((out / "v0002" / "manifest.json").read_text())
    assert manifest["processed"] == 3 and manifest["new"] == 1 and manifest["inputs"] == manifest["accepted"] + manifest["rejected"]
    rows = {r["source_uri"]: r for r in pq.read_table(out / "v0002" / "data").to_pylist()}
    assert rows[uri]["dataset_version"] == "v0002" and rows["dog/new.jpg"]["dataset_version"] == "v0002"
    assert sum(r["dataset_version"] == "v0001" for r in rows.values()) == 2
    assert main(["data", "verify", str(out)]) == 0


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda out: _truncate(_first_data_file(out)), lambda out: _first_data_file(out).name),
        (lambda out: _first_data_file(out).unlink(), lambda out: _first_data_file(out).name),
        (lambda out: _truncate(out / "v0001" / "manifest.json"), lambda out: "manifest.json"),
        (lambda out: _truncate(out / "v0001" / INPUTS_FILE), lambda out: INPUTS_FILE),
        (lambda out: (out / "v0001" / "manifest.json").write_text("[1, 2]\n"), lambda out: "manifest.json"),
    ],
    ids=["truncated-parquet", "missing-data-file", "truncated-manifest", "truncated-inputs", "manifest-not-an-object"],
)
def test_a_damaged_parent_is_a_clear_error_before_any_work(copy, capsys, damage, named):
    source, out = copy
    name = named(out)
    damage(out)
    assert _refresh(source, out) == 2
    err = capsys.readouterr().err
    assert name in err and "data build" in err and "Traceback" not in err
    _no_new_work(out)


def test_a_refresh_with_nothing_new_still_sees_a_missing_data_file(copy, capsys):
    # The quiet path reads only the manifest: its digests alone said "nothing changed" and
    # exited 0 over a version whose rows were gone.
    source, out = copy
    (source / "dog" / "new.jpg").unlink()
    path = _first_data_file(out)
    path.unlink()
    assert _refresh(source, out) == 2
    err = capsys.readouterr().err
    assert path.name in err and "data build" in err and "Traceback" not in err
    _no_new_work(out)


def test_read_only_out(copy, capsys):
    source, out = copy
    (source / "dog" / "new.jpg").unlink()
    with read_only(out):
        assert _refresh(source, out) == 0  # nothing to write: no lock needed
        assert "nothing changed since v0001" in capsys.readouterr().out
        (source / "dog" / "new.jpg").write_bytes(jpeg_bytes(photo(5)))
        assert _refresh(source, out) == 2
    err = capsys.readouterr().err
    assert "cannot write to the dataset folder" in err and str(out) in err


def test_verify_of_a_root_whose_latest_is_a_folder_says_so(tmp_path, capsys):
    # A copy made following links: `latest` is a second copy of a version, not a link to one.
    (tmp_path / "v0001").mkdir()
    (tmp_path / "latest").mkdir()
    assert main(["data", "verify", str(tmp_path)]) == 2
    assert "latest is a folder, not a link to a version" in capsys.readouterr().err


def test_verify_of_a_folder_that_is_not_there_says_so(tmp_path, capsys):
    assert main(["data", "verify", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no dataset version at" in err and "damaged" not in err


def test_verify_of_a_folder_that_is_no_dataset_says_so(tmp_path, capsys):
    """Before: `data verify /` said "damaged: manifest.json missing" of a folder that never was one."""
    (tmp_path / "notes.txt").write_text("not a dataset")
    assert main(["data", "verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is not a subjectforge dataset" in err and "damaged" not in err


def test_verify_of_a_version_without_its_manifest_says_damaged(tmp_path, capsys):
    (tmp_path / "v0001").mkdir()
    (tmp_path / "v0001" / INPUTS_FILE).write_bytes(b"")  # the rest of a version whose manifest was deleted
    (tmp_path / "latest").symlink_to("v0001")
    for target in (tmp_path, tmp_path / "v0001"):
        assert main(["data", "verify", str(target)]) == 2
        err = capsys.readouterr().err
        assert "is damaged" in err and "manifest.json: missing" in err


def _version_with_manifest(root, write):
    """OUT=`root` with v0001 (latest) whose manifest.json `write(path)` makes."""
    (root / "v0001").mkdir(parents=True)
    (root / "latest").symlink_to("v0001")
    write(root / "v0001" / "manifest.json")
    return root


_REQUIRED = {"version": "v0001", "status": "ok", "inputs": 0, "rows": 0, "rejected": 0, "source_digest": "", "processing_digest": ""}


def _manifest(**fields):
    return lambda path: path.write_text(json.dumps({**_REQUIRED, "files": [], **fields}))


@pytest.mark.parametrize(
    "write",
    [
        _manifest(files=[1]),
        _manifest(files="data/part.parquet"),
        _manifest(files=None),
        _manifest(files=[{"rows": 1}]),
        _manifest(files=[{"path": 5, "rows": 1}]),
        _manifest(files=[{"path": "../../../etc/passwd", "rows": 1}]),
        _manifest(files=[{"path": "/etc/passwd", "rows": 1}]),
        _manifest(checksums=["config.yaml"]),
        _manifest(checksums={"../outside": "00"}),
        lambda path: path.write_text("[" * 100_000 + "]" * 100_000),
        lambda path: os.mkfifo(path),
    ],
    ids=["file-int", "files-str", "files-null", "file-no-path", "path-int", "path-up", "path-absolute",
         "checksums-list", "checksum-up", "nested-json", "fifo"],
)
def test_a_manifest_of_the_wrong_shape_is_named_damaged(tmp_path, capsys, write):
    # JSON that reads but is not a manifest's shape was a TypeError, KeyError or pyarrow
    # FileNotFoundError stack trace; JSON nested 100,000 deep a RecursionError; a FIFO hung the read.
    out = _version_with_manifest(tmp_path / "out", write)
    assert main(["data", "verify", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is damaged" in err and "manifest.json:" in err and "Traceback" not in err


@pytest.mark.parametrize("version", ["..", "../other", "/etc", "v0001/../.."])
def test_verify_version_is_a_name_under_out(tmp_path, capsys, version):
    # --version is "the version under OUT": '..' or an absolute path checked a folder outside
    # OUT (a sibling dataset passed as OUT's, exit 0) or called /etc a damaged version.
    out = _version_with_manifest(tmp_path / "out", _manifest())
    assert main(["data", "verify", str(out), "--version", version]) == 2
    err = capsys.readouterr().err
    assert "--version" in err and "damaged" not in err
