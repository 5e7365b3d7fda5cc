"""`finetune --subject FOLDER`: the photos go through the dataset's stages in process (bad ones
are rejects with a stage and a reason), and the fine-tune's key says when a rerun is the same
fine-tune (and reuses the registered version) and when it is a new one."""

import os

import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.train.finetune import SubjectError, finetune_key, read_subject
from stages.train_inputs import decode_rgb
from tests.imagefiles import SAMPLE, broken_files, jpeg_bytes

TINY = ["profile=tiny", "data.decode.size=64", "finetune.subject_id=dog", "finetune.category=dog"]


def test_photo_folder_goes_through_the_stages_with_bad_photos_as_rejects(tmp_path):
    for path in sorted((SAMPLE / "dog").glob("*.jpg"))[:2]:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    for name, data in broken_files().values():
        (tmp_path / name).write_bytes(data)
    config = load_config(overrides=[*TINY, f"finetune.subject={tmp_path}", "data.composite.per_photo=2"])
    subject = read_subject(config)
    photo_like = [n for n, _ in broken_files().values() if n.lower().endswith((".jpg", ".jpeg", ".png", ".webp"))]
    assert sorted(r["source_uri"] for r in subject.rejects) == sorted(photo_like)
    assert all(r["stage"] == "decode" and r["reason"] for r in subject.rejects)
    assert len(subject.rows) == 2 * 2  # two composites per usable photo
    for row in subject.rows:
        image, composite = decode_rgb(row["image"]), decode_rgb(row["composite"])
        assert min(image.shape[:2]) == 64 and image.shape == composite.shape  # decoded at data.decode.size
        assert not np.array_equal(image, composite)  # the subject on a new background, not the photo
    assert subject.dataset_version == f"photos:{tmp_path.name}"
    # Other composite settings give other rows, hence another digest (and fine-tune key).
    other = read_subject(load_config(overrides=[*TINY, f"finetune.subject={tmp_path}", "data.composite.per_photo=1"]))
    assert other.dataset_digest != subject.dataset_digest and len(other.rows) == 2


def test_links_and_special_files_in_a_photo_folder_are_rejects_as_in_a_data_build(tmp_path):
    folder, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    folder.mkdir(), elsewhere.mkdir()
    sample = sorted((SAMPLE / "dog").glob("*.jpg"))[0]
    (folder / sample.name).write_bytes(sample.read_bytes())
    (elsewhere / "private.jpg").write_bytes(sample.read_bytes())
    (folder / "outside.jpg").symlink_to(elsewhere / "private.jpg")
    (folder / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    os.mkfifo(folder / "pipe.jpg")
    subject = read_subject(load_config(overrides=[*TINY, f"finetune.subject={folder}", "data.composite.per_photo=1"]))
    assert {r["source_uri"]: (r["stage"], r["reason"]) for r in subject.rejects} == {
        "outside.jpg": ("scan", "link outside the source"),
        "dangling.jpg": ("scan", "dangling link"),
        "pipe.jpg": ("scan", "not a regular file (fifo)"),
    }
    assert len(subject.rows) == 1  # the photo in the folder, not the one the link leads to


def test_a_copy_of_a_photo_in_the_folder_is_a_reject_naming_the_kept_one_unless_duplicates_keep(tmp_path):
    # A copy would weigh double in the subject's few photos, as in a data build (data.duplicates).
    sample = sorted((SAMPLE / "dog").glob("*.jpg"))[0]
    (tmp_path / "a.jpg").write_bytes(sample.read_bytes())
    (tmp_path / "b.jpg").write_bytes(sample.read_bytes())
    overrides = [*TINY, f"finetune.subject={tmp_path}", "data.composite.per_photo=1"]
    subject = read_subject(load_config(overrides=overrides))
    assert subject.rejects == [{"source_uri": "b.jpg", "stage": "scan", "reason": "duplicate of a.jpg (same bytes)"}]
    assert len(subject.rows) == 1
    kept = read_subject(load_config(overrides=[*overrides, "data.duplicates=keep"]))
    assert kept.rejects == [] and len(kept.rows) == 2


def test_folder_without_a_usable_photo_is_a_clear_error(tmp_path):
    for name, data in broken_files().values():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "tiny.jpg").write_bytes(jpeg_bytes(Image.new("RGB", (8, 8))))  # below decode.min_side
    with pytest.raises(SubjectError, match=r"no usable photo .*rejected: .*tiny.jpg: decode: "):
        read_subject(load_config(overrides=[*TINY, f"finetune.subject={tmp_path}"]))


def test_finetune_key_changes_with_what_changes_the_weights_only():
    base = load_config(overrides=TINY)

    def key(*overrides, category="dog", digest="d1", base_ref="models:/b/1"):
        return finetune_key(load_config(overrides=[*TINY, *overrides]), category, digest, base_ref)

    same = key()
    assert same == finetune_key(base, "dog", "d1", "models:/b/1")
    for placement in ("finetune.out=elsewhere", "finetune.alias=champion", "finetune.num_gpus=0.5", "train.storage_path=/x",
                      "train.cpus_per_worker=2", "finetune.concurrency=3", "tracking.experiment=other"):
        assert key(placement) == same, placement
    changed = [key("finetune.steps=7"), key("finetune.method=lora"), key("train.resolution=128"), key("finetune.lr=0.1"),
               key(category="cat"), key(digest="d2"), key(base_ref="models:/b/2"), key("finetune.subject_id=cat")]
    assert len({same, *changed}) == 1 + len(changed)


def test_a_file_given_as_the_subject_is_a_config_error_naming_it(tmp_path):
    """A photo (or any file) where the subject's folder goes is a usage error (exit 2), not
    "no photo found" (SubjectError, exit 1) as if it were an empty folder."""
    from pipeline.config import ConfigError

    photo = tmp_path / "dog.jpg"
    photo.write_bytes(jpeg_bytes(Image.new("RGB", (64, 64))))
    with pytest.raises(ConfigError, match=r"finetune\.subject: not a folder: .*dog\.jpg"):
        read_subject(load_config(overrides=[*TINY, f"finetune.subject={photo}"]))
