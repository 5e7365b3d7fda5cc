"""What `finetune` may delete and replace, and what it says about a subject it cannot find.

Training is replaced by a stand-in checkpoint (`_fit`), so these run in a second without Ray."""

import json
import shutil

import pytest

import pipeline.train.finetune as finetune
from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from tests.tinydata import publish_dataset

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def fake_fit(monkeypatch, tmp_path):
    """`_fit` returns a checkpoint whose subject folder holds `weights` = the call's number."""
    calls = []

    def fit(config, storage, run_name, uri, run_id, validation):
        calls.append(run_name)
        checkpoint = tmp_path / "ckpt" / str(len(calls))
        (checkpoint / "subject").mkdir(parents=True)
        (checkpoint / "subject" / "weights").write_text(str(len(calls)))
        return checkpoint

    monkeypatch.setattr(finetune, "_fit", fit)
    return calls


def _argv(dataset, out, subject_id, *extra):
    return [
        "finetune", "--profile", "tiny", "--subject", str(dataset), "--subject-id", subject_id, "--method", "lora",
        "--steps", "2", "--out", str(out), "--set", f"train.storage_path={out.parent / 'runs'}",
        "--set", "tracking.enabled=false", "--set", "finetune.register_model=false", *extra,
    ]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("finetune.subject_id", "../victim"),
        ("finetune.subject_id", "/tmp/victim"),
        ("finetune.subject_id", ".."),
        ("finetune.subject_id", "rex:1"),
        ("train.run_name", "run\tone"),
        ("finetune.subjects", ["dog", "../victim"]),
        ("evaluate.subjects", ["/etc"]),
        ("train.run_name", "../../elsewhere"),
        ("train.register_as", "a/b"),
        ("finetune.register_prefix", "team/"),
    ],
)
def test_names_that_would_leave_their_folder_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=rf"{key}.*plain folder name"):
        load_config(overrides=[f"{key}={json.dumps(value)}"])


def test_plain_names_with_dots_quotes_and_spaces_are_valid():
    config = load_config(overrides=["finetune.subject_id=\"o'neil\"", "train.run_name=it's a run", "finetune.register_prefix=''"])
    assert config.finetune.subject_id == "o'neil" and config.finetune.register_prefix == ""


@pytest.mark.parametrize("absolute", [False, True])
def test_a_subject_id_outside_out_is_refused_and_the_sibling_survives(tmp_path, fake_fit, capsys, absolute):
    # The artifact would be <out>/<subject_id>-lora: ../victim reaches the sibling victim-lora,
    # an absolute id any folder.
    victim = tmp_path / ("abs" if absolute else "") / "victim-lora"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("not yours")
    subject_id = str(tmp_path / "abs" / "victim") if absolute else "../victim"
    dataset, out = tmp_path / "ds", tmp_path / "out"
    publish_dataset(dataset, {subject_id: "dog"}, per_subject=1)
    out.mkdir()  # holds other subjects already

    assert main(_argv(dataset, out, subject_id)) == 2
    assert "finetune.subject_id" in capsys.readouterr().err
    assert (victim / "keep.txt").read_text() == "not yours" and not fake_fit


def test_an_out_that_is_a_file_is_refused_before_training(tmp_path, fake_fit, capsys):
    dataset, out = tmp_path / "ds", tmp_path / "out"
    publish_dataset(dataset, {"dog": "dog"}, per_subject=1)
    out.write_text("not a folder")
    assert main(_argv(dataset, out, "dog")) == 2
    assert f"finetune.out {out}: {out} is not a folder" in capsys.readouterr().err
    assert not fake_fit


def test_a_new_artifact_replaces_the_old_only_once_complete(tmp_path, fake_fit, monkeypatch):
    dataset, out = tmp_path / "ds", tmp_path / "out"
    publish_dataset(dataset, {"dog": "dog"}, per_subject=1)
    assert main(_argv(dataset, out, "dog")) == 0
    assert (out / "dog-lora" / "weights").read_text() == "1"

    copytree = shutil.copytree

    def disk_full(src, dst, **kwargs):
        copytree(src, dst, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(shutil, "copytree", disk_full)
    with pytest.raises(OSError, match="No space"):
        main(_argv(dataset, out, "dog", "--steps", "3"))  # a new key: trains again
    assert (out / "dog-lora" / "weights").read_text() == "1"  # the previous artifact, whole
    monkeypatch.setattr(shutil, "copytree", copytree)
    assert main(_argv(dataset, out, "dog", "--steps", "4")) == 0
    assert (out / "dog-lora" / "weights").read_text() == "3"
    assert sorted(p.name for p in out.iterdir()) == ["dog-lora"]  # and no lock file of replace_tree's


def test_a_subject_not_in_the_dataset_is_named_with_the_ones_that_are(tmp_path, fake_fit, capsys):
    dataset, out = tmp_path / "ds", tmp_path / "out"
    publish_dataset(dataset, {"dog": "dog", "cat": "cat"}, per_subject=1)
    for extra in ([], ["--category", "cow"]):
        assert main(_argv(dataset, out, "cow", *extra)) == 2
        err = capsys.readouterr().err
        assert "subject 'cow' is not in dataset v0001" in err and "its subjects: cat, dog" in err
        assert "--category" not in err
    many = tmp_path / "many"
    publish_dataset(many, {f"s{i:02d}": "toy" for i in range(25)}, per_subject=1)
    assert main(_argv(many, out, "cow")) == 2
    assert "its subjects: s00, s01" in (err := capsys.readouterr().err) and "s19 and 5 more" in err and "s20" not in err
    assert not fake_fit


def test_finetune_many_names_subjects_missing_from_the_dataset_before_starting_ray(tmp_path, monkeypatch, capsys):
    import pipeline.train.many as many

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(many, "ensure_ray", no_ray)
    dataset = tmp_path / "ds"
    publish_dataset(dataset, {"dog": "dog", "cat": "cat"}, per_subject=1)
    argv = ["finetune-many", "--profile", "tiny", "--data", str(dataset), "--subjects", "dog,cow", "--out", str(tmp_path / "out"),
            "--set", "tracking.enabled=false"]
    assert main(argv) == 2
    assert "finetune.subjects: cow not in dataset v0001" in (err := capsys.readouterr().err) and "its subjects: cat, dog" in err


def test_a_storage_path_that_is_a_file_is_refused_before_training(tmp_path, fake_fit, capsys):
    dataset, out = tmp_path / "ds", tmp_path / "out"
    publish_dataset(dataset, {"dog": "dog"}, per_subject=1)
    (tmp_path / "runs").write_text("not a folder")
    assert main(_argv(dataset, out, "dog")) == 2  # _argv puts train.storage_path at tmp_path / "runs"
    assert f"train.storage_path {tmp_path / 'runs'}: {tmp_path / 'runs'} is not a folder" in capsys.readouterr().err
    assert not fake_fit


def test_finetune_many_refuses_an_out_that_is_a_file_before_starting_ray(tmp_path, monkeypatch, capsys):
    import pipeline.train.many as many

    monkeypatch.setattr(many, "ensure_ray", lambda *a, **k: pytest.fail("Ray was started"))
    dataset, out = tmp_path / "ds", tmp_path / "out"
    publish_dataset(dataset, {"dog": "dog"}, per_subject=1)
    out.write_text("not a folder")
    argv = ["finetune-many", "--profile", "tiny", "--data", str(dataset), "--out", str(out), "--set", "tracking.enabled=false"]
    assert main(argv) == 2
    assert f"finetune.out {out}: {out} is not a folder" in capsys.readouterr().err
    argv[argv.index(str(out))] = str(tmp_path / "subjects")
    assert main([*argv, "--set", f"train.storage_path={out}"]) == 2
    assert f"train.storage_path {out}: {out} is not a folder" in capsys.readouterr().err
