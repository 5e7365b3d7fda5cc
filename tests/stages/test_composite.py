import json

import numpy as np
import pytest

from stages.composite import (
    COMPOSITE_INDEX,
    composite_batch,
    composite_subject,
    cover_background,
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


def _float_canvas_composite(foreground, alpha, background, rng, scale_min, scale_max):
    """The blend as first written: the whole background resized and cropped through PIL, blended
    on a float32 canvas, the canvas rounded. composite_subject must give the same bytes."""
    from PIL import Image

    height, width = alpha.shape
    bh, bw = background.shape[:2]
    scale = max(height / bh, width / bw)
    nh, nw = max(height, round(bh * scale)), max(width, round(bw * scale))
    img = Image.fromarray(background)
    if (nh, nw) != (bh, bw):
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    top, left = int(rng.integers(0, nh - height + 1)), int(rng.integers(0, nw - width + 1))
    canvas = np.asarray(img)[top : top + height, left : left + width].astype(np.float32)
    rows = np.flatnonzero((alpha > 0.01).any(axis=1))
    cols = np.flatnonzero((alpha > 0.01).any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    target = rng.uniform(scale_min, scale_max) * min(height, width)
    s = min(target / max(y1 - y0, x1 - x0), height / (y1 - y0), width / (x1 - x0))
    new_h, new_w = max(1, round((y1 - y0) * s)), max(1, round((x1 - x0) * s))
    fg = Image.fromarray(foreground[y0:y1, x0:x1]).resize((new_w, new_h), Image.Resampling.LANCZOS)
    a = Image.fromarray(alpha[y0:y1, x0:x1].astype(np.float32), mode="F").resize(
        (new_w, new_h), Image.Resampling.BILINEAR
    )
    y, x = int(rng.integers(0, height - new_h + 1)), int(rng.integers(0, width - new_w + 1))
    a_arr = np.clip(np.asarray(a, np.float32), 0.0, 1.0)[..., None]
    region = canvas[y : y + new_h, x : x + new_w]
    canvas[y : y + new_h, x : x + new_w] = a_arr * np.asarray(fg, np.float32) + (1.0 - a_arr) * region
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), (x, y, new_w, new_h)


@pytest.mark.parametrize(
    "photo_shape, background_shape",
    [((64, 64), (64, 64)), ((60, 80), (50, 50)), ((96, 72), (200, 130)), ((48, 64), (48, 200))],
)
def test_blend_gives_the_bytes_of_a_float_canvas(photo_shape, background_shape):
    # Noise everywhere, and a soft matte with values all through (0, 1), so any change in the
    # arithmetic or in the order of the random draws shows up as a different byte.
    gen = np.random.default_rng(1)
    h, w = photo_shape
    fg = gen.integers(0, 256, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    alpha = np.clip(1.3 - np.hypot((yy - h / 2) / h, (xx - w / 2) / w) * 3.5, 0, 1).astype(np.float32)
    alpha *= gen.uniform(0.9, 1.0, alpha.shape).astype(np.float32)
    bg = gen.integers(0, 256, (*background_shape, 3), dtype=np.uint8)
    for seed in range(12):
        want, (x, y, bw, bh) = _float_canvas_composite(fg, alpha, bg, np.random.default_rng(seed), 0.3, 0.95)
        got, p = composite_subject(fg, alpha, bg, np.random.default_rng(seed), scale_min=0.3, scale_max=0.95)
        assert (p["x"], p["y"], p["width"], p["height"]) == (x, y, bw, bh)
        np.testing.assert_array_equal(got, want)


def test_a_covered_background_crops_like_the_original():
    gen = np.random.default_rng(0)
    for bg_shape, canvas in [((50, 50), (60, 80)), ((200, 130), (96, 72)), ((48, 200), (48, 64)), ((64, 64), (64, 64))]:
        bg = gen.integers(0, 256, (*bg_shape, 3), dtype=np.uint8)
        covered = cover_background(bg, *canvas)
        assert cover_background(covered, *canvas) is covered  # covering twice resizes once
        for seed in range(5):
            np.testing.assert_array_equal(
                fit_background(covered, *canvas, np.random.default_rng(seed)),
                fit_background(bg, *canvas, np.random.default_rng(seed)),
            )


def test_batch_composites_equal_single_ones_and_stacked_columns_are_not_copied(tmp_path):
    """What composite_batch makes (cached, covered backgrounds; one bbox per photo) equals
    composite_subject on the background file as loaded; a stacked column, as Ray hands over
    same-shape arrays, gives the same rows as an object column, with views instead of copies;
    FOREGROUND stays on every row (the cutout)."""
    from PIL import Image

    from stages.composite import load_background
    from stages.records import IMAGE

    gen = np.random.default_rng(3)
    paths = []
    for i, shape in enumerate([(50, 50), (120, 90), (70, 200)]):
        p = tmp_path / f"bg{i}.png"
        Image.fromarray(gen.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(p)
        paths.append((f"bg{i}", str(p)))
    n, h, w = 3, 60, 80
    fg = gen.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    _, one_alpha = square_subject(h, w)
    alpha = np.stack([one_alpha] * n)
    stacked = {
        SOURCE_URI: np.array(["a", "b", "c"], dtype=object),
        SOURCE_SHA256: np.array(["aa", "bb", "cc"], dtype=object),
        REJECT_STAGE: np.array(["", "", ""], dtype=object),
        IMAGE: fg,
        FOREGROUND: fg,
        ALPHA: alpha,
    }
    objects = dict(stacked)
    for name in (IMAGE, FOREGROUND, ALPHA):
        objects[name] = np.empty(n, dtype=object)
        objects[name][:] = list(stacked[name])
    kwargs = dict(backgrounds=paths, per_photo=2, seed=4, scale_min=0.3, scale_max=0.9)
    a = composite_batch(dict(stacked), **kwargs)
    b = composite_batch(objects, **kwargs)
    for row in range(2 * n):
        np.testing.assert_array_equal(a[FOREGROUND][row], fg[row // 2])
    assert list(a[SOURCE_URI]) == ["a", "a", "b", "b", "c", "c"]
    for row in range(2 * n):
        np.testing.assert_array_equal(a[COMPOSITE][row], b[COMPOSITE][row])
        assert a[PLACEMENT][row] == b[PLACEMENT][row] and a[BACKGROUND_ID][row] == b[BACKGROUND_ID][row]
        assert np.shares_memory(a[IMAGE][row], fg)  # a view of the photo, not a K-fold copy
        photo = row // 2
        rng = np.random.default_rng(a[SEED][row])
        background_id, path = paths[int(rng.integers(len(paths)))]
        want, placement = composite_subject(
            fg[photo], alpha[photo], load_background(path), rng, scale_min=0.3, scale_max=0.9
        )
        assert background_id == a[BACKGROUND_ID][row] and json.loads(a[PLACEMENT][row]) == placement
        np.testing.assert_array_equal(a[COMPOSITE][row], want)


def test_a_16_bit_background_is_scaled_not_clipped_to_white(tmp_path):
    # PIL's convert("RGB") clips 16-bit gray at 255: a plain --backgrounds folder's 16-bit PNG
    # was pasted as a white background, while the same photo as a subject photo decodes right.
    from PIL import Image

    from stages.composite import load_background

    gray = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)
    Image.fromarray(gray).save(tmp_path / "deep.png")
    loaded = load_background(str(tmp_path / "deep.png"))
    assert loaded.shape == (64, 64, 3)
    np.testing.assert_array_equal(loaded[..., 1], np.rint(gray / 257).astype(np.uint8))
