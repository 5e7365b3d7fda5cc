"""`data backgrounds`: every input kept or rejected with a reason, duplicates and salient subjects
dropped, a digest that follows the pool's photos, and `data build --backgrounds POOL`."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.data.backgrounds import backgrounds_digest, list_backgrounds
from pipeline.data.bgpool import build_background_pool, salient_prompt
from tests.imagefiles import photo, png_header_only

SIZE = 64


def red_scorer(photos, prompt):
    """Stands in for CLIPSeg (the tiny model's maps are noise): 'dog' is wherever a pixel is
    saturated red, nothing is anything else."""
    stack = np.stack(photos).astype(np.float32)
    red = (stack[..., 0] > 200) & (stack[..., 1] < 60) & (stack[..., 2] < 60)
    return red.astype(np.float32) if prompt == "dog" else np.zeros(red.shape, np.float32)


def planted_dog() -> Image.Image:
    """A grey photo with a red disc over a quarter of it: the planted salient subject."""
    yy, xx = np.mgrid[0:96, 0:96]
    img = np.full((96, 96, 3), 120, np.uint8)
    img[(yy - 48) ** 2 + (xx - 48) ** 2 < 30**2] = (230, 20, 20)
    return Image.fromarray(img)


@pytest.fixture
def backgrounds_source(tmp_path):
    src = tmp_path / "photos"
    (src / "more").mkdir(parents=True)
    for i in range(3):
        photo(seed=i, size=(120, 90)).save(src / f"scene{i}.png")
    shutil.copy(src / "scene1.png", src / "more" / "copy-of-scene1.png")
    planted_dog().save(src / "dog-on-grass.png")
    (src / "notes.txt").write_text("not a photo")
    subjects = tmp_path / "dataset"
    subjects.mkdir()
    (subjects / "subjects.csv").write_text("subject_id,category\nrex,dog\n")
    return src, subjects


def _config(*overrides):
    """The tiny profile with the default reject prompts, which the profile turns off."""
    return load_config(overrides=["profile=tiny", f"data.decode.size={SIZE}", "data.decode.min_side=16",
                                  "data.write.image_format=png", "data.backgrounds.reject_prompts=null", *overrides])


def test_pool_rejects_a_salient_subject_and_a_duplicate_and_accounts_for_every_input(backgrounds_source, tmp_path):
    src, subjects = backgrounds_source
    pool = build_background_pool(src, tmp_path / "bg", _config(), categories_from=subjects, scorer=red_scorer)
    m = pool.manifest
    reasons = {r["source_uri"]: r["reason"] for r in m["rejects"]}
    assert m["reject_prompts"] == ["dog", "person"]
    assert "'dog'" in reasons["dog-on-grass.png"]
    assert reasons["scene1.png" if "scene1.png" in reasons else "more/copy-of-scene1.png"].startswith("duplicate of ")
    assert reasons["notes.txt"].startswith("decode: not an image")
    assert m["inputs"] == 6 == m["accepted"] + m["rejected"]
    assert m["accepted"] == 3
    listed = list_backgrounds(tmp_path / "bg")  # the root: its latest
    assert len(listed) == 3
    for _, path in listed:
        assert np.asarray(Image.open(path)).shape == (SIZE, SIZE, 3)


def test_a_fifo_in_the_source_is_a_reject_not_a_hang_or_a_silent_drop(backgrounds_source, tmp_path):
    src, subjects = backgrounds_source
    os.mkfifo(src / "pipe.jpg")  # opening it to read would wait for a writer forever
    m = build_background_pool(src, tmp_path / "bg", _config(), categories_from=subjects, scorer=red_scorer).manifest
    assert {r["source_uri"]: r["reason"] for r in m["rejects"]}["pipe.jpg"] == "not a regular file (fifo)"
    assert m["inputs"] == 7 == m["accepted"] + m["rejected"]


def test_a_folder_that_cannot_be_listed_is_a_reject_not_a_silent_drop(backgrounds_source, tmp_path, monkeypatch):
    # Path.rglob skipped a folder without read permission without a word: its photos were
    # neither inputs nor rejects. os.scandir is made to refuse it, as it does for anyone but root.
    src, subjects = backgrounds_source
    (src / "locked").mkdir()
    photo(seed=7, size=(120, 90)).save(src / "locked" / "hidden-scene.png")
    scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": _refuse(path) if os.path.basename(path) == "locked" else scandir(path))
    m = build_background_pool(src, tmp_path / "bg", _config(), categories_from=subjects, scorer=red_scorer).manifest
    assert {r["source_uri"]: r["reason"] for r in m["rejects"]}["locked"] == "cannot read the folder: its files are unknown"
    assert m["inputs"] == 7 == m["accepted"] + m["rejected"]


def _refuse(path):
    raise PermissionError(13, "Permission denied", os.fspath(path))


def test_pool_digest_changes_when_a_photo_is_added(backgrounds_source, tmp_path):
    src, subjects = backgrounds_source
    first = build_background_pool(src, tmp_path / "bg", _config(), categories_from=subjects, scorer=red_scorer)
    before = backgrounds_digest(list_backgrounds(tmp_path / "bg"))
    photo(seed=7, size=(100, 100)).save(src / "scene7.png")
    second = build_background_pool(src, tmp_path / "bg", _config(), categories_from=subjects, scorer=red_scorer)
    assert (first.version, second.version) == ("v0001", "v0002")
    assert second.manifest["accepted"] == first.manifest["accepted"] + 1
    assert second.manifest["digest"] != first.manifest["digest"]
    assert backgrounds_digest(list_backgrounds(tmp_path / "bg")) != before
    # An earlier version stays usable by its folder.
    assert len(list_backgrounds(first.path)) == first.manifest["accepted"]


def test_a_damaged_pool_image_is_refused(backgrounds_source, tmp_path):
    src, subjects = backgrounds_source
    pool = build_background_pool(src, tmp_path / "bg", _config(), categories_from=subjects, scorer=red_scorer)
    image = pool.path / pool.manifest["images"][0]["file"]
    image.write_bytes(image.read_bytes()[:-10])
    with pytest.raises(ConfigError, match="differs from its pool's manifest"):
        list_backgrounds(tmp_path / "bg")


def test_a_plain_folder_with_a_bomb_is_refused_naming_it(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "bomb.png").write_bytes(png_header_only(30000, 30000))  # past PIL's own 179 MP guard
    with pytest.raises(ConfigError, match="bomb.png is not a readable image"):
        list_backgrounds(folder)


@pytest.mark.parametrize("name", ["cut.jpg", "cut.png"])
def test_a_plain_folder_with_a_truncated_image_is_refused_naming_it(tmp_path, name):
    # Its header is whole, so the header check passed it, and the build failed minutes later
    # in the composite stage, with a Ray stack trace (exit 1), when a photo drew it.
    folder = tmp_path / "plain"
    folder.mkdir()
    photo(0).save(folder / "good.png")
    photo(1).save(folder / name)
    (folder / name).write_bytes((folder / name).read_bytes()[:-400])
    with pytest.raises(ConfigError, match=f"{name} is not a readable image"):
        list_backgrounds(folder)


def test_a_plain_folder_with_a_name_that_is_not_utf8_is_refused_naming_it(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    photo(1).save(os.path.join(os.fsencode(folder), b"caf\xe9.png"))  # its id would be a row's background_id
    with pytest.raises(ConfigError, match=r"caf\\xe9.png.*not UTF-8"):
        list_backgrounds(folder)


def test_salient_prompt_needs_more_than_the_area():
    conf = np.zeros((10, 10), np.float32)
    conf[:2, :5] = 0.9  # 10% of the photo
    assert salient_prompt({"dog": conf}, threshold=0.5, area=0.1) is None
    assert "'dog' on 10%" in salient_prompt({"person": conf * 0, "dog": conf}, threshold=0.5, area=0.05)


def test_cli_builds_a_pool_with_clipseg(backgrounds_source, tmp_path, capsys):
    """The real command, with the tiny CLIPSeg (its verdicts are noise: reject_area 1 keeps
    every photo it scores; the accounting is what is checked)."""
    src, subjects = backgrounds_source
    code = main(["data", "backgrounds", "--source", str(src), "--out", str(tmp_path / "bg"), "--profile", "tiny",
                 "--categories-from", str(subjects), "--set", "data.decode.min_side=16",
                 "--set", "data.backgrounds.reject_area=1.0"])
    assert code == 0
    out = capsys.readouterr().out
    assert "rejected notes.txt: decode:" in out and "4 backgrounds, 2 of 6 inputs rejected" in out


def test_the_tiny_profile_keeps_plain_photos(backgrounds_source, tmp_path, capsys):
    """As for data.filter.exclude_prompts, the tiny CLIPSeg's noise found 'person' on about half
    of every photo: `data backgrounds --profile tiny` rejected them all and exited 1."""
    src, _ = backgrounds_source
    code = main(["data", "backgrounds", "--source", str(src), "--out", str(tmp_path / "bg"), "--profile", "tiny",
                 "--set", "data.decode.min_side=16"])
    assert code == 0, capsys.readouterr().err
    assert "4 backgrounds, 2 of 6 inputs rejected" in capsys.readouterr().out

def test_a_pool_with_nothing_kept_fails_and_publishes_nothing(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.txt").write_text("not a photo")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    code = main(["data", "backgrounds", "--source", str(src), "--out", str(tmp_path / "bg"), "--profile", "tiny"])
    assert code == 1
    err = capsys.readouterr().err
    assert "no background kept from 2 input(s)" in err and "notes.txt: decode" in err
    assert not (tmp_path / "bg" / "v0001").exists() and not (tmp_path / "bg" / "latest").exists()


def test_a_build_composites_onto_the_pool(backgrounds_source, tmp_path):
    """`data build --backgrounds BG` with a pool: its composites' backgrounds are the pool's
    images, by their ids (process_photos runs the build's stages in this process)."""
    from pipeline.data.build import process_photos
    from pipeline.data.sources import SourcePhoto, sha256_file
    from tests.imagefiles import SAMPLE

    src, subjects = backgrounds_source
    pool = build_background_pool(src, tmp_path / "bg", _config(), categories_from=subjects, scorer=red_scorer)
    path = sorted((SAMPLE / "dog").glob("*.jpg"))[0]
    photo_in = SourcePhoto("dog", "dog", f"dog/{path.name}", str(path), sha256_file(path))
    rows, rejects = process_photos([photo_in], _config(f"data.backgrounds.folder={tmp_path / 'bg'}"), "v-test")
    assert rows.num_rows == 2 and rejects.num_rows == 0  # data.composite.per_photo rows
    pool_ids = {image["id"] for image in pool.manifest["images"]}
    assert set(rows["background_id"].to_pylist()) <= pool_ids


def test_a_pool_that_fails_while_writing_leaves_no_staging_and_publishes_nothing(backgrounds_source, tmp_path, monkeypatch):
    """A write that fails halfway (a full disk) takes its half-written staging folder with it,
    as a data build's does: nothing is left in OUT for the next run to sweep, nothing published."""
    from pipeline.data import bgpool

    src, subjects = backgrounds_source
    real = bgpool._encode
    calls = []

    def full_disk(*args):
        calls.append(1)
        if len(calls) == 2:  # the first image is written, the second finds the disk full
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(bgpool, "_encode", full_disk)
    with pytest.raises(OSError, match="No space left"):
        build_background_pool(src, tmp_path / "bg", _config(), categories_from=subjects, scorer=red_scorer)
    assert sorted(p.name for p in (tmp_path / "bg").iterdir()) == []


def test_categories_from_beside_explicit_reject_prompts_is_named_not_dropped(tmp_path, caplog):
    # The tiny profile sets reject_prompts to [], and so may --set: --categories-from was then
    # dropped without a word, even a path that does not exist.
    from pipeline.data.bgpool import reject_prompts

    config = load_config(overrides=["profile=tiny"])
    with caplog.at_level("WARNING"):
        assert reject_prompts(config, tmp_path / "nowhere") == []
    assert "--categories-from" in caplog.text and "data.backgrounds.reject_prompts" in caplog.text


def test_a_file_given_as_the_backgrounds_folder_is_named_as_not_a_folder(tmp_path):
    """--backgrounds pointing at one photo says it is not a folder, not that nothing is there."""
    one = tmp_path / "beach.png"
    Image.new("RGB", (32, 32)).save(one)
    with pytest.raises(ConfigError, match=r"data\.backgrounds\.folder: not a folder: .*beach\.png"):
        list_backgrounds(one)
    with pytest.raises(ConfigError, match=r"data\.backgrounds\.folder: folder not found: .*nope"):
        list_backgrounds(tmp_path / "nope")
