import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ConfigError, MatteConfig
from pipeline.data.plan import Cluster, gpus_per_segment_actor, matte_backend, matte_stage
from stages.matte import BACKENDS, Matter, matte_batch, matte_pymatting
from stages.matte_composite import MatteFilterComposite
from stages.matting import DEFAULT_TOL
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
    assert matte_backend("pymatting", 1) == "pymatting" and matte_backend("torch", 0) == "torch"
    assert matte_backend("auto", 0) == "pymatting" and matte_backend("auto", 1) == "torch"
    with pytest.raises(ValueError, match="unknown matting backend"):
        matte_batch({}, backend="magic")


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
    gpu = matte_stage(config, Cluster(cpus=16, gpus=1))
    assert gpu.fn is MatteFilterComposite and gpu.actors == 3 and gpu.batch_size == 64
    # The actor compiles on a warm-up at the decoded size, not at a size no photo has.
    assert matte_stage(config, Cluster(cpus=16, gpus=1), photo_size=384).args["photo_size"] == 384
    # Both actor pools must fit on one GPU, or the plan waits forever for the second.
    assert 3 * gpu.num_gpus + gpus_per_segment_actor("auto", gpu.num_gpus, 1, 1, matte_actors=3) <= 1.0
    assert matte_stage(config, Cluster(cpus=64, gpus=4)).actors == 12
    assert matte_stage(MatteConfig(num_actors=2), Cluster(cpus=64, gpus=4)).actors == 2
    for backend, gpus in (("auto", 0), ("pymatting", 1), ("torch", 0)):
        cpu = matte_stage(MatteConfig(backend=backend), Cluster(cpus=16, gpus=gpus))
        assert cpu.fn is matte_batch and cpu.batch_size == 1 and cpu.actors == 0 and cpu.num_gpus == 0
        assert cpu.args["backend"] == ("pymatting" if backend == "auto" else backend)
    # In one process (process_photos) there are no actors: torch on the GPU, photo by photo.
    here = matte_stage(MatteConfig(), Cluster(cpus=1, gpus=1, pools=False))
    assert here.fn is matte_batch and here.args["backend"] == "torch"
    assert gpus_per_segment_actor("auto", 0.0, 1) == 1.0 and gpus_per_segment_actor("auto", 0.0, 0) == 0.0
    # Several CLIPSeg actors share what matting leaves, in Ray's 1e-4 units, so all of them start.
    for actors in range(1, 8):
        share = gpus_per_segment_actor("auto", gpu.num_gpus, 1, actors, matte_actors=3)
        assert 0 < share and round(share * 1e4) * actors + 3 * round(gpu.num_gpus * 1e4) <= 1e4
    assert gpus_per_segment_actor("auto", 0.5, 8, 2) == 0.5  # one per GPU beside its matting actor
    assert gpus_per_segment_actor(0.1, 0.5, 1, 3) == 0.1  # a number is taken as given
    # Two matting actors at 0.3 on one GPU leave 0.4 for three CLIPSeg actors, not 0.7: the
    # second matting actor waited for the CLIPSeg actors to finish (GPU run, 8,192 photos).
    assert gpus_per_segment_actor("auto", 0.3, 1, 3, matte_actors=2) == 0.1333
    # Shares pack per GPU: 3 CLIPSeg actors on 2 GPUs put two on one GPU beside its matting actor.
    assert gpus_per_segment_actor("auto", 0.4, 2, 3, matte_actors=2) == 0.3
    for setting, matte_actors in (("auto", 2), (0.3, 1)):  # matting alone fills the GPU; 0.5 + 3 x 0.3 > 1
        with pytest.raises(ConfigError, match="ask for more than a GPU"):
            gpus_per_segment_actor(setting, 0.5, 1, 3, matte_actors=matte_actors)
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


def test_matter_halves_a_solve_that_runs_out_of_device_memory(monkeypatch):
    """A solve of more than `fits` photos raises CUDA's out-of-memory error: the actor halves it
    until it fits, every photo is still solved once and in its own row, later batches start at
    the size that fitted, and a photo that does not fit alone is an error, not a reject."""
    sizes, fits = [], 2

    def solve(self, images, trimaps):
        sizes.append(len(images))
        if len(images) > fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return [(np.full(t.shape, float(i[0, 0, 0]), np.float32), i.copy()) for i, t in zip(images, trimaps, strict=True)]

    monkeypatch.setattr(Matter, "_solve", solve)
    scene = make_scene(24, 24, seed=1)

    def batch_of(photos):
        images = [np.full_like(as_uint8(scene.image), n) for n in range(photos)]
        return {
            SOURCE_URI: np.array([f"p{i}" for i in range(photos)], dtype=object),
            IMAGE: _column(images),
            TRIMAP: _column([scene.trimap] * photos),
            REJECT_STAGE: np.full(photos, "", dtype=object),
            REJECT_REASON: np.full(photos, "", dtype=object),
        }

    matter = Matter(batch_size=4, warm_up=False)
    out = matter(batch_of(5))
    assert sizes == [3, 2, 1, 2] and matter.batch_size == 2
    assert list(out[REJECT_STAGE]) == [""] * 5
    assert [float(a[0, 0]) for a in out[ALPHA]] == [0.0, 1.0, 2.0, 3.0, 4.0]  # each photo's own alpha
    sizes.clear()
    matter(batch_of(4))
    assert sizes == [2, 2]
    fits = 0
    with pytest.raises(torch.cuda.OutOfMemoryError):
        matter(batch_of(2))


def test_a_finishing_matter_gives_the_rows_of_the_filter_and_composite_stages(monkeypatch):
    """MatteFilterComposite filters and composites on its device; its rows are those of the plain
    actor followed by filter_batch and composite_batch: the same rows in the same order, the
    same rejects and reasons (trimap refused, alpha diverged, filter, decode), the same draws,
    ALPHA and TRIMAP as the writer's uint8 levels, composites a level or two apart (the torch
    composite: tests/stages/test_composite_torch.py), and once encoded the same published bytes but
    for the composites."""
    import stages.matting as matting
    from pipeline.data.backgrounds import list_backgrounds
    from stages.composite import composite_batch
    from stages.filter import filter_batch
    from stages.records import ALPHA_AREA, COMPOSITE, PLACEMENT, SOURCE_SHA256
    from stages.write import encode_batch, to_uint8

    solve = matting.estimate_alpha_cf_torch

    def first_photo_diverges(images, trimaps, **kwargs):
        alpha = solve(images, trimaps, **kwargs)
        alpha[0] = torch.full_like(alpha[0], float("nan"))  # the first of every solve (a list or a stack)
        return alpha

    monkeypatch.setattr(matting, "estimate_alpha_cf_torch", first_photo_diverges)
    scenes = [make_scene(48, 48, seed) for seed in (6, 7, 8, 10)] + [make_scene(40, 56, seed=9)]
    images = [as_uint8(s.image) for s in scenes]
    trimaps = [s.trimap for s in scenes]
    speck = np.zeros((48, 48), np.float32)
    speck[20:23, 20:23] = 1.0  # a 9-pixel subject: the filter's "too small"
    uris = ["a", "b", "c", "d", "e", "speck", "no-background", "bad-decode"]
    n = len(uris)
    batch = {
        SOURCE_URI: np.array(uris, dtype=object),
        SOURCE_SHA256: np.array([f"{i:02x}" * 32 for i in range(n)], dtype=object),
        IMAGE: _column([*images, images[0], images[0], np.zeros((1, 1, 3), np.uint8)]),
        TRIMAP: _column([*trimaps, speck, np.maximum(trimaps[0], 0.5), np.zeros((1, 1), np.float32)]),
        REJECT_STAGE: np.array([""] * (n - 1) + ["decode"], dtype=object),
        REJECT_REASON: np.array([""] * (n - 1) + ["empty file"], dtype=object),
    }
    filter_args = {"min_area": 0.01, "max_area": 0.95}
    composite_args = {
        "backgrounds": list_backgrounds(None),
        "per_photo": 2,
        "seed": 1,
        "scale_min": 0.3,
        "scale_max": 1.0,
    }
    copy = lambda: {k: v.copy() for k, v in batch.items()}  # noqa: E731
    got = MatteFilterComposite(filter_args, composite_args, batch_size=4, warm_up=False)(copy())
    want = composite_batch(filter_batch(Matter(batch_size=4, warm_up=False)(copy()), **filter_args), **composite_args)

    assert got.keys() == want.keys() and FOREGROUND in got
    assert list(got[SOURCE_URI]) == list(want[SOURCE_URI])
    assert list(got[REJECT_STAGE]) == list(want[REJECT_STAGE])
    assert list(got[REJECT_REASON]) == list(want[REJECT_REASON])
    # Sorted by size (e, a, b, c, d, speck), 6 photos are two solves of 3: e and c diverge.
    reject = {
        uri: (stage, reason)
        for uri, stage, reason in zip(*(got[k] for k in (SOURCE_URI, REJECT_STAGE, REJECT_REASON)), strict=True)
    }
    assert {uri: stage for uri, (stage, _) in reject.items()} == {
        "a": "", "b": "", "c": "matte", "d": "", "e": "matte", "speck": "filter", "no-background": "matte",
        "bad-decode": "decode",
    }  # fmt: skip
    assert (
        "diverged" in reject["c"][1]
        and "too small" in reject["speck"][1]
        and "no background" in reject["no-background"][1]
    )
    for name in ("background_id", "seed", "placement", "composite_index"):
        assert list(got[name]) == list(want[name]), name
    accepted = np.flatnonzero(got[REJECT_STAGE] == "")
    assert len(accepted) == 6 and len({got[PLACEMENT][r] for r in accepted}) == 6
    for r in accepted:
        assert got[ALPHA][r].dtype == np.uint8 and got[TRIMAP][r].dtype == np.uint8
        np.testing.assert_array_equal(got[ALPHA][r], to_uint8(want[ALPHA][r]))
        np.testing.assert_array_equal(got[TRIMAP][r], to_uint8(want[TRIMAP][r]))
        assert got[FOREGROUND][r].dtype == np.uint8 and got[FOREGROUND][r].shape == want[FOREGROUND][r].shape
        np.testing.assert_array_equal(got[FOREGROUND][r], want[FOREGROUND][r])
        assert got[ALPHA_AREA][r] == pytest.approx(want[ALPHA_AREA][r], rel=1e-6)  # float32 sums, in another order
        diff = np.abs(got[COMPOSITE][r].astype(int) - want[COMPOSITE][r].astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.01
    # Stage times: matte and filter on every row of a photo, the composite's on its first row.
    assert {"t_matte", "t_filter", "t_composite"} <= got.keys()
    assert (got["t_composite"][got["composite_index"] > 0] == 0).all() and got["t_composite"][0] > 0

    encode_args = {"image_format": "png", "jpeg_quality": 95, "dataset_version": "v0001"}
    got_bytes, want_bytes = encode_batch(got, **encode_args), encode_batch(want, **encode_args)
    for name in ("image", "alpha", "trimap"):
        assert list(got_bytes[name]) == list(want_bytes[name]), name


def test_matte_filter_composite_decodes_a_batchs_backgrounds_on_its_loader_threads(tmp_path, monkeypatch):
    """With a pool of many backgrounds nearly every composite draws one the actor has not seen:
    each is decoded once, on the actor's loader threads (started before the solve), and the
    composites are those that decoding on the actor's own thread gave."""
    import threading

    import stages.composite as composite
    import stages.matte_composite as matte_composite
    from pipeline.data.backgrounds import list_backgrounds
    from stages.composite import composite_batch
    from stages.filter import filter_batch
    from stages.records import BACKGROUND_ID, COMPOSITE, SOURCE_SHA256

    rng = np.random.default_rng(0)
    for n in range(40):
        Image.fromarray(rng.integers(0, 256, (24 + n, 64, 3), dtype=np.uint8)).save(tmp_path / f"bg{n:02d}.png")
    scenes = [make_scene(48, 48, seed) for seed in (6, 7, 8, 9)]
    batch = {
        SOURCE_URI: np.array([f"p{i}" for i in range(4)], dtype=object),
        SOURCE_SHA256: np.array([f"{i + 1:02x}" * 32 for i in range(4)], dtype=object),
        IMAGE: _column([as_uint8(s.image) for s in scenes]),
        TRIMAP: _column([s.trimap for s in scenes]),
        REJECT_STAGE: np.array([""] * 4, dtype=object),
        REJECT_REASON: np.array([""] * 4, dtype=object),
    }
    composite_args = {"backgrounds": list_backgrounds(tmp_path), "per_photo": 3, "seed": 1, "scale_min": 0.3, "scale_max": 1.0}
    filter_args = {"min_area": 0.01, "max_area": 0.95}
    loads = []

    def covered(path, height, width):
        loads.append((path, threading.current_thread().name))
        return composite.cover_background(composite.load_background(path), height, width)

    copy = lambda: {k: v.copy() for k, v in batch.items()}  # noqa: E731
    want = composite_batch(filter_batch(Matter(batch_size=4, warm_up=False)(copy()), **filter_args), **composite_args)
    monkeypatch.setattr(matte_composite, "covered_background", covered)
    got = MatteFilterComposite(filter_args, composite_args, batch_size=4, warm_up=False)(copy())
    drawn = {p for i in range(4) for p in composite.drawn_backgrounds(batch[SOURCE_SHA256][i], **composite_args)}
    assert len(drawn) >= 8  # the pool is large enough that most draws differ
    assert sorted(p for p, _ in loads) == sorted(drawn)  # each once, none on the spot
    assert all(name.startswith("backgrounds") for _, name in loads)
    assert list(got[BACKGROUND_ID]) == list(want[BACKGROUND_ID]) and (got[REJECT_STAGE] == "").all()
    for a, b in zip(got[COMPOSITE], want[COMPOSITE], strict=True):  # the CPU path's pixels, as above
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
