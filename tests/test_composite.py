import json

import numpy as np
import pytest

from stages.composite import (
    COMPOSITE_INDEX,
    composite_batch,
    composite_subject,
    fit_background,
    photo_seed,
    subject_bbox,
)
from stages.records import (
    ALPHA,
    BACKGROUND_ID,
    COMPOSITE,
    FOREGROUND,
    PLACEMENT,
    REJECT_STAGE,
    SEED,
    SOURCE_SHA256,
    SOURCE_URI,
)


def square_subject(h=60, w=80):
    """Foreground pure red where a centred 20x20 square has alpha 1, soft 0.5 ring around it."""
    alpha = np.zeros((h, w), np.float32)
    alpha[18:42, 28:52] = 0.5
    alpha[20:40, 30:50] = 1.0
    fg = np.zeros((h, w, 3), np.uint8)
    fg[..., 0] = 255
    return fg, alpha


def test_bbox_half_open():
    _, alpha = square_subject()
    assert subject_bbox(alpha) == (18, 42, 28, 52)
    with pytest.raises(ValueError):
        subject_bbox(np.zeros((4, 4), np.float32))


def test_fit_background_covers_canvas():
    bg = np.arange(20 * 10 * 3, dtype=np.uint8).reshape(20, 10, 3)
    out = fit_background(bg, 30, 40, np.random.default_rng(0))
    assert out.shape == (30, 40, 3)


def test_blend_math_scale_one():
    fg, alpha = square_subject()
    bg = np.full((60, 80, 3), 100, np.uint8)  # uniform, so crop/scale of the background is moot
    comp, placement = composite_subject(fg, alpha, bg, np.random.default_rng(3), scale_min=0.4, scale_max=0.4)
    # The 24 px box becomes 0.4 * 60 = 24 px: scale 1, so alpha is copied exactly.
    assert placement["scale"] == pytest.approx(1.0) and placement["width"] == 24 and placement["height"] == 24
    x, y = placement["x"], placement["y"]
    assert 0 <= x <= 80 - 24 and 0 <= y <= 60 - 24
    core = comp[y + 2 : y + 22, x + 2 : x + 22]
    assert (core == (255, 0, 0)).all()  # alpha 1: pure foreground
    ring = comp[y, x + 12]
    np.testing.assert_array_equal(ring, [178, 50, 50])  # alpha 0.5: 0.5*255 + 0.5*100 = 177.5 -> 178
    outside = np.ones((60, 80), bool)
    outside[y : y + 24, x : x + 24] = False
    assert (comp[outside] == 100).all()  # alpha 0: pure background


def test_subject_never_leaves_canvas_and_scale_follows_range():
    fg, alpha = square_subject()
    bg = np.random.default_rng(0).integers(0, 255, (90, 90, 3), dtype=np.uint8)
    for seed in range(20):
        _, p = composite_subject(fg, alpha, bg, np.random.default_rng(seed), scale_min=0.3, scale_max=0.9)
        assert 0 <= p["x"] and p["x"] + p["width"] <= 80 and 0 <= p["y"] and p["y"] + p["height"] <= 60
        assert 0.3 * 60 - 1 <= max(p["width"], p["height"]) <= 0.9 * 60 + 1


def test_photo_seed_depends_on_all_parts():
    seeds = {photo_seed(0, "ab", 0), photo_seed(1, "ab", 0), photo_seed(0, "ac", 0), photo_seed(0, "ab", 1)}
    assert len(seeds) == 4
    assert photo_seed(0, "ab", 0) == photo_seed(0, "ab", 0)
    assert 0 <= photo_seed(7, "ff", 3) < 2**63


def _batch(tmp_path):
    from PIL import Image

    paths = []
    for i, colour in enumerate([(0, 200, 0), (0, 0, 200)]):
        p = tmp_path / f"bg{i}.png"
        Image.new("RGB", (50, 50), colour).save(p)
        paths.append((f"bg{i}", str(p)))
    fg, alpha = square_subject()
    col = lambda *xs: np.array(xs, dtype=object)  # noqa: E731
    fgs, alphas = np.empty(2, dtype=object), np.empty(2, dtype=object)
    fgs[:] = [fg, np.zeros((1, 1, 3), np.uint8)]
    alphas[:] = [alpha, np.zeros((1, 1), np.float32)]
    batch = {
        SOURCE_URI: col("a.jpg", "b.jpg"),
        SOURCE_SHA256: col("aa", "bb"),
        REJECT_STAGE: col("", "decode"),
        FOREGROUND: fgs,
        ALPHA: alphas,
        "t_decode": np.array([0.5, 0.25]),
    }
    return batch, paths


def test_batch_expands_healthy_rows_and_passes_rejects_once(tmp_path):
    batch, backgrounds = _batch(tmp_path)
    out = composite_batch(batch, backgrounds=backgrounds, per_photo=3, seed=0, scale_min=0.4, scale_max=0.8)
    assert list(out[SOURCE_URI]) == ["a.jpg"] * 3 + ["b.jpg"]
    assert list(out[COMPOSITE_INDEX]) == [0, 1, 2, 0]
    assert all(out[BACKGROUND_ID][i] in ("bg0", "bg1") for i in range(3)) and out[BACKGROUND_ID][3] == ""
    assert len(set(out[SEED][:3])) == 3
    assert out[COMPOSITE][0].shape == (60, 80, 3)
    assert set(json.loads(out[PLACEMENT][0])) == {"x", "y", "width", "height", "scale"}
    # Timings stay per photo: only the first row of each photo carries the composite time.
    assert (out["t_composite"][1:3] == 0).all() and out["t_composite"][0] > 0


def test_batch_is_reproducible(tmp_path):
    batch, backgrounds = _batch(tmp_path)
    a = composite_batch(dict(batch), backgrounds=backgrounds, per_photo=2, seed=5, scale_min=0.4, scale_max=0.8)
    b = composite_batch(dict(batch), backgrounds=backgrounds, per_photo=2, seed=5, scale_min=0.4, scale_max=0.8)
    for i in range(2):
        np.testing.assert_array_equal(a[COMPOSITE][i], b[COMPOSITE][i])
    c = composite_batch(dict(batch), backgrounds=backgrounds, per_photo=2, seed=6, scale_min=0.4, scale_max=0.8)
    assert list(a[SEED][:2]) != list(c[SEED][:2])
