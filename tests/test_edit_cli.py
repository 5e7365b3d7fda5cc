"""`subjectforge edit` on the tiny profile, offline: outputs, and bad input as exit 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from pipeline.cli import main

BASE = ["edit", "--profile", "tiny", "--prompt", "a dog on the grass", "--replace", "dog", "--category", "cat"]
BASE += ["--steps", "2", "--height", "64", "--width", "64", "--device", "cpu"]


def _photo(path: Path, seed: int = 0) -> str:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_edit_of_a_generated_image_writes_source_edit_mask_and_settings(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*BASE, "--subject-image", _photo(tmp_path / "cat.png"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["edit.yaml", "edited.png", "mask.png", "source.png"]
    assert Image.open(out / "edited.png").size == (64, 64)
    settings = yaml.safe_load((out / "edit.yaml").read_text())
    assert settings["run"]["replace"] == "dog" and settings["edit"]["cross_replace_steps"] == 0.8
    assert "edited.png" in capsys.readouterr().out


def test_edit_of_a_photo_with_a_clipseg_mask(tmp_path):
    out = tmp_path / "out"
    args = [*BASE, "--subject-image", _photo(tmp_path / "cat.png"), "--image", _photo(tmp_path / "photo.jpg", 1)]
    assert main([*args, "--mask-prompt", "shirt", "--mask-threshold", "0.5", "--out", str(out)]) == 0
    assert (out / "reconstruction.png").is_file()
    mask = np.asarray(Image.open(out / "mask.png")) > 0
    source, edited = np.asarray(Image.open(out / "source.png")), np.asarray(Image.open(out / "edited.png"))
    assert np.array_equal(source[~mask], edited[~mask])  # the photo stays outside CLIPSeg's region


def test_edit_bad_input_exits_2(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    cat, out = _photo(tmp_path / "cat.png"), str(tmp_path / "o")
    base = [*BASE, "--out", out]
    assert main([*base, "--subject-image", cat, "--replace", "horse"]) == 2
    assert "'horse': the word is not in the prompt" in capsys.readouterr().err
    assert main([*base, "--subject-image", cat, "--image", str(notes)]) == 2
    assert "notes.txt is not a readable image" in capsys.readouterr().err
    assert main([*base, "--subject-image", str(notes)]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert main([*base, "--subject-image", cat, "--mask-prompt", "shirt"]) == 2
    assert "--mask-prompt needs --image" in capsys.readouterr().err
    assert main([*base, "--subject-image", cat, "--threshold", "1.5"]) == 2
    assert "edit.threshold" in capsys.readouterr().err
    assert not Path(out).exists()


def test_an_out_that_is_a_file_exits_2(tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("not a folder")
    assert main([*BASE, "--subject-image", _photo(tmp_path / "cat.png"), "--out", str(out)]) == 2
    assert f"--out {out}: {out} is not a folder" in capsys.readouterr().err


def test_a_prompt_that_is_not_utf8_exits_2(tmp_path, capsys):
    # Python keeps a Latin-1 terminal's bytes as surrogates, which the tokenizer refuses.
    args = [*BASE, "--subject-image", _photo(tmp_path / "cat.png"), "--out", str(tmp_path / "o")]
    assert main([*args, "--prompt", "a dog in a caf\udce9"]) == 2
    assert "--prompt: not UTF-8 text" in capsys.readouterr().err


def test_blank_words_name_their_flag_once(tmp_path, capsys):
    """Before: `--target-category ""` said "target category: target category must not be empty"."""
    args = [*BASE, "--subject-image", _photo(tmp_path / "cat.png"), "--out", str(tmp_path / "o")]
    for flag in ("--target-category", "--category", "--replace"):
        assert main([*args, flag, " "]) == 2
        err = capsys.readouterr().err
        assert f"error: {flag}: must not be empty" in err and err.count("must not be empty") == 1


def test_a_second_edit_into_one_out_leaves_only_its_own_images(tmp_path):
    """Before: an edit of a photo, then of a generated image, into one --out kept the first's
    reconstruction.png beside the second's images."""
    out = tmp_path / "out"
    args = [*BASE, "--subject-image", _photo(tmp_path / "cat.png"), "--out", str(out)]
    assert main([*args, "--image", _photo(tmp_path / "photo.jpg", 1)]) == 0
    assert (out / "reconstruction.png").is_file()
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["edit.yaml", "edited.png", "mask.png", "source.png"]


def test_a_link_planted_in_out_is_replaced_not_written_through(tmp_path):
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("not yours")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("edited.png", "edit.yaml"):
        (out / name).symlink_to(elsewhere)
    assert main([*BASE, "--subject-image", _photo(tmp_path / "cat.png"), "--out", str(out)]) == 0
    assert elsewhere.read_text() == "not yours"
    assert not (out / "edited.png").is_symlink() and Image.open(out / "edited.png").size == (64, 64)


def test_an_out_that_cannot_be_written_exits_2_before_the_model_loads(tmp_path, capsys, monkeypatch):
    # os.access lets root write in /proc: the folder was refused only after the edit was drawn.
    from pipeline.model import BlipDiffusion

    def loaded(*args, **kwargs):
        raise AssertionError("loaded the model")

    monkeypatch.setattr(BlipDiffusion, "from_pretrained", loaded)
    assert main([*BASE, "--subject-image", _photo(tmp_path / "cat.png"), "--out", "/proc/subjectforge-out"]) == 2
    assert "--out /proc/subjectforge-out: cannot write in /proc" in capsys.readouterr().err


def test_a_category_longer_than_the_server_takes_exits_2(tmp_path, capsys):
    from pipeline.config import MAX_CATEGORY_CHARS

    args = [*BASE, "--subject-image", _photo(tmp_path / "cat.png"), "--out", str(tmp_path / "o")]
    assert main([*args, "--target-category", "d" * (MAX_CATEGORY_CHARS + 1)]) == 2
    assert f"--target-category: a class noun of at most {MAX_CATEGORY_CHARS} characters" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
