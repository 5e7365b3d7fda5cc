"""Score tables, the markdown summary and the per-subject grid."""

import csv

from PIL import Image

from pipeline.evaluation.report import (
    REFERENCE_SCORES,
    make_subject_grid,
    summary_markdown,
    write_image_scores,
    write_subject_scores,
)

PER_SUBJECT = {"dog": {"dino": 0.61, "clip_i": 0.8, "clip_t": 0.29}, "vase": {"dino": 0.5, "clip_i": 0.7, "clip_t": 0.31}}
OVERALL = {"dino": 0.555, "clip_i": 0.75, "clip_t": 0.3}


def test_tables_round_trip(tmp_path):
    write_subject_scores(tmp_path / "scores.csv", PER_SUBJECT, OVERALL, {"dog": 100, "vase": 100})
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    assert [(r["subject_id"], r["images"], r["dino"]) for r in rows] == [
        ("dog", "100", "0.610000"),
        ("vase", "100", "0.500000"),
        ("overall", "200", "0.555000"),
    ]
    image_rows = [{"subject_id": "dog", "prompt": "a red dog", "index": 0, "path": "images/dog/a-red-class/0.png", "dino": 0.5, "clip_i": 0.25, "clip_t": -0.125, "extra": 1}]
    write_image_scores(tmp_path / "images.csv", image_rows)
    (row,) = csv.DictReader((tmp_path / "images.csv").open())
    assert row == {"subject_id": "dog", "prompt": "a red dog", "index": "0", "path": "images/dog/a-red-class/0.png", "dino": "0.500000", "clip_i": "0.250000", "clip_t": "-0.125000"}


def test_summary_has_scores_settings_and_the_published_table():
    text = summary_markdown(PER_SUBJECT, OVERALL, {"model": "Salesforce/blipdiffusion"}, tiny=False)
    assert "| dog | 0.610 | 0.800 | 0.290 |" in text
    assert "| **overall** | **0.555** | **0.750** | **0.300** |" in text
    assert "- model: `Salesforce/blipdiffusion`" in text and "meaningless" not in text
    assert "| BLIP-Diffusion, zero-shot | 0.594 | 0.779 | 0.300 |" in text
    assert "| Real images | 0.774 | 0.885 | - |" in text
    assert len(REFERENCE_SCORES) == 5
    assert "meaningless" in summary_markdown(PER_SUBJECT, OVERALL, {}, tiny=True)


def test_grid_puts_real_photos_on_top_and_fits_each_image():
    real = [Image.new("RGB", (40, 20), "red")] * 3
    rows = [[Image.new("RGB", (16, 16), "blue")] * 2, [Image.new("RGB", (16, 16), "green")] * 2]
    grid = make_subject_grid(real, rows, thumbnail=32)
    assert grid.size == (3 * 32, 3 * 32)
    assert grid.getpixel((16, 16)) == (255, 0, 0)  # a wide photo is letterboxed in its cell
    assert grid.getpixel((16, 2)) == (255, 255, 255)
    assert grid.getpixel((16, 48)) == (0, 0, 255) and grid.getpixel((48, 80)) == (0, 128, 0)
    assert grid.getpixel((80, 48)) == (255, 255, 255)  # rows shorter than the widest stay blank
