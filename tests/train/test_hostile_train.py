"""A dataset version damaged after it was built, as the trainer opens it (open_dataset, which
pretrain, finetune and finetune-many all go through): a config error naming the version and
the file, before any Ray work; never a stack trace, nor a run on rows that are not the version's."""

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError
from pipeline.train.data import open_dataset
from tests.tinydata import publish_dataset

SHARD = "data/part-00000.parquet"


@pytest.fixture
def version(tmp_path):
    """A version whose manifest lists its one data file, as `data build` writes it."""
    folder = publish_dataset(tmp_path / "ds", {"dog": "dog", "cat": "cat"}, per_subject=2, size=(32, 32))
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(manifest | {"files": [{"path": SHARD, "rows": 4}]}))
    return folder


def _replace_column(path, name, values):
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.schema.get_field_index(name), name, values), path)


def _damage(folder, how):
    shard, manifest = folder / SHARD, folder / "manifest.json"
    if how == "truncated":
        shard.write_bytes(shard.read_bytes()[:200])
    elif how == "random bytes":
        shard.write_bytes(os.urandom(shard.stat().st_size))
    elif how == "another schema":
        pq.write_table(pa.table({"x": [1, 2, 3, 4]}), shard)
    elif how == "a wrong type":
        _replace_column(shard, "image", pa.array(["a", "b", "c", "d"]))
    elif how == "zero rows":
        pq.write_table(pq.read_table(shard).slice(0, 0), shard)
    elif how == "deleted":
        shard.unlink()
    elif how == "added":
        shutil.copy(shard, folder / "data/part-00001.parquet")
    elif how == "a folder":
        shard.unlink()
        shard.mkdir()
    elif how == "manifest rows":
        data = json.loads(manifest.read_text())
        data["files"][0]["rows"] = 100
        manifest.write_text(json.dumps(data))
    elif how == "manifest cut short":
        manifest.write_bytes(manifest.read_bytes()[:20])
    elif how == "manifest a list":
        manifest.write_text("[1, 2]")
    elif how == "manifest subjects a string":
        manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"subjects": "dog"}))


@pytest.mark.parametrize(
    "how, named",
    [
        ("truncated", SHARD),
        ("random bytes", SHARD),
        ("another schema", SHARD),
        ("a wrong type", "image is string"),
        ("zero rows", "0 rows, the manifest says 4"),
        ("deleted", f"{SHARD}: missing"),
        ("added", "part-00001.parquet: a data file the manifest does not list"),
        ("a folder", SHARD),
        ("manifest rows", "4 rows, the manifest says 100"),
        ("manifest cut short", "manifest.json"),
        ("manifest a list", "manifest.json"),
        ("manifest subjects a string", "manifest.json"),
    ],
)
def test_a_damaged_version_is_a_config_error_naming_the_file(version, how, named):
    # Each was an ArrowInvalid, OSError, JSONDecodeError or AttributeError stack trace, or (added,
    # another schema, a wrong type) a run on rows that are not the version's.
    _damage(version, how)
    with pytest.raises(ConfigError, match=r"(?s)train.data: dataset version .* is damaged:.*" + named):
        open_dataset(str(version.parent))


@pytest.mark.parametrize("target", ["v0009", "latest"])
def test_latest_pointing_at_nothing_names_the_link(version, target):
    (version.parent / "latest").unlink()
    os.symlink(target, version.parent / "latest")
    with pytest.raises(ConfigError, match=f"latest points at {target}, which is not there"):
        open_dataset(str(version.parent))


def test_a_version_without_cutouts_or_captions_still_opens(version):
    # An older build's rows: no foreground, alpha or caption columns; they train on stored composites.
    table = pq.read_table(version / SHARD)
    pq.write_table(table.drop_columns(["foreground", "alpha", "caption", "caption_source"]), version / SHARD)
    info = open_dataset(str(version.parent))
    assert (info.rows, info.has_cutout, info.has_caption) == (4, False, False)


def test_a_run_folder_that_is_a_file_is_refused_before_ray_starts(version, tmp_path, monkeypatch, capsys):
    import pipeline.train.trainer as trainer
    from pipeline.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(trainer, "ensure_ray", no_ray)
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "mine").write_text("a user's file, not a run folder")
    flags = ["--data", str(version), "--run-name", "mine", "--set", f"train.storage_path={runs}", "--set", "tracking.enabled=false"]
    assert main(["pretrain", "--profile", "tiny", *flags, "--set", "train.batch_size=2"]) == 2
    err = capsys.readouterr().err
    assert "train.run_name" in err and "is not a folder" in err
    assert (runs / "mine").read_text() == "a user's file, not a run folder"


def test_resuming_a_checkpoint_of_another_model_is_refused_before_ray_starts(version, tmp_path, monkeypatch, capsys):
    # A run folder whose newest checkpoint is of another model (another profile's or base's run
    # of the same name): the loop loads the checkpoint's own model, so the run trained on it with
    # exit 0 instead of models.blip_diffusion.
    import pipeline.train.trainer as trainer
    from pipeline.cli import main
    from pipeline.config import PROFILE_MODELS
    from pipeline.model import BlipDiffusion
    from pipeline.train import dist

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(trainer, "ensure_ray", no_ray)
    step = tmp_path / "runs" / "mine" / "step-0000002"
    BlipDiffusion.from_pretrained(PROFILE_MODELS["tiny"]["blip_diffusion"]).save_pretrained(step / "model")
    unet = step / "model" / "unet" / "config.json"
    unet.write_text(json.dumps(json.loads(unet.read_text()) | {"layers_per_block": 7}))
    dist.write_progress(step, 2)
    flags = ["--data", str(version), "--run-name", "mine", "--set", f"train.storage_path={tmp_path / 'runs'}"]
    assert main(["pretrain", "--profile", "tiny", *flags, "--set", "tracking.enabled=false", "--set", "train.batch_size=2"]) == 2
    err = capsys.readouterr().err
    assert "train.run_name" in err and "step-0000002" in err and "unet" in err and "layers_per_block" in err
    assert step.is_dir()  # the user's checkpoint is left as it was


def test_a_finetunes_own_inputs_version_opens(tmp_path):
    # The one-subject version a fine-tune writes for its training run (finetune.write_inputs) is
    # no damage: its rows carry no subject_id, which the training feed does not read.
    from pipeline.config import load_config
    from pipeline.train.finetune import SubjectRows, write_inputs
    from tests.imagefiles import jpeg_bytes, photo

    png = jpeg_bytes(photo(0, (32, 32)))
    rows = [{"category": "dog", "image": png, "composite": png, "caption": ""}] * 2
    subject = SubjectRows("dog", "dog", rows, [png], {}, [], "photos:dog", "d" * 16)
    config = load_config(overrides=["profile=tiny", "finetune.subject_id=dog", "finetune.method=lora"])
    written = write_inputs(config, subject, tmp_path / "inputs", base="unused")
    assert open_dataset(str(tmp_path / "inputs")).rows == written


def test_a_resume_whose_base_is_not_on_this_machine_is_not_compared(tmp_path, monkeypatch, caplog):
    # A resume loads the checkpoint's own model; the comparison must not wait for a download
    # of the base (or fail offline), so an uncached Hub id is logged and skipped.
    from pipeline.config import PROFILE_MODELS, load_config
    from pipeline.model import BlipDiffusion
    from pipeline.train import dist
    from pipeline.train.trainer import check_resume_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    step = tmp_path / "mine" / "step-0000002"
    BlipDiffusion.from_pretrained(PROFILE_MODELS["tiny"]["blip_diffusion"]).save_pretrained(step / "model")
    dist.write_progress(step, 2)
    config = load_config(overrides=["profile=tiny", "models.blip_diffusion=nobody/not-on-this-machine"])
    check_resume_model(config, tmp_path / "mine")
    assert "without comparing its model" in caplog.text
