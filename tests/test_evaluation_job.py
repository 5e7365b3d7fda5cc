"""`subjectforge evaluate` end to end on a local Ray with the tiny models: 2 subjects x 2 prompts
x 1 image at 64 px and 2 steps; files, score ranges, resume, refused settings and URIs."""

import csv

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import COMMANDS, main
from pipeline.config import ConfigError, load_config
from pipeline.evaluation.job import ModelRef, default_out, parse_registry_uri, resolve_model, run_evaluation

pytestmark = pytest.mark.slow

SETTINGS = ["--set", "generate.steps=2", "--set", "generate.height=64", "--set", "generate.width=64"]


def _read_csv(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def first_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    prompts = root / "prompts.txt"
    prompts.write_text("a {class} on the beach\na red {class}\n")
    out = root / "out"
    args = ["evaluate", "--profile", "tiny", "--subjects", "dog", "teapot", "--prompts", str(prompts)]
    args += ["--images-per-prompt", "1", "--out", str(out), *SETTINGS]
    assert main(args) == 0
    return out, args


def test_writes_images_tables_summary_and_grids(first_run, capsys):
    out, _ = first_run
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


def test_rerun_makes_only_the_missing_images(first_run):
    out, _ = first_run
    kept = out / "images/dog/a-red-class/0.png"
    gone = out / "images/teapot/a-class-on-the-beach/0.png"
    before = np.asarray(Image.open(gone))
    mtime = kept.stat().st_mtime_ns
    gone.unlink()
    overrides = ["profile=tiny", "evaluate.subjects=[dog, teapot]", f"evaluate.prompts={out.parent / 'prompts.txt'}"]
    overrides += ["evaluate.images_per_prompt=1", f"evaluate.out={out}", "generate.steps=2", "generate.height=64", "generate.width=64"]
    logged = []
    result = run_evaluation(load_config(overrides=overrides), logger=lambda r, c: logged.append(r) or "run-1", progress=False)
    assert (result.generated, result.reused) == (1, 3)
    assert kept.stat().st_mtime_ns == mtime  # not redone
    # Image k always starts from seed + k: the remade image is the one that was deleted.
    assert np.abs(np.asarray(Image.open(gone)).astype(int) - before).max() <= 1
    assert logged == [result] and result.mlflow_run_id == "run-1"
    assert set(result.overall) == {"dino", "clip_i", "clip_t"} and len(result.images) == 4


def test_other_settings_in_the_same_folder_are_refused(first_run, capsys):
    out, args = first_run
    assert main([*args, "--set", "generate.seed=7"]) == 2
    assert "seed: 0 there, 7 now" in capsys.readouterr().err


def test_bad_subject_and_registry_uris_fail_before_any_work(tmp_path, capsys):
    assert "evaluate" in [name for name, _, _ in COMMANDS]
    base = ["evaluate", "--profile", "tiny", "--out", str(tmp_path / "o")]
    assert main([*base, "--subjects", "unicorn"]) == 2
    assert "'unicorn' is not in the class table" in capsys.readouterr().err
    assert main([*base, "--model", "models:/subjectforge-dog@champion"]) == 2
    assert "issue 6" in capsys.readouterr().err
    assert main([*base, "--model", str(tmp_path)]) == 2
    assert "model_index.json is missing" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_model_references():
    assert parse_registry_uri("models:/subjectforge-dog@champion") == ("subjectforge-dog", "champion", None)
    assert parse_registry_uri("models:/base/3") == ("base", None, "3")
    for bad in ("models:/", "models:/a@", "models:/a/b/c", "models:/a/v1"):
        with pytest.raises(ConfigError, match="models:/NAME@ALIAS"):
            parse_registry_uri(bad)
    assert resolve_model("Salesforce/blipdiffusion") == ModelRef("Salesforce/blipdiffusion", "Salesforce/blipdiffusion")
    assert default_out(ModelRef("Salesforce/blipdiffusion", "Salesforce/blipdiffusion")).name == "Salesforce--blipdiffusion"
