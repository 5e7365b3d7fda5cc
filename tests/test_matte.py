import numpy as np
import pytest

from pipeline.config import MatteConfig
from pipeline.dataplan import gpus_per_segment_actor, matte_stage
from stages.matte import BACKENDS, Matter, matte_batch, matte_pymatting, resolve_backend
from stages.matting_torch import DEFAULT_TOL
from stages.records import ALPHA, FOREGROUND, IMAGE, REJECT_REASON, REJECT_STAGE, SOURCE_URI, TRIMAP, Reject
from tests.matting_fixtures import make_scene


def as_uint8(image):
    return np.round(image * 255.0).astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_form_alpha_against_ground_truth(seed):
    scene = make_scene(96, 96, seed)
    alpha, foreground = matte_pymatting(as_uint8(scene.image), scene.trimap)
    unknown = scene.trimap == 0.5
    assert alpha.dtype == np.float32 and alpha.shape == (96, 96) and 0.0 <= alpha.min() and alpha.max() <= 1.0
    # Known pixels keep their trimap value.
    np.testing.assert_allclose(alpha[scene.trimap == 1.0], 1.0, atol=1e-3)
    np.testing.assert_allclose(alpha[scene.trimap == 0.0], 0.0, atol=1e-3)
    # Closed-form matting is exact for windows that blend two colours; the scene's noise
    # (std 0.01) and 8-bit quantisation leave it 0.017-0.029 off per unknown pixel on these
    # seeds. The bound is 0.05 per unknown pixel (SAD < 0.05 * |unknown|), and SAD below 10%
    # of guessing 0.5 across the band: a solver that ignores colour fails both by far.
    sad = float(np.abs(alpha - scene.alpha).sum())
    assert sad < 0.05 * unknown.sum()
    assert sad < 0.1 * float(np.abs(0.5 - scene.alpha[unknown]).sum())
    # The subject's colours come back within 2/255 on average where it is mostly opaque.
    solid = scene.alpha > 0.5
    assert np.abs(foreground[solid] / 255.0 - scene.foreground[solid]).mean() < 0.02


def test_trimap_without_known_pixels_is_a_reject():
    scene = make_scene(32, 32, 0)
    with pytest.raises(Reject) as info:
        matte_pymatting(as_uint8(scene.image), np.full((32, 32), 0.5, np.float32))
    assert info.value.stage == "matte"


def test_batch_adapter_skips_rejected_rows():
    scene = make_scene(48, 48, 4)
    images, trimaps = np.empty(2, dtype=object), np.empty(2, dtype=object)
    images[:] = [as_uint8(scene.image), np.zeros((1, 1, 3), np.uint8)]
    trimaps[:] = [scene.trimap, np.zeros((1, 1), np.float32)]
    batch = {
        SOURCE_URI: np.array(["a", "b"], dtype=object),
        IMAGE: images,
        TRIMAP: trimaps,
        REJECT_STAGE: np.array(["", "decode"], dtype=object),
        REJECT_REASON: np.array(["", "empty file"], dtype=object),
    }
    out = matte_batch(batch, backend="pymatting")
    assert out[ALPHA][0].shape == (48, 48) and out[FOREGROUND][0].shape == (48, 48, 3)
    assert out[ALPHA][1].shape == (1, 1) and list(out[REJECT_STAGE]) == ["", "decode"]


def test_backend_names():
    assert resolve_backend("pymatting") == "pymatting"
    assert resolve_backend("auto") in ("pymatting", "torch")
    with pytest.raises(ValueError, match="unknown matting backend"):
        resolve_backend("magic")


def test_torch_backend_matches_pymatting_on_cpu():
    scene = make_scene(64, 64, 5)
    image = as_uint8(scene.image)
    alpha_pm, fg_pm = matte_pymatting(image, scene.trimap)
    alpha_t, fg_t = BACKENDS["torch"](image, scene.trimap)
    assert alpha_t.dtype == np.float32 and fg_t.dtype == np.uint8 and fg_t.shape == (64, 64, 3)
    # Issue 8's parity bound for the solver: mean absolute difference below 0.005.
    assert np.abs(alpha_t - alpha_pm).mean() < 0.005
    solid = alpha_pm > 0.5
    assert np.abs(fg_t[solid].astype(int) - fg_pm[solid].astype(int)).mean() < 3


def test_torch_backend_rejects_trimap_without_background():
    scene = make_scene(32, 32, 0)
    trimap = np.where(scene.trimap == 0.0, 0.5, scene.trimap).astype(np.float32)
    with pytest.raises(Reject, match="refused the trimap"):
        BACKENDS["torch"](as_uint8(scene.image), trimap)


def _column(values):
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def test_matter_solves_same_sized_photos_together_like_single_photos():
    scenes = [make_scene(48, 48, seed) for seed in (6, 7, 8)] + [make_scene(40, 56, seed=9)]
    images = [as_uint8(s.image) for s in scenes]
    trimaps = [s.trimap for s in scenes]
    no_background = np.maximum(scenes[0].trimap, 0.5).astype(np.float32)
    batch = {
        SOURCE_URI: np.array(["a", "b", "c", "d", "bad-trimap", "bad-decode"], dtype=object),
        IMAGE: _column([*images, images[0], np.zeros((1, 1, 3), np.uint8)]),
        TRIMAP: _column([*trimaps, no_background, np.zeros((1, 1), np.float32)]),
        REJECT_STAGE: np.array(["", "", "", "", "", "decode"], dtype=object),
        REJECT_REASON: np.array(["", "", "", "", "", "empty file"], dtype=object),
    }
    # batch_size 2: sorted by size, the 40x56 photo shares a padded solve with a 48x48 one.
    out = Matter(batch_size=2)(batch)
    assert list(out[REJECT_STAGE]) == ["", "", "", "", "matte", "decode"]
    assert "no background" in out[REJECT_REASON][4]
    assert out[ALPHA][4].shape == (1, 1) and out["t_matte"].shape == (6,)
    for i, (image, trimap) in enumerate(zip(images, trimaps, strict=True)):
        alpha, foreground = BACKENDS["torch"](image, trimap)
        assert out[ALPHA][i].dtype == np.float32 and out[FOREGROUND][i].dtype == np.uint8
        # Each photo's CG stops on its own residual; a padded batch starts it from another coarse
        # guess, so the answers agree to the solver's tolerance.
        assert np.abs(out[ALPHA][i] - alpha).mean() < 1e-3
        assert np.abs(out[FOREGROUND][i].astype(int) - foreground.astype(int)).max() <= 1


def test_matte_stage_shares_the_gpu_with_clipseg():
    config = MatteConfig()
    gpu = matte_stage(config, cluster_gpus=1)
    assert gpu["fn"] is Matter and gpu["compute"].max_size == 1 and gpu["batch_size"] == 64
    # The actor compiles on a warm-up at the decoded size, not at a size no photo has.
    assert matte_stage(config, cluster_gpus=1, photo_size=384)["fn_constructor_kwargs"]["photo_size"] == 384
    # Both actor pools must fit on one GPU, or the plan waits forever for the second.
    assert gpu["num_gpus"] + gpus_per_segment_actor("auto", gpu["num_gpus"], 1) <= 1.0
    assert matte_stage(config, cluster_gpus=4)["compute"].max_size == 4
    for backend, gpus in (("auto", 0), ("pymatting", 1), ("torch", 0)):
        cpu = matte_stage(MatteConfig(backend=backend), cluster_gpus=gpus)
        assert cpu["fn"] is matte_batch and cpu["batch_size"] == 1 and "num_gpus" not in cpu
        assert cpu["fn_kwargs"]["backend"] == ("pymatting" if backend == "auto" else backend)
    assert gpus_per_segment_actor("auto", 0.0, 1) == 1.0 and gpus_per_segment_actor("auto", 0.0, 0) == 0.0
    # Several CLIPSeg actors share what matting leaves, in Ray's 1e-4 units, so all of them start.
    for actors in range(1, 8):
        share = gpus_per_segment_actor("auto", gpu["num_gpus"], 1, actors)
        assert 0 < share and round(share * 1e4) * actors + round(gpu["num_gpus"] * 1e4) <= 1e4
    assert gpus_per_segment_actor("auto", 0.5, 8, 2) == 0.5  # one per GPU beside its matting actor
    assert gpus_per_segment_actor(0.3, 0.5, 1, 3) == 0.3  # a number is taken as given
    assert config.tol == DEFAULT_TOL  # the config's default is the solver's


def test_matter_splits_a_bundle_into_even_solves(monkeypatch):
    """A bundle of 5 photos at batch_size 4 is two solves of 3 and 2, not 4 and 1 (a batch of one
    solves at a fraction of a full batch's rate); 8 photos are two full batches."""
    sizes = []

    def solve(self, images, trimaps):
        sizes.append(len(images))
        return [
            (np.zeros(t.shape, np.float32), np.zeros(i.shape, np.uint8)) for i, t in zip(images, trimaps, strict=True)
        ]

    monkeypatch.setattr(Matter, "_solve", solve)
    scene = make_scene(48, 48, seed=1)
    for photos, want in ((5, [3, 2]), (8, [4, 4]), (4, [4]), (1, [1])):
        sizes.clear()
        batch = {
            SOURCE_URI: np.array([f"p{i}" for i in range(photos)], dtype=object),
            IMAGE: _column([as_uint8(scene.image)] * photos),
            TRIMAP: _column([scene.trimap] * photos),
            REJECT_STAGE: np.full(photos, "", dtype=object),
            REJECT_REASON: np.full(photos, "", dtype=object),
        }
        out = Matter(batch_size=4, warm_up=False)(batch)
        assert sizes == want and list(out[REJECT_STAGE]) == [""] * photos
