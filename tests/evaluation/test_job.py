"""`subjectforge evaluate` end to end on a local Ray with the tiny models: 2 subjects x 2 prompts
x 1 image at 64 px and 2 steps; files, score ranges, resume, the MLflow run (a SQLite store in
tmp), refused settings and URIs."""

import csv

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import COMMANDS, main
from pipeline.config import BUNDLED_DATASETS_DIR, PROFILE_MODELS, ConfigError, load_config
from pipeline.evaluation.job import (
    ModelRef,
    default_out,
    log_to_mlflow,
    parse_registry_uri,
    resolve_model,
    run_evaluation,
)

GENERATE = ["generate.steps=2", "generate.height=64", "generate.width=64"]


def _read_csv(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder to run in (MLflow keeps a SQLite store's artifacts under ./mlruns) and its store."""
    root = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield root, f"sqlite:///{root / 'mlruns.db'}"


@pytest.fixture(scope="module")
def first_run(ray_local, workdir):
    root, store = workdir
    prompts = root / "prompts.txt"
    prompts.write_text("a {class} on the beach\na red {class}\n")
    out = root / "out"
    args = ["evaluate", "--profile", "tiny", "--subjects", "dog", "teapot", "--prompts", str(prompts)]
    args += ["--images-per-prompt", "1", "--out", str(out), "--set", f"tracking.uri={store}"]
    for setting in GENERATE:
        args += ["--set", setting]
    assert main(args) == 0
    return out, args, store


@pytest.fixture(scope="module")
def second_run(first_run):
    """The same evaluation again, with one image deleted first."""
    out, _, store = first_run
    kept, gone = out / "images/dog/a-red-class/0.png", out / "images/teapot/a-class-on-the-beach/0.png"
    before, mtime = np.asarray(Image.open(gone)), kept.stat().st_mtime_ns
    gone.unlink()
    overrides = ["profile=tiny", "evaluate.subjects=[dog, teapot]", f"evaluate.prompts={out.parent / 'prompts.txt'}"]
    overrides += ["evaluate.images_per_prompt=1", f"evaluate.out={out}", f"tracking.uri={store}", *GENERATE]
    config = load_config(overrides=overrides)
    result = run_evaluation(config, logger=log_to_mlflow, progress=False)
    return result, config, {"kept": (kept, mtime), "gone": (gone, before)}


def test_writes_images_tables_summary_and_grids(first_run):
    out, _, _ = first_run
    images = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png"))
    assert images == [
        "images/dog/a-class-on-the-beach/0.png",
        "images/dog/a-red-class/0.png",
        "images/teapot/a-class-on-the-beach/0.png",
        "images/teapot/a-red-class/0.png",
    ]
    assert Image.open(out / images[0]).size == (64, 64)
    per_image = _read_csv(out / "images.csv")
    assert [(r["subject_id"], r["prompt"]) for r in per_image] == [
        ("dog", "a dog on the beach"),
        ("dog", "a red dog"),
        ("teapot", "a teapot on the beach"),
        ("teapot", "a red teapot"),
    ]
    scores = _read_csv(out / "scores.csv")
    assert [r["subject_id"] for r in scores] == ["dog", "teapot", "overall"]
    for row in per_image + scores:
        assert all(-1.0 <= float(row[m]) <= 1.0 for m in ("dino", "clip_i", "clip_t"))
    dog = [float(r["dino"]) for r in per_image if r["subject_id"] == "dog"]
    assert float(scores[0]["dino"]) == pytest.approx(sum(dog) / 2, abs=1e-5)
    summary = (out / "summary.md").read_text()
    assert "| **overall** |" in summary and "0.594" in summary and "meaningless" in summary
    # Grid: the 5 real dog photos on top, then one row per prompt, 128 px cells.
    assert Image.open(out / "grids" / "dog.png").size == (5 * 128, 3 * 128)
    assert (out / "generation.json").is_file() and (out / "evaluate.yaml").is_file()


def test_scores_are_logged_to_an_mlflow_run(first_run, tmp_path):
    from mlflow import MlflowClient

    out, _, store = first_run
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("subjectforge").experiment_id], "attributes.run_name = 'eval-out'")
    assert run.info.run_name == "eval-out" and run.info.status == "FINISHED"
    assert run.data.tags["subjectforge.job"] == "evaluate" and run.data.params["evaluate.images_per_prompt"] == "1"
    overall = {row["subject_id"]: row for row in _read_csv(out / "scores.csv")}["overall"]
    for metric in ("dino", "clip_i", "clip_t"):
        assert run.data.metrics[metric] == pytest.approx(float(overall[metric]), abs=1e-5)
        assert -1.0 <= run.data.metrics[f"{metric}/teapot"] <= 1.0
    logged = {a.path for a in client.list_artifacts(run.info.run_id)} | {a.path for a in client.list_artifacts(run.info.run_id, "grids")}
    assert {"scores.csv", "images.csv", "summary.md", "evaluate.yaml", "grids/dog.png", "grids/teapot.png"} <= logged


@pytest.mark.slow
def test_rerun_makes_only_the_missing_images_and_reopens_the_run(first_run, second_run):
    from mlflow import MlflowClient

    _, _, store = first_run
    result, _, files = second_run
    assert (result.generated, result.reused) == (1, 3)
    kept, mtime = files["kept"]
    assert kept.stat().st_mtime_ns == mtime  # not redone
    # Image k always starts from seed + k: the remade image is the one that was deleted.
    gone, before = files["gone"]
    assert np.abs(np.asarray(Image.open(gone)).astype(int) - before).max() <= 1
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("subjectforge").experiment_id], "attributes.run_name = 'eval-out'")
    assert [r.info.run_id for r in runs] == [result.mlflow_run_id]


@pytest.mark.slow
def test_a_registered_subject_is_evaluated_and_its_version_tagged(first_run, tmp_path):
    from mlflow import MlflowClient

    from pipeline import tracking
    from pipeline.model import BlipDiffusion
    from pipeline.model.subject import SubjectSpec, save_subject

    out, _, store = first_run
    tiny = PROFILE_MODELS["tiny"]["blip_diffusion"]
    model = BlipDiffusion.from_pretrained(tiny)
    embeds = 2 * model.encode_subject(sorted((BUNDLED_DATASETS_DIR / "dreambench-mini" / "dog").glob("*.jpg")), "dog")
    save_subject(tmp_path / "dog", SubjectSpec("textual-inversion", "dog", "dog", tiny, 64), model, embeds)
    source_run = tracking.start_run(store, "subjectforge", "finetune-dog")
    version = tracking.log_subject_model(store, source_run, tmp_path / "dog", "subjectforge-dog", {"method": "textual-inversion"}, "candidate")
    overrides = ["profile=tiny", "evaluate.model=models:/subjectforge-dog@candidate", f"evaluate.prompts={out.parent / 'prompts.txt'}"]
    overrides += ["evaluate.images_per_prompt=1", f"evaluate.out={out.parent / 'registered'}", f"tracking.uri={store}", *GENERATE]
    result = run_evaluation(load_config(overrides=overrides), logger=log_to_mlflow, progress=False)

    assert (result.model.registered_name, result.model.registered_version) == ("subjectforge-dog", version)
    assert list(result.per_subject) == ["dog"] and result.generated == 2  # the model's own subject only
    assert (result.out / "model" / "subject").is_dir() and result.model.subject.startswith(str(result.out / "model"))
    client = MlflowClient(store)
    tags = client.get_model_version("subjectforge-dog", version).tags
    assert tags["eval.run_id"] == result.mlflow_run_id and tags["eval.images"] == "2" and tags["method"] == "textual-inversion"
    assert float(tags["eval.dino"]) == pytest.approx(result.overall["dino"], abs=1e-4)
    run_tags = client.get_run(result.mlflow_run_id).data.tags
    assert (run_tags["subjectforge.model_name"], run_tags["subjectforge.model_version"]) == ("subjectforge-dog", version)
    with pytest.raises(ConfigError, match="draws one subject, 'dog', not teapot"):
        run_evaluation(load_config(overrides=[*overrides, "evaluate.subjects=[teapot]"]), progress=False)


@pytest.mark.slow
def test_controlnet_images_are_scored_as_a_table_of_their_own(first_run):
    """evaluate.control on a finished folder: the plain images stay, the steered ones (canny maps
    of the real photos) go under control/ with their own tables, and the summary lists them."""
    out, _, _ = first_run
    overrides = ["profile=tiny", "evaluate.subjects=[dog]", f"evaluate.prompts={out.parent / 'prompts.txt'}",
                 "evaluate.images_per_prompt=1", f"evaluate.out={out}", "evaluate.control=true", *GENERATE]
    result = run_evaluation(load_config(overrides=overrides), progress=False)
    assert result.generated == 0 and set(result.control) == {"dino", "clip_i", "clip_t"}
    table = _read_csv(out / "control" / "scores.csv")
    assert [row["subject_id"] for row in table] == ["dog", "overall"]
    plain, steered = (np.asarray(Image.open(out / folder / "images/dog/a-red-class/0.png"), dtype=int) for folder in ("", "control"))
    assert np.abs(plain - steered).max() > 0
    assert "with ControlNet" in (out / "summary.md").read_text()


def test_other_settings_in_the_same_folder_are_refused(first_run, capsys):
    _, args, _ = first_run
    assert main([*args, "--set", "generate.seed=7"]) == 2
    assert "seed: 0 there, 7 now" in capsys.readouterr().err


def test_bad_subject_and_registry_uris_fail_before_any_work(tmp_path, capsys):
    assert "evaluate" in [name for name, _, _ in COMMANDS]
    base = ["evaluate", "--profile", "tiny", "--out", str(tmp_path / "o"), "--set", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]
    assert main([*base, "--subjects", "unicorn"]) == 2
    assert "'unicorn' is not in the class table" in capsys.readouterr().err
    assert main([*base, "--model", "models:/subjectforge-cat@champion"]) == 2
    assert "models:/subjectforge-cat@champion not found in the registry" in capsys.readouterr().err
    assert main([*base, "--model", "models:/cat/v1"]) == 2
    assert "models:/NAME@ALIAS or models:/NAME/VERSION" in capsys.readouterr().err
    assert main([*base, "--model", str(tmp_path)]) == 2
    assert "model_index.json is missing" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    (tmp_path / "file").write_text("not a folder")
    assert main([*base, "--out", str(tmp_path / "file" / "eval")]) == 2
    assert f"evaluate.out {tmp_path / 'file' / 'eval'}: {tmp_path / 'file'} is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("alias", ["a.b", "a b", "a@b"])
def test_an_alias_mlflow_refuses_is_named_by_the_uri(alias, monkeypatch, capsys):
    # parse_registry_uri took a '.' that MLflow refuses, and '@' or ' ' got the general line.
    def looked_up(*args, **kwargs):
        raise AssertionError("the registry was looked up")

    monkeypatch.setattr("pipeline.tracking.registered_version", looked_up)
    with pytest.raises(ConfigError, match=f"--model: models:/x@{alias}: the alias '{alias}' is not an alias name"):
        parse_registry_uri(f"models:/x@{alias}")
    assert main(["evaluate", "--model", f"models:/x@{alias}"]) == 2
    assert f"the alias '{alias}' is not an alias name" in capsys.readouterr().err


def test_model_references():
    assert parse_registry_uri("models:/subjectforge-dog@champion") == ("subjectforge-dog", "champion", None)
    assert parse_registry_uri("models:/base/3") == ("base", None, "3")
    for bad in ("models:/", "models:/a@", "models:/a/b/c", "models:/a/v1"):
        with pytest.raises(ConfigError, match="models:/NAME@ALIAS"):
            parse_registry_uri(bad)
    assert resolve_model("Salesforce/blipdiffusion") == ModelRef("Salesforce/blipdiffusion", "Salesforce/blipdiffusion")
    assert default_out(ModelRef("Salesforce/blipdiffusion", "Salesforce/blipdiffusion")).name == "Salesforce--blipdiffusion"


@pytest.mark.parametrize("damage", ["truncated", "list", "fifo", "folder"])
def test_a_damaged_settings_record_in_out_is_named(tmp_path, damage):
    # A run killed while writing generation.json left it cut short: the rerun was a
    # JSONDecodeError stack trace. A FIFO there hung the write; a folder was an IsADirectoryError.
    import os

    from pipeline.evaluation.job import FINGERPRINT_FILE, _check_fingerprint

    path = tmp_path / FINGERPRINT_FILE
    if damage == "truncated":
        path.write_text('{"model": "x", "ste')
    elif damage == "list":
        path.write_text("[1, 2]")
    elif damage == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    with pytest.raises(ConfigError, match=f"{FINGERPRINT_FILE}"):
        _check_fingerprint(tmp_path, {"model": "x", "steps": 2})
