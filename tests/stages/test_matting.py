"""stages/matting/ against pymatting, the ground truth of synthetic scenes, and itself.

Tolerances: alpha from float32 CG at the default tol sits ~1e-4 MAD from pymatting on these
scenes. The bounds below (0.005 MAD, SAD within 2% of pymatting's) are the issue's acceptance
bounds, not tuned to the solver. pymatting's numba kernels compile once per install (~55 s),
then come from its cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pymatting import cf_laplacian, estimate_alpha_cf, estimate_foreground_ml

from stages.matting import estimate_alpha_cf_torch, estimate_foreground_torch
from stages.matting.laplacian import build_stencil, half_offsets
from tests.matting_fixtures import ellipse_trimap, make_scene

PHOTO = Path(__file__).resolve().parents[2] / "datasets" / "dreambench-mini" / "dog" / "00.jpg"


def _pymatting_alpha(image: np.ndarray, trimap: np.ndarray) -> np.ndarray:
    return estimate_alpha_cf(image.astype(np.float64), trimap.astype(np.float64))


def _stencil_to_dense(stencil: np.ndarray, radius: int) -> np.ndarray:
    """(P, H, W) half stencil -> dense (HW, HW) Laplacian, by the definition of the planes."""
    _, h, w = stencil.shape
    dense = np.zeros((h * w, h * w))
    for j, (dy, dx) in enumerate(half_offsets(radius)):
        for y in range(max(0, -dy), min(h, h - dy)):
            for x in range(max(0, -dx), min(w, w - dx)):
                i, k = y * w + x, (y + dy) * w + x + dx
                dense[i, k] = dense[k, i] = stencil[j, y, x]
    return dense


@pytest.mark.parametrize("radius", [1, 2])
def test_laplacian_matches_pymatting(radius: int) -> None:
    scene = make_scene(14, 19, seed=3)  # small and not square: transposed offsets would show
    stencil = build_stencil(torch.from_numpy(scene.image).permute(2, 0, 1)[None], None, 1e-7, radius)
    ours = _stencil_to_dense(stencil[0].numpy(), radius)
    theirs = cf_laplacian(scene.image.astype(np.float64), epsilon=1e-7, radius=radius).toarray()
    assert np.abs(ours - theirs).max() < 1e-8


def test_padding_drops_only_the_padded_windows() -> None:
    scene = make_scene(20, 24, seed=4)
    image = torch.from_numpy(scene.image).permute(2, 0, 1)[None]
    padded = torch.rand(1, 3, 27, 30, dtype=torch.float64)  # junk around the photo
    padded[:, :, :20, :24] = image
    inside = torch.zeros(1, 1, 27, 30, dtype=torch.float64)
    inside[:, :, :20, :24] = 1
    windows = -torch.nn.functional.max_pool2d(-inside, 3, stride=1)  # windows fully inside
    alone = build_stencil(image, None, 1e-7, 1)
    with_padding = build_stencil(padded, windows, 1e-7, 1)
    assert torch.allclose(with_padding[..., :20, :24], alone, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("height", "width", "seed"), [(96, 96, 0), (96, 96, 1), (80, 112, 2)])
def test_alpha_matches_pymatting_and_ground_truth(height: int, width: int, seed: int) -> None:
    scene = make_scene(height, width, seed)
    reference = _pymatting_alpha(scene.image, scene.trimap)
    alpha = estimate_alpha_cf_torch(scene.image, scene.trimap)
    assert alpha.shape == (height, width) and alpha.dtype == np.float32
    assert np.abs(alpha - reference).mean() < 0.005
    sad_ours = np.abs(alpha - scene.alpha).sum()
    sad_pymatting = np.abs(reference - scene.alpha).sum()
    assert abs(sad_ours - sad_pymatting) <= 0.02 * sad_pymatting


def test_known_pixels_stay_exact_and_alpha_in_range() -> None:
    scene = make_scene(64, 72, seed=5)
    trimap = scene.trimap.copy()
    trimap[:3] = 0.05  # pymatting's thresholds: <= 0.1 is background, >= 0.9 foreground
    trimap[30:34, 30:40] = 0.95
    alpha = estimate_alpha_cf_torch(scene.image, trimap)
    assert np.all(alpha[trimap <= 0.1] == 0.0)
    assert np.all(alpha[trimap >= 0.9] == 1.0)
    assert alpha.min() >= 0.0 and alpha.max() <= 1.0


def test_batch_equals_single_photos() -> None:
    scenes = [make_scene(64, 64, seed) for seed in (6, 7, 8)]
    batch = estimate_alpha_cf_torch(np.stack([s.image for s in scenes]), np.stack([s.trimap for s in scenes]))
    assert batch.shape == (3, 64, 64)
    for alpha, scene in zip(batch, scenes, strict=True):
        single = estimate_alpha_cf_torch(scene.image, scene.trimap)
        np.testing.assert_allclose(alpha, single, rtol=0, atol=1e-6)


def test_photos_of_different_sizes_are_padded_into_one_batch() -> None:
    scenes = [make_scene(64, 80, seed=9), make_scene(72, 56, seed=10)]
    alphas = estimate_alpha_cf_torch([s.image for s in scenes], [s.trimap for s in scenes])
    for alpha, scene in zip(alphas, scenes, strict=True):
        assert alpha.shape == scene.trimap.shape
        # Same system; only the coarse-level starting guess differs, so agreement is to tol.
        assert np.abs(alpha - estimate_alpha_cf_torch(scene.image, scene.trimap)).mean() < 1e-3


def test_tensors_stay_tensors_and_float64_solves_in_float64() -> None:
    scene = make_scene(48, 48, seed=11)
    image = torch.from_numpy(scene.image.astype(np.float64))[None]
    trimap = torch.from_numpy(scene.trimap)[None]
    alpha = estimate_alpha_cf_torch(image, trimap, tol=1e-9)
    assert isinstance(alpha, torch.Tensor) and alpha.dtype == torch.float64 and alpha.shape == (1, 48, 48)
    reference = _pymatting_alpha(scene.image, scene.trimap)
    assert np.abs(alpha[0].numpy() - reference).max() < 1e-5


def test_trimap_without_foreground_or_background_is_refused() -> None:
    scene = make_scene(32, 32, seed=12)
    no_foreground = np.where(scene.trimap > 0.9, 0.5, scene.trimap).astype(np.float32)
    with pytest.raises(ValueError, match=r"without foreground .*\[1\]"):
        estimate_alpha_cf_torch(np.stack([scene.image] * 2), np.stack([scene.trimap, no_foreground]))
    with pytest.raises(ValueError, match="without background"):
        estimate_alpha_cf_torch(scene.image, np.maximum(scene.trimap, 0.5))


def test_real_photo_matches_pymatting() -> None:
    if not PHOTO.exists():
        pytest.skip(f"{PHOTO} is not in this checkout")
    from PIL import Image

    photo = Image.open(PHOTO).convert("RGB").resize((128, 128), Image.BICUBIC)
    image = np.asarray(photo, dtype=np.float32) / 255.0
    trimap = ellipse_trimap(128, 128)
    alpha = estimate_alpha_cf_torch(image, trimap)
    assert np.abs(alpha - _pymatting_alpha(image, trimap)).mean() < 0.005


def test_foreground_is_close_to_pymatting_and_ground_truth() -> None:
    scene = make_scene(96, 80, seed=13)
    ours, background = estimate_foreground_torch(scene.image, scene.alpha, return_background=True)
    theirs = estimate_foreground_ml(scene.image, scene.alpha)
    assert ours.shape == background.shape == scene.image.shape and ours.dtype == np.float32
    assert ours.min() >= 0.0 and ours.max() <= 1.0
    # Red-black sweeps instead of pymatting's raster sweeps: close, not equal.
    weight = scene.alpha[..., None]
    assert (np.abs(ours - theirs) * weight).sum() / (3 * weight.sum()) < 0.005
    solid = scene.alpha > 0.5
    error_ours = np.abs(ours - scene.foreground)[solid].mean()
    error_theirs = np.abs(theirs - scene.foreground)[solid].mean()
    assert error_ours < error_theirs + 0.002


def test_foreground_batches_and_lists_equal_single_photos() -> None:
    scenes = [make_scene(40, 48, seed) for seed in (14, 15)] + [make_scene(56, 40, seed=16)]
    singles = [estimate_foreground_torch(s.image, s.alpha) for s in scenes]
    batch = estimate_foreground_torch(np.stack([s.image for s in scenes[:2]]), np.stack([s.alpha for s in scenes[:2]]))
    listed = estimate_foreground_torch([s.image for s in scenes], [s.alpha for s in scenes])
    for i, single in enumerate(singles):
        np.testing.assert_allclose(listed[i], single, rtol=0, atol=1e-6)
        if i < 2:
            np.testing.assert_allclose(batch[i], single, rtol=0, atol=1e-6)


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    scenes = [make_scene(128, 128, seed) for seed in (17, 18)]
    images = np.stack([s.image for s in scenes])
    trimaps = np.stack([s.trimap for s in scenes])
    cpu = estimate_alpha_cf_torch(images, trimaps)
    cuda = estimate_alpha_cf_torch(images, trimaps, device="cuda")  # compiled by default
    assert np.abs(cuda - cpu).mean() < 1e-3
    fg_cpu = estimate_foreground_torch(images, cpu)
    fg_cuda = estimate_foreground_torch(images, cpu, device="cuda")
    assert np.abs(fg_cuda - fg_cpu).max() < 1e-4


_TRITON_CHECK = """
import json, logging, sys
import numpy as np
import torch
from stages.matting import cg_triton, estimate_alpha_cf_torch, laplacian_triton
from tests.matting_fixtures import make_scene

logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
# The interpreter's time goes by kernel programs: a CG iteration is 5 launches whatever the
# photo's size, and the stencil build one program per 128 pixels. So the photos are small (3
# stencil programs each, the last part masked), with sharp noisy edges that converge in few
# iterations: in the torch loop photo 0 stops at iteration 31 and photo 1 at 39, in different
# groups of check_every = 4, and each residual is >= 12% from the threshold there.
scene = dict(edge_px=2.0, erode_px=1, noise=0.03)
scenes = [make_scene(16, 20, seed=19, **scene), make_scene(16, 20, seed=20, **scene)]
images = np.stack([s.image for s in scenes])
trimaps = np.stack([s.trimap for s in scenes])
trimaps[1, :, :4] = 0.5  # a strip of background made unknown: this photo needs more iterations
# The second Triton solve is of the same system: it takes the stencil that the Triton kernels
# built for the first (half of a solve's time under the interpreter), for the same inputs.
build_stencil, built = laplacian_triton.build_stencil, []

def build_stencil_once(image, window_weight, epsilon, radius):
    if not built:
        built.append((image.clone(), window_weight, epsilon, radius, build_stencil(image, window_weight, epsilon, radius)))
    first_image, first_weight, *first_settings, stencil = built[0]
    assert torch.equal(image, first_image) and window_weight is first_weight is None
    assert [epsilon, radius] == first_settings
    return stencil.clone()

laplacian_triton.build_stencil = build_stencil_once
# A tol at which no photo stops within float32 rounding of the threshold, so that the loops'
# iteration counts can be compared exactly.
ours = estimate_alpha_cf_torch(images, trimaps, cg="triton", check_every=4, tol=3e-5)
cg_triton.COEFFICIENT_DTYPE = torch.float32  # the same values, read as 4 bytes
wide = estimate_alpha_cf_torch(images, trimaps, cg="triton", check_every=4, tol=3e-5)
loop = estimate_alpha_cf_torch(images, trimaps, cg="torch", check_every=4, tol=3e-5)
tight = estimate_alpha_cf_torch(images.astype(np.float64), trimaps, tol=1e-10)
print(json.dumps({
    "vs_loop_max": float(np.abs(ours - loop).max()),
    "wide_vs_loop_max": float(np.abs(wide - loop).max()),
    "vs_tight_mad": float(np.abs(ours - tight).mean()),
    "known_exact": bool(np.all(ours[trimaps >= 0.9] == 1.0) and np.all(ours[trimaps <= 0.1] == 0.0)),
}))
"""


def test_triton_cg_takes_the_torch_loops_iterations() -> None:
    """The Triton kernels (the stencil's and CG's), run by Triton's CPU interpreter."""
    pytest.importorskip("triton")
    done = _run_interpreted(_TRITON_CHECK)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING" not in done.stderr, done.stderr[-3000:]  # no fallback to the torch loop
    # Two photos of different difficulty, so one stops while the other goes on (the stopped
    # image's blocks are masked off). Below 128 px there is no pyramid: one level each.
    levels = [line for line in done.stderr.splitlines() if "CG iterations" in line]
    assert len(levels) == 4 and len({line.split(":")[-1] for line in levels[:3]}) == 1, levels
    result = json.loads(done.stdout)
    assert result["vs_loop_max"] < 1e-4
    assert result["wide_vs_loop_max"] < 1e-4
    assert result["vs_tight_mad"] < 1e-4
    assert result["known_exact"]


def test_triton_kernels_compile_for_hopper() -> None:
    """Triton's interpreter accepts code its compiler refuses (a constexpr computed inside a
    kernel, say), so each kernel is also compiled for sm_90 here, without a GPU."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from stages.matting import cg_triton

    constexprs = {"REACH": 2, "SIDE": 5, "BLOCK": 1024, "PARTS": 64}
    kernels = [getattr(cg_triton, name) for name in dir(cg_triton) if name.endswith("_kernel")]
    assert len(kernels) == 5
    # Each kernel as the solver calls it; the matrix product with both coefficient types.
    variants = [(kernel, "*fp32") for kernel in kernels] + [(cg_triton._matvec_kernel, "*fp16")]
    for kernel, coef_type in variants:
        names = kernel.arg_names
        signature = {
            name: "constexpr"
            if name in constexprs
            else (
                "*i32"
                if name in ("index_ptr", "active_ptr", "count_ptr")
                else coef_type
                if name == "coef_ptr"
                else "*fp32"
            )
            if name.endswith("_ptr")
            else "i32"
            for name in names
        }
        fixed = {(names.index(name),): value for name, value in constexprs.items() if name in names}
        compiled = triton.compile(ASTSource(kernel, signature, fixed), target=GPUTarget("cuda", 90, 32))
        assert "ptx" in compiled.asm, kernel.fn.__name__

    from stages.matting import laplacian_triton

    window = {"R": 1, "SIDE": 3, "BLOCK": 128}
    stencil_variants = [
        (laplacian_triton._window_kernel, {**window, "HAS_WEIGHT": True}),
        (laplacian_triton._window_kernel, {**window, "HAS_WEIGHT": False}),
        (laplacian_triton._stencil_kernel, {**window, "REACH": 2, "SPAN": 5}),
    ]
    from stages.matting import foreground_triton

    stencil_variants.append((foreground_triton._sweep_kernel, {"BLOCK": 512}))
    for kernel, constexprs in stencil_variants:
        names = kernel.arg_names
        pointers = {
            "image_ptr": "*fp32",
            "weight_ptr": "*fp32",
            "alpha_ptr": "*fp32",
            "fg_ptr": "*fp32",
            "bg_ptr": "*fp32",
        }
        signature = {
            name: "constexpr"
            if name in constexprs
            else pointers.get(name, "*fp64")
            if name.endswith("_ptr")
            else "fp64"
            if name == "ridge"
            else "fp32"
            if name in ("regularization", "gradient_weight")
            else "i32"
            for name in names
        }
        fixed = {(names.index(name),): value for name, value in constexprs.items()}
        compiled = triton.compile(ASTSource(kernel, signature, fixed), target=GPUTarget("cuda", 90, 32))
        assert "ptx" in compiled.asm, kernel.fn.__name__


_STENCIL_CHECK = """
import json
import torch
from stages.matting import laplacian, laplacian_triton
from tests.matting_fixtures import make_scene

result = {}
# Not square. The interpreter's time goes by programs of 128 lanes, and r = 2 unrolls 325 window
# terms in each (nine tenths of the time): so r = 1 takes 15 x 17 = 255 pixels, two programs a
# photo, the second one part masked, and r = 2, the same kernel code with other constexprs, one
# program a photo, part masked (9 x 13 = 117 pixels).
for radius, (height, width) in ((1, (15, 17)), (2, (9, 13))):
    scenes = [make_scene(height, width, seed=25), make_scene(height, width, seed=26)]
    image = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in scenes])
    image[1, :, :6] = 0.5  # flat grey: windows whose covariance is only the ridge
    weight = torch.ones(2, 1, height - 2 * radius, width - 2 * radius)
    weight[0, :, (height - 2 * radius) // 2 + 1 :] = 0.0  # windows dropped, as for a padded photo
    for name, w in (("plain", None), ("weighted", weight)):
        ref = laplacian.build_stencil(image, w, 1e-7, radius)
        ours = laplacian_triton.build_stencil(image, w, 1e-7, radius)
        result[f"r{radius}_{name}"] = [list(ours.shape) == list(ref.shape), float((ours - ref).abs().max())]
print(json.dumps(result))
"""


_SWEEP_CHECK = """
import json
import numpy as np
import torch
from stages.matting.foreground import _estimate_foreground_batch, _foreground_sweep
from stages.matting.foreground_triton import foreground_sweep
from tests.matting_fixtures import make_scene

scenes = [make_scene(24, 31, seed=27), make_scene(24, 31, seed=28)]
image = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in scenes])
alpha = torch.stack([torch.from_numpy(s.alpha.astype(np.float32))[None] for s in scenes])
options = dict(regularization=1e-5, n_small_iterations=10, n_big_iterations=2, small_size=8, gradient_weight=1.0)
ours = _estimate_foreground_batch(image, alpha, sweep=foreground_sweep, **options)
ref = _estimate_foreground_batch(image, alpha, sweep=_foreground_sweep, **options)
print(json.dumps({name: float((a - b).abs().max()) for name, a, b in zip(("fg", "bg"), ours, ref)}))
"""


def _run_interpreted(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh process with Triton's CPU interpreter on: TRITON_INTERPRET must be set
    before triton is first imported (its own library functions are kernels too)."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)


def test_triton_stencil_equals_the_torch_build() -> None:
    """stages/matting/laplacian_triton.py against laplacian.build_stencil (itself checked against pymatting's
    Laplacian above), with and without dropped windows, for r = 1 and 2. Entries reach ~8 where
    a window is flat, and float64 rounding then differs at ~1e-12."""
    pytest.importorskip("triton")
    done = _run_interpreted(_STENCIL_CHECK)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert len(result) == 4
    for name, (same_shape, max_diff) in result.items():
        assert same_shape and max_diff < 1e-10, (name, max_diff)


def test_triton_foreground_sweep_equals_the_torch_sweep() -> None:
    """The whole multilevel estimate with the Triton sweep against the torch sweep: the same
    arithmetic, so float32 rounding apart (fused multiply-adds)."""
    pytest.importorskip("triton")
    done = _run_interpreted(_SWEEP_CHECK)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["fg"] < 1e-5 and result["bg"] < 1e-5, result


def test_cg_choice_is_checked() -> None:
    scene = make_scene(32, 32, seed=21)
    with pytest.raises(ValueError, match="cg must be one of"):
        estimate_alpha_cf_torch(scene.image, scene.trimap, cg="cuda")
    with pytest.raises(ValueError, match="float32 only"):
        estimate_alpha_cf_torch(scene.image.astype(np.float64), scene.trimap, cg="triton")
    with pytest.raises(ValueError, match="needs CUDA"):
        estimate_alpha_cf_torch(scene.image, scene.trimap, cg="triton-graphs")


def test_compiled_foreground_sweep_equals_eager() -> None:
    from stages.matting._kernels import compiled
    from stages.matting.foreground import _foreground_sweep

    scene = make_scene(24, 30, seed=22)
    image = torch.from_numpy(scene.image).permute(2, 0, 1)[None]
    alpha = torch.from_numpy(scene.alpha)[None, None]
    fg, bg = image.clone(), 1.0 - image
    eager = _foreground_sweep(image, alpha, fg, bg, 1e-5, 1.0)
    fused = compiled(_foreground_sweep)(image, alpha, fg, bg, 1e-5, 1.0)
    for a, b in zip(eager, fused, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.equal(eager[0], fg)  # the sweep did move the colours


def test_float32_systems_round_off_diagonals_to_float16_and_stay_a_laplacian() -> None:
    """The Triton CG reads the off-diagonals as float16, so float32 solves round them there; the
    rounded system must still be a symmetric Laplacian (rows summing to 0)."""
    from stages.matting.laplacian import compact_system, full_offsets

    scene = make_scene(24, 20, seed=23)
    image = torch.from_numpy(scene.image).permute(2, 0, 1)[None].double()
    stencil = build_stencil(image, None, 1e-7, 1)
    trimap = torch.from_numpy(scene.trimap)[None, None].double()
    fg = (trimap >= 0.9).double()
    free = ((trimap > 0.1) & (trimap < 0.9)).double()
    centre = full_offsets(1).index((0, 0))
    exact, _ = compact_system(stencil, free, fg, torch.float64)
    rounded, _ = compact_system(stencil, free, fg, torch.float32)
    n = int(exact.counts[0])
    off = torch.ones(exact.coef.shape[1], dtype=torch.bool)
    off[centre] = False
    coef = rounded.coef[0, :, :n].double()
    assert torch.equal(coef[off], coef[off].half().double())  # float16 values
    assert coef.sum(0).abs().max() < 1e-5  # rows of the full L still sum to 0
    assert (coef[off] - exact.coef[0, :, :n][off]).abs().max() <= 2**-11 * exact.coef[0, :, :n][off].abs().max()
    assert not torch.equal(coef[centre], exact.coef[0, centre, :n].float().double())  # it was recomputed
    # Symmetric: L(i, j) == L(j, i) for every pair of unknown pixels.
    position = {int(p): k for k, p in enumerate(rounded.index[0, :n])}
    for k in range(n):
        for j, shift in enumerate(rounded.offsets.tolist()):
            other = position.get(int(rounded.index[0, k]) + shift)
            if other is not None:
                back = rounded.offsets.tolist().index(-shift)
                assert rounded.coef[0, j, k] == rounded.coef[0, back, other]


def test_every_batch_reuses_one_compile_of_each_triton_kernel() -> None:
    """Triton compiles a kernel again for each divisibility class of its integer arguments (by
    16, and 1), and the unknown count changes with every batch. How each launch of a solve
    specialises, for batches of different unknown counts, must not change."""
    pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from stages.matting.cg_triton import TritonPCG
    from stages.matting.laplacian import compact_system

    backend = make_backend(GPUTarget("cuda", 90, 32))
    scene = make_scene(48, 64, seed=24)
    image = torch.from_numpy(scene.image).permute(2, 0, 1)[None].double()
    stencil = build_stencil(image, None, 1e-7, 1)
    base = torch.from_numpy(scene.trimap.copy())[None, None].double()

    def system_for(keep: int, strip: int):
        """Unknown pixels right of column `keep` made background; background left of `strip` unknown."""
        trimap = base.clone()
        trimap[..., keep:] = torch.where(trimap[..., keep:] == 0.5, 0.0, trimap[..., keep:])
        trimap[..., :strip] = torch.where(trimap[..., :strip] <= 0.1, 0.5, trimap[..., :strip])
        free = ((trimap > 0.1) & (trimap < 0.9)).double()
        return compact_system(stencil, free, (trimap >= 0.9).double(), torch.float32)

    raw = {keep: int(system_for(keep, 0)[0].counts[0]) for keep in range(8, 64)}
    # Batches whose unknown counts are and are not multiples of 16, and span one and two blocks.
    settings = [
        (next(k for k, c in raw.items() if c % 16 == 0), 0),
        (next(k for k, c in raw.items() if c % 16 != 0), 0),
        (64, 9),
        (64, 40),
    ]
    keys: dict[str, set[str]] = {}
    counts = []
    for keep, strip in settings:
        system, rhs = system_for(keep, strip)
        counts.append(int(system.counts[0]))
        solver = TritonPCG(system.coef, system.inv_diag, system.index, system.counts, system.scratch_size, 66,
                           rhs, torch.zeros_like(rhs), rhs, 1e-5)  # fmt: skip
        for kernel, _, args, constexprs in solver.launches:
            binder = create_function_from_signature(kernel.signature, kernel.params, backend)
            _, specialization, _ = binder(*args, **constexprs)
            keys.setdefault(kernel.fn.__name__, set()).add(str(specialization))
    # The batches differ in divisibility by 16 and in block count (1024 rows a block).
    assert counts[0] % 16 == 0 and counts[1] % 16 != 0 and counts[1] < 1024 < counts[-1], counts
    assert len(keys) == 5 and all(len(k) == 1 for k in keys.values()), {n: len(k) for n, k in keys.items()}
