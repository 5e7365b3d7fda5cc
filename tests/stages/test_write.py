import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from stages.composite import COMPOSITE_INDEX
from stages.write import DATA_SCHEMA, REJECT_SCHEMA, encode_batch, encode_image, split_block, to_uint8


def test_png_roundtrip_is_lossless_and_jpeg_is_close():
    arr = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_image(arr)))), arr)
    smooth = np.tile(np.linspace(0, 255, 30, dtype=np.uint8), (20, 1))[..., None].repeat(3, 2)
    back = np.asarray(Image.open(io.BytesIO(encode_image(smooth, "jpeg", 95))), np.int16)
    assert np.abs(back - smooth).mean() < 3


def test_mattes_and_trimaps_roundtrip_exactly():
    # PNG is written with zlib's run-length strategy; whatever the strategy, the decoded matte
    # must be the 8-bit matte that went in: runs of 0 and 255 around a soft band, and a trimap.
    yy, xx = np.mgrid[:64, :96]
    alpha = to_uint8(np.clip(1.5 - np.hypot(yy - 32, xx - 48) / 16, 0, 1))
    trimap = to_uint8(np.where(alpha == 255, 1.0, np.where(alpha == 0, 0.0, 0.5)))
    for matte in (alpha, trimap):
        assert 0 < (matte == 0).mean() < 1 and (matte == 255).any()
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_image(matte)))), matte)


def test_to_uint8_rounds():
    np.testing.assert_array_equal(to_uint8(np.array([0.0, 0.5, 1.0, 1.2, -0.1])), [0, 128, 255, 255, 0])


def test_to_uint8_keeps_levels_that_are_uint8_already():
    # A matte actor that composites on its device sends ALPHA and TRIMAP as uint8: scaling them
    # again would turn every level above 0 into 255.
    levels = np.array([[0, 1, 128, 255]], np.uint8)
    assert to_uint8(levels) is levels


def _encoded_batch():
    obj = lambda *xs: np.array(xs, dtype=object)  # noqa: E731
    rgb = np.empty(3, dtype=object)
    rgb[:] = [np.full((4, 6, 3), 9, np.uint8), np.full((4, 6, 3), 9, np.uint8), np.zeros((1, 1, 3), np.uint8)]
    maps = np.empty(3, dtype=object)
    maps[:] = [np.full((4, 6), 0.5, np.float32), np.full((4, 6), 0.5, np.float32), np.zeros((1, 1), np.float32)]
    batch = {
        "subject_id": obj("dog", "dog", "cat"),
        "category": obj("dog", "dog", "cat"),
        "source_uri": obj("dog/a.jpg", "dog/a.jpg", "cat/b.jpg"),
        "source_sha256": obj("aa", "aa", "bb"),
        "image": rgb,
        "composite": rgb,
        "foreground": rgb,
        "alpha": maps,
        "trimap": maps,
        "background_id": obj("g", "h", ""),
        "seed": np.array([1, 2, 0]),
        COMPOSITE_INDEX: np.array([0, 1, 0]),
        "placement": obj("{}", "{}", ""),
        "width": np.array([6, 6, 0]),
        "height": np.array([4, 4, 0]),
        "alpha_area": np.array([0.5, 0.5, 0.0]),
        "reject_stage": obj("", "", "decode"),
        "reject_reason": obj("", "", "empty file"),
        "t_decode": np.array([0.2, 0.2, 0.1]),
        "t_composite": np.array([0.3, 0.0, 0.0]),
        "confidence": maps,  # an intermediate that must not be published
    }
    return encode_batch(batch, image_format="png", jpeg_quality=95, dataset_version="v0007")


def test_split_block_publishes_schema_counts_and_per_photo_timings():
    table = pa.table(_encoded_batch())
    data, rejects, stats = split_block(table)
    assert data.schema == DATA_SCHEMA and rejects.schema == REJECT_SCHEMA
    assert data.num_rows == 2 and rejects.num_rows == 1
    assert data["dataset_version"].to_pylist() == ["v0007", "v0007"]
    assert rejects.to_pylist()[0] == {
        "source_uri": "cat/b.jpg", "subject_id": "cat", "category": "cat", "source_sha256": "bb",
        "stage": "decode", "reason": "empty file",
    }
    assert stats["rows"] == 2 and stats["accepted"] == 1 and stats["rejected"] == 1
    # Summed over each photo's first row: dog 0.2 + cat 0.1 for decode, 0.3 for composite.
    assert abs(stats["seconds"]["decode"] - 0.3) < 1e-9 and abs(stats["seconds"]["composite"] - 0.3) < 1e-9
    alpha = np.asarray(Image.open(io.BytesIO(data["alpha"][0].as_py())))
    assert alpha.shape == (4, 6) and (alpha == 128).all()


def test_encoded_rows_survive_a_parquet_roundtrip(tmp_path):
    data, _, _ = split_block(pa.table(_encoded_batch()))
    pq.write_table(data, tmp_path / "x.parquet")
    back = pq.read_table(tmp_path / "x.parquet")
    assert back.schema == DATA_SCHEMA and back.num_rows == 2
    img = Image.open(io.BytesIO(back["image"][0].as_py()))
    assert img.size == (6, 4)


def test_each_row_gets_its_own_photos_target_and_its_own_composite():
    # Photo a has two composite rows, photo b one; the target, alpha and trimap are encoded once
    # per photo, so a mix-up between photos or composites would show here.
    obj = lambda *xs: np.array(xs, dtype=object)  # noqa: E731
    pixels = lambda v: np.full((4, 6, 3), v, np.uint8)  # noqa: E731
    images, composites, alphas = (np.empty(3, dtype=object) for _ in range(3))
    images[:] = [pixels(10), pixels(10), pixels(200)]
    composites[:] = [pixels(1), pixels(2), pixels(3)]
    alphas[:] = [np.full((4, 6), 0.2, np.float32), np.full((4, 6), 0.2, np.float32), np.full((4, 6), 1.0, np.float32)]
    batch = {
        "source_uri": obj("s/a.jpg", "s/a.jpg", "s/b.jpg"), "image": images, "composite": composites,
        "foreground": composites[[0, 0, 2]], "alpha": alphas, "trimap": alphas, "reject_stage": obj("", "", ""), "reject_reason": obj("", "", ""),
    }
    out = encode_batch(batch, image_format="png", jpeg_quality=95, dataset_version="v1")
    decode = lambda b: np.asarray(Image.open(io.BytesIO(b)))  # noqa: E731
    assert [decode(b)[0, 0, 0] for b in out["image"]] == [10, 10, 200]
    assert [decode(b)[0, 0, 0] for b in out["composite"]] == [1, 2, 3]
    assert [decode(b)[0, 0] for b in out["alpha"]] == [51, 51, 255]
    assert [decode(b)[0, 0, 0] for b in out["foreground"]] == [1, 1, 3]
