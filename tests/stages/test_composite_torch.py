"""The torch composite (stages.composite_torch) against the PIL one
(paste_subject, as composite_batch runs it): the same draws, and pixels a level apart at most."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.backgrounds import list_backgrounds
from stages.composite import composite_batch, covered_background, draw_composites, subject_bbox
from stages.composite_torch import (
    PasteJob,
    Subject,
    composite_photos_torch,
    composite_subjects_torch,
    resample_weights,
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
from tests.matting_fixtures import make_alpha

SAMPLE = Path(__file__).resolve().parents[2] / "datasets" / "dreambench-mini"


def real_photos(count: int, size: int) -> list[np.ndarray]:
    """The first photo of each of `count` DreamBench-mini subjects, at size x size."""
    folders = sorted(p for p in SAMPLE.iterdir() if p.is_dir())[:count]
    return [np.asarray(Image.open(sorted(f.glob("*.jpg"))[0]).convert("RGB").resize((size, size))) for f in folders]


def torch_composites(photos, alphas, sha256s, **composite_args):
    """The composites of all photos as the matte actor that composites makes them
    (composite_photos_torch, on the CPU here): their draws and pixels, in order."""
    pairs = enumerate(zip(alphas, sha256s, strict=True))
    subjects = [Subject(j, sha256, subject_bbox(alpha)) for j, (alpha, sha256) in pairs]
    made = composite_photos_torch(
        torch.from_numpy(np.stack(photos)),
        torch.from_numpy(np.stack(alphas)),
        subjects,
        lambda path, height, width: torch.tensor(covered_background(path, height, width)),
        **composite_args,
    )
    return [d for photo in made for d, _ in photo], [pixels.numpy() for photo in made for _, pixels in photo]


def test_torch_composites_match_pil_on_real_photos():
    """DreamBench-mini photos as the foreground, a soft blob as the matte (a 6 px edge ramp, so
    the resized alpha takes every value in (0, 1)), scales from 0.2 to 1 of the canvas, so that
    subjects shrink up to 3x and grow up to 1.5x.

    The resize is PIL's: the same weights, horizontal pass first, each pass rounded to 8 bits.
    What differs is the arithmetic: PIL sums in 22-bit fixed point and rounds halves up, torch
    in float32, so where a pass lands within float32's error of a half level the two round
    apart, and the vertical pass can carry that level on to 2. Measured: here (8 photos at 256
    px, 24 composites) 1.1e-5 of the bytes differ, all by 1; over 41 photos x 4 composites at
    512 px, 2e-5 of them, by 1 and a few by 2. The bounds (mean 0.005 levels, max 2, 1e-3 of
    the bytes) are loose on that and tight on a wrong resize: an unstretched (aliasing)
    Lanczos gives a mean of 0.07, float passes without the rounding between them 0.05, Lanczos
    for the alpha 0.03, and PIL's own BICUBIC is 0.2-1.5 levels from its LANCZOS on average
    over a subject box (checked below)."""
    photos = real_photos(8, 256)
    alphas = [make_alpha(256, 256, np.random.default_rng(n), edge_px=6.0) for n in range(len(photos))]
    sha256s = [f"{n:064x}" for n in range(len(photos))]
    args = {"backgrounds": list_backgrounds(None), "per_photo": 3, "seed": 0, "scale_min": 0.2, "scale_max": 1.0}
    batch = {
        SOURCE_URI: np.array([f"p{n}" for n in range(len(photos))], dtype=object),
        SOURCE_SHA256: np.array(sha256s, dtype=object),
        REJECT_STAGE: np.full(len(photos), "", dtype=object),
        FOREGROUND: np.stack(photos),
        ALPHA: np.stack(alphas),
    }
    pil = composite_batch(batch, **args)
    draws, pixels = torch_composites(photos, alphas, sha256s, **args)

    assert len(draws) == len(pil[COMPOSITE]) == 3 * len(photos)
    scales = [d.placement.scale for d in draws]
    assert min(scales) < 0.5 and max(scales) > 1.2  # both ways
    for row, (d, got) in enumerate(zip(draws, pixels, strict=True)):
        assert (d.seed, d.background_id) == (pil[SEED][row], pil[BACKGROUND_ID][row])
        assert json.loads(pil[PLACEMENT][row]) == d.placement.as_dict()
        assert got.dtype == np.uint8 and got.shape == (256, 256, 3)
    diff = np.abs(np.stack(pixels).astype(int) - np.stack(list(pil[COMPOSITE])).astype(int))
    assert diff.mean() < 0.005 and diff.max() <= 2 and (diff > 0).mean() < 1e-3

    # The bounds catch a wrong filter: PIL's BICUBIC in place of LANCZOS is well outside them.
    d, photo = draws[0], photos[0]
    top, bottom, left, right = subject_bbox(alphas[0])
    size = (d.placement.width, d.placement.height)
    box = Image.fromarray(photo[top:bottom, left:right])
    lanczos, bicubic = (np.asarray(box.resize(size, f), int) for f in (Image.LANCZOS, Image.BICUBIC))
    assert np.abs(lanczos - bicubic).mean() > 0.05 and np.abs(lanczos - bicubic).max() > 2


def test_resample_weights_are_antialiased_and_normalised():
    shrink = resample_weights(400, 100, "lanczos3")
    assert shrink.shape == (100, 400) and np.allclose(shrink.sum(axis=1), 1.0)
    # A 4x shrink stretches the 6-pixel Lanczos-3 window to 24 input pixels (antialiasing).
    assert (np.abs(shrink[50]) > 1e-12).sum() == 24
    assert (resample_weights(100, 400, "triangle")[200] > 0).sum() == 2  # growing: plain interpolation
    np.testing.assert_array_equal(resample_weights(37, 37, "lanczos3"), np.eye(37))
    with pytest.raises(ValueError):
        resample_weights(10, 5, "lanczos3")[0, 0] = 1.0  # shared through the cache: read-only


def test_torch_composite_takes_lists_of_mixed_sizes_and_float_levels():
    """A batch of photos of different sizes comes as lists; a foreground of float levels gives the
    bytes of the uint8 one; a subject at the canvas' edge and a box kept at its size paste whole."""
    gen = np.random.default_rng(0)
    shapes = [(48, 64), (70, 50)]
    photos = [gen.integers(0, 256, (*s, 3), dtype=np.uint8) for s in shapes]
    alphas = [np.zeros(s, np.float32) for s in shapes]
    alphas[0][0:30, 40:64] = 1.0  # touches the top and right edges
    alphas[1][10:60, 5:45] = gen.uniform(0, 1, (50, 40)).astype(np.float32)
    args = {"backgrounds": list_backgrounds(None), "per_photo": 2, "seed": 3, "scale_min": 0.2, "scale_max": 1.0}
    jobs = []
    for j, alpha in enumerate(alphas):
        bbox = subject_bbox(alpha)
        for d in draw_composites(f"{j}", *alpha.shape, bbox, **args):
            jobs.append(
                PasteJob(j, bbox, d.placement, torch.tensor(covered_background(d.background_path, *alpha.shape)))
            )
    as_uint8 = composite_subjects_torch(
        [torch.from_numpy(p) for p in photos], [torch.from_numpy(a) for a in alphas], jobs
    )
    as_float = composite_subjects_torch(
        [torch.from_numpy(p).float() for p in photos], [torch.from_numpy(a) for a in alphas], jobs
    )
    assert [tuple(c.shape) for c in as_uint8] == [(48, 64, 3)] * 2 + [(70, 50, 3)] * 2
    for a, b in zip(as_uint8, as_float, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Outside the pasted box, the composite is the background crop, untouched.
    job, composite = jobs[0], as_uint8[0].numpy()
    p = job.placement
    crop = job.background[p.crop_top : p.crop_top + 48, p.crop_left : p.crop_left + 64].numpy()
    outside = np.ones((48, 64), bool)
    outside[p.y : p.y + p.height, p.x : p.x + p.width] = False
    np.testing.assert_array_equal(composite[outside], crop[outside])
    assert composite_subjects_torch([], [], []) == []


def test_device_weights_equal_the_host_ones() -> None:
    """resample_weights_torch (all of a batch's composites at once, on the device) against
    resample_weights, for shrinking, growing and same-size axes in one batch."""
    from stages.composite_torch import resample_weights, resample_weights_torch

    pairs = [(300, 123), (40, 97), (64, 64), (511, 500), (1, 5)]
    for kernel in ("lanczos3", "triangle"):
        batch = resample_weights_torch([p[0] for p in pairs], [p[1] for p in pairs], kernel, torch.device("cpu"))
        assert batch.shape == (len(pairs), 500, 511)
        for j, (size, out) in enumerate(pairs):
            expected = resample_weights(size, out, kernel).astype(np.float32)
            np.testing.assert_allclose(batch[j, :out, :size].numpy(), expected, rtol=0, atol=1e-7)
            assert not batch[j, out:].any() and not batch[j, :, size:].any()
