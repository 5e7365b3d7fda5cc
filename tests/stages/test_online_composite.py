"""Online composites: seeded by (run seed, epoch, row), the composite stage's draws and pixels,
and the stored cutout reproduces the stored composite."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.data.backgrounds import list_backgrounds
from pipeline.data.build import process_photos
from pipeline.data.sources import SourcePhoto, sha256_file
from stages.composite import COMPOSITE_INDEX, covered_background, draw_composite, paste_subject, subject_bbox
from stages.online_composite import OnlineCompositor, epoch_seed, row_key, to_unit
from stages.records import ALPHA, BACKGROUND_ID, COMPOSITE, FOREGROUND, PLACEMENT, SEED, SOURCE_SHA256, SOURCE_URI
from tests.imagefiles import SAMPLE


def _cutouts(n=3, h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    fgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]
    alphas = []
    for i in range(n):
        a = np.zeros((h, w), np.uint8)
        a[5 + i : 30, 8 : 40 + i] = 255
        a[4 + i, 8 : 40 + i] = 128  # a soft edge
        alphas.append(a)
    return fgs, alphas


def test_same_seed_epoch_and_row_give_the_same_composite_another_epoch_another():
    fgs, alphas = _cutouts()
    keys = [row_key(f"{i:064x}", 0) for i in range(3)]
    backgrounds = list_backgrounds(None)
    one = OnlineCompositor(backgrounds, seed=5, scale_min=0.3, scale_max=0.9)
    again = OnlineCompositor(backgrounds, seed=5, scale_min=0.3, scale_max=0.9)  # another process, a resumed run
    epoch1 = one.composites(fgs, alphas, keys, [1, 1, 1])
    for a, b in zip(epoch1, again.composites(fgs, alphas, keys, [1, 1, 1]), strict=True):
        np.testing.assert_array_equal(a, b)
    # Row 1 alone, in another batch: the same composite.
    np.testing.assert_array_equal(again.composites(fgs[1:2], alphas[1:2], keys[1:2], [1])[0], epoch1[1])
    for a, b in zip(epoch1, one.composites(fgs, alphas, keys, [2, 2, 2]), strict=True):
        assert not np.array_equal(a, b)
    other_seed = OnlineCompositor(backgrounds, seed=6, scale_min=0.3, scale_max=0.9).composites(fgs, alphas, keys, [1, 1, 1])
    assert not any(np.array_equal(a, b) for a, b in zip(epoch1, other_seed, strict=True))
    assert epoch_seed(5, 1, keys[0]) != epoch_seed(5, 2, keys[0]) != epoch_seed(6, 1, keys[0])


def test_the_torch_pixels_follow_the_pil_ones():
    """The GPU path (composite_subjects_torch), run on the CPU: the same draws, a level apart at most."""
    fgs, alphas = _cutouts(seed=1)
    comp = OnlineCompositor(list_backgrounds(None), seed=0, scale_min=0.3, scale_max=0.9)
    units = [to_unit(a) for a in alphas]
    draws = [(subject_bbox(a), draw_composite(0, 11 + i, *a.shape, subject_bbox(a), comp.backgrounds, 0.3, 0.9))
             for i, a in enumerate(units)]
    pil = [paste_subject(fg, a, covered_background(d.background_path, *a.shape), bbox, d.placement)
           for fg, a, (bbox, d) in zip(fgs, units, draws, strict=True)]
    for a, b in zip(pil, comp._torch_pixels(fgs, units, draws), strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


@pytest.fixture(scope="module")
def built_rows():
    """A few sample photos through the build's stages in this process (no Ray), PNG-encoded."""
    config = load_config(overrides=["profile=tiny", "data.decode.size=96", "data.write.image_format=png"])
    paths = sorted((SAMPLE / "dog").glob("*.jpg"))[:2] + sorted((SAMPLE / "cat").glob("*.jpg"))[:1]
    photos = [SourcePhoto(p.parent.name, p.parent.name, f"{p.parent.name}/{p.name}", str(p), sha256_file(p)) for p in paths]
    rows, rejects = process_photos(photos, config, "v-test")
    return config, photos, rows, rejects


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_rows_carry_the_cutout_and_every_input_is_accounted_for(built_rows):
    config, photos, rows, rejects = built_rows
    accepted = {r[SOURCE_URI] for r in rows.to_pylist()}
    assert len(accepted) + rejects.num_rows == len(photos) and not accepted & set(rejects[SOURCE_URI].to_pylist())
    assert rows.num_rows == len(accepted) * config.data.composite.per_photo
    for row in rows.to_pylist():
        fg, alpha = _decode(row[FOREGROUND]), _decode(row[ALPHA])
        assert fg.shape == (*alpha.shape, 3) == _decode(row["image"]).shape


def test_the_cutout_at_the_stored_placement_is_the_stored_composite(built_rows):
    config, _, rows, _ = built_rows
    c = config.data.composite
    backgrounds = list_backgrounds(None)
    assert rows.num_rows
    for row in rows.to_pylist():
        fg, alpha = _decode(row[FOREGROUND]), to_unit(_decode(row[ALPHA]))
        bbox = subject_bbox(alpha)
        d = draw_composite(row[COMPOSITE_INDEX], row[SEED], *alpha.shape, bbox, backgrounds, c.scale_min, c.scale_max)
        assert json.loads(row[PLACEMENT]) == d.placement.as_dict() and d.background_id == row[BACKGROUND_ID]
        again = paste_subject(fg, alpha, covered_background(d.background_path, *alpha.shape), bbox, d.placement)
        assert np.abs(again.astype(int) - _decode(row[COMPOSITE]).astype(int)).max() <= 1
        assert row_key(row[SOURCE_SHA256], row[COMPOSITE_INDEX]) > 0


def test_feed_columns_of_a_built_row_make_a_composite(built_rows):
    """prepare_cutout_batch's output as Arrow (what the collate gets) round-trips the cutout."""
    from stages.online_composite import ROW_KEY, prepare_cutout_batch

    _, _, rows, _ = built_rows
    batch = {name: np.asarray(rows.column(name).to_pylist(), dtype=object) for name in rows.column_names}
    out = prepare_cutout_batch(batch, resolution=64, crop="center")
    assert out["target"].shape == (rows.num_rows, 3, 64, 64) and len(set(out[ROW_KEY])) == rows.num_rows
    assert out[FOREGROUND][0].dtype == np.uint8 and out[ALPHA][0].ndim == 2
    assert pa.array(out[ROW_KEY]).type == pa.int64()
    assert COMPOSITE not in out
