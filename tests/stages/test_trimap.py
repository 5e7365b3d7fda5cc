import numpy as np
import pytest
from scipy import ndimage

from stages.records import Reject
from stages.trimap import BACKGROUND, FOREGROUND, UNKNOWN, check_trimap, make_trimap


def ramp(n=41):
    return np.tile(np.linspace(0.0, 1.0, n, dtype=np.float32), (n, 1))


def test_thresholds_without_erosion():
    conf = ramp()
    tri = make_trimap(conf, high=0.6, low=0.3, erode_fg_px=0, erode_bg_px=0)
    assert tri.dtype == np.float32 and tri.shape == conf.shape
    assert set(np.unique(tri)) == {BACKGROUND, UNKNOWN, FOREGROUND}
    np.testing.assert_array_equal(tri == FOREGROUND, conf >= 0.6)
    np.testing.assert_array_equal(tri == BACKGROUND, conf <= 0.3)


def test_erosion_widens_the_unknown_band_by_the_radius():
    conf = ramp()
    plain = make_trimap(conf, high=0.6, low=0.3, erode_fg_px=0, erode_bg_px=0)
    eroded = make_trimap(conf, high=0.6, low=0.3, erode_fg_px=2, erode_bg_px=3)
    # The ramp varies along columns only: each region loses exactly `radius` columns at its
    # inner edge, and nothing at the photo border.
    fg_cols = lambda t: int((t[20] == FOREGROUND).sum())  # noqa: E731
    bg_cols = lambda t: int((t[20] == BACKGROUND).sum())  # noqa: E731
    assert fg_cols(plain) - fg_cols(eroded) == 2
    assert bg_cols(plain) - bg_cols(eroded) == 3
    assert eroded[0, -1] == FOREGROUND and eroded[0, 0] == BACKGROUND


def test_bad_thresholds_raise():
    with pytest.raises(ValueError):
        make_trimap(ramp(), high=0.2, low=0.5)


def test_no_foreground_is_a_reject_with_the_peak():
    conf = np.full((20, 20), 0.1, np.float32)
    tri = make_trimap(conf, high=0.5, low=0.2)
    with pytest.raises(Reject, match="no foreground.*peaks at 0.10") as info:
        check_trimap(tri, conf, "dog", 0.5, 0.2)
    assert info.value.stage == "trimap"


def test_thin_foreground_vanishing_under_erosion_says_so():
    conf = np.zeros((30, 30), np.float32)
    conf[15, 10:20] = 0.9  # a one-pixel line
    tri = make_trimap(conf, high=0.5, low=0.2, erode_fg_px=1, erode_bg_px=0)
    with pytest.raises(Reject, match="vanished under erosion"):
        check_trimap(tri, conf, "dog", 0.5, 0.2)


def test_subject_filling_the_photo_is_a_reject():
    conf = np.full((20, 20), 0.9, np.float32)
    with pytest.raises(Reject, match="no background"):
        check_trimap(make_trimap(conf), conf, "dog", 0.5, 0.2)


@pytest.mark.parametrize("radius", [0, 1, 3, 6])
def test_torch_erosion_and_trimaps_equal_scipys(radius: int) -> None:
    """erode_torch / make_trimap_torch (what the CLIPSeg actor runs on its GPU) against the
    scipy ones, on blobs that touch the border, speckle and empty and full masks."""
    import torch

    from stages.trimap import _erode, erode_torch, make_trimap_torch

    rng = np.random.default_rng(radius)
    blobs = ndimage.gaussian_filter(rng.random((3, 61, 47)), (0, 4, 4))
    masks = [blobs[0] > blobs[0].mean(), rng.random((61, 47)) > 0.2, np.zeros((61, 47), bool), np.ones((61, 47), bool)]
    ours = erode_torch(torch.from_numpy(np.stack(masks)), radius).numpy()
    for mine, mask in zip(ours, masks, strict=True):
        np.testing.assert_array_equal(mine, _erode(mask, radius))
    confidence = (blobs - blobs.min()) / (blobs.max() - blobs.min())
    settings = {"high": 0.6, "low": 0.3, "erode_fg_px": radius, "erode_bg_px": radius + 1}
    trimaps = make_trimap_torch(torch.from_numpy(confidence.astype(np.float32)), **settings).numpy()
    for made, conf in zip(trimaps, confidence.astype(np.float32), strict=True):
        np.testing.assert_array_equal(made, make_trimap(conf, **settings))
