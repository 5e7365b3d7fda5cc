"""`subjectforge generate --style-image`: LAVIS's stylization (a style photo through the subject
path, the structure from a ControlNet map of the subject photo), tiny profile, offline."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from pipeline.cli import main

BASE = ["generate", "--profile", "tiny", "--prompt", "on a marble table", "--steps", "2", "--height", "64", "--width", "64"]
BASE += ["--seed", "4", "--dtype", "float32", "--device", "cpu"]


def _photos(tmp_path):
    style = tmp_path / "flower.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(style)
    kettle = Image.new("RGB", (64, 64), (20, 20, 20))
    ImageDraw.Draw(kettle).ellipse((12, 16, 52, 56), outline=(255, 255, 255), width=3)
    kettle.save(tmp_path / "kettle.png")
    return str(style), str(tmp_path / "kettle.png")


def _image(folder):
    return np.asarray(Image.open(folder / "image_000.png"))


def test_stylization_is_the_style_as_subject_with_the_photos_structure(tmp_path):
    style, kettle = _photos(tmp_path)
    control = ["--control", "canny", "--control-image", kettle]
    styled = ["--style-image", style, "--style-category", "flower", "--category", "teapot"]
    assert main([*BASE, *styled, *control, "--out", str(tmp_path / "styled")]) == 0
    spelled = ["--subject-image", style, "--category", "flower", "--target-category", "teapot"]
    assert main([*BASE, *spelled, *control, "--out", str(tmp_path / "spelled")]) == 0
    np.testing.assert_array_equal(_image(tmp_path / "styled"), _image(tmp_path / "spelled"))
    assert main([*BASE, *styled, *control, "--control-scale", "0", "--out", str(tmp_path / "unsteered")]) == 0
    assert np.abs(_image(tmp_path / "styled").astype(int) - _image(tmp_path / "unsteered")).max() > 0
    assert "flower.png" in (tmp_path / "styled" / "generate.yaml").read_text()


def test_stylization_without_its_parts_exits_2(tmp_path, capsys):
    style, kettle = _photos(tmp_path)
    out = ["--out", str(tmp_path / "o")]
    assert main([*BASE, *out, "--style-image", style, "--category", "teapot"]) == 2
    assert "--style-image needs --control" in capsys.readouterr().err
    control = ["--control", "canny", "--control-image", kettle]
    assert main([*BASE, *out, *control, "--style-image", style]) == 2
    assert "--style-image needs --category" in capsys.readouterr().err
    assert main([*BASE, *out, *control, "--style-image", style, "--category", "teapot", "--subject-image", style]) == 2
    assert "leave out --subject-image" in capsys.readouterr().err
    assert main([*BASE, *out, *control, "--style-image", str(tmp_path), "--category", "teapot"]) == 2
    assert not (tmp_path / "o").exists()
