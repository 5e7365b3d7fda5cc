"""Closed-form alpha mattes (Levin et al. 2008) for a batch of photos: pymatting's
`estimate_alpha_cf`, batched, in torch, on CPU or CUDA. A pure tensor function, with no Ray and
no I/O.

It solves the system that pymatting solves: with L the matting Laplacian (laplacian.py), the
unknown pixels U solve L_UU x_U = -L_UK [known pixel is foreground], and known pixels stay
exactly 0 or 1. Jacobi-preconditioned CG (cg.py) solves it for the whole batch at once, level
by level of a pyramid, each level starting from the coarser level's alpha. Which kernels build
L and iterate (Triton, compiled or eager torch) is _kernels.py's choice.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from stages.matting._inputs import ArrayLike, as_tensor, pad_to, to_output, working_dtype
from stages.matting._kernels import COMPILED, TRITON, compiled, kernel_choice
from stages.matting.cg import batch_dot, cg_step, solve
from stages.matting.laplacian import build_stencil, compact_system, gather_unknowns, inside_windows, scatter_unknowns

logger = logging.getLogger(__name__)

# pymatting's trimap_split: values <= 0.1 are background, >= 0.9 foreground, the rest unknown.
BG_THRESHOLD = 0.1
FG_THRESHOLD = 0.9

# Relative CG residual at which an image stops (see estimate_alpha_cf_torch's tol).
DEFAULT_TOL = 1e-4

# Coarse-to-fine start: solve on 2x downsampled photos first while the shorter side is at least
# this many pixels, so CG at full size starts from a guess with the smooth error removed.
_MIN_COARSE_SIDE = 64


class _Kernels(NamedTuple):
    """What builds the stencil and what steps the torch CG loop, in one tier of _kernels.py."""

    build_stencil: Callable[..., torch.Tensor]
    cg_step: Callable[..., tuple[torch.Tensor, ...]]


def _kernels_for(tier: str) -> _Kernels:
    if tier == TRITON:
        # Nothing for torch.compile to do: dynamo re-traced the stencil build at every process
        # start, 25 s even on warm caches (BENCHMARKS.md, "Matte actor").
        from stages.matting import laplacian_triton

        return _Kernels(laplacian_triton.build_stencil, cg_step)
    if tier == COMPILED:
        return _Kernels(compiled(build_stencil), compiled(cg_step))
    return _Kernels(build_stencil, cg_step)


def _coarsen(
    image: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halve a level: colours are averaged, and a coarse pixel is foreground (background, inside
    the photo) only if all four children are. Odd sides are padded by replication first."""
    h, w = image.shape[-2:]
    pad = (0, w % 2, 0, h % 2)
    if any(pad):
        image, fg, bg, valid = (F.pad(t, pad, mode="replicate") for t in (image, fg, bg, valid))

    def all_of(mask: torch.Tensor) -> torch.Tensor:
        return -F.max_pool2d(-mask, 2)

    return F.avg_pool2d(image, 2), all_of(fg), all_of(bg), all_of(valid)


def _solve_alpha(
    image: torch.Tensor,
    fg: torch.Tensor,
    bg: torch.Tensor,
    valid: torch.Tensor,
    *,
    epsilon: float,
    radius: int,
    tol: float,
    max_iter: int,
    check_every: int,
    coarse_to_fine: bool,
    kernels: _Kernels,
    cg: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pyramid level, (B, C, H, W) masks in the working dtype -> (alpha (B, 1, H, W) in
    [0, 1], converged (B,) bool). Starts CG from the next coarser level's alpha, upsampled."""
    h, w = image.shape[-2:]
    free = (1.0 - fg) * (1.0 - bg)
    x0 = torch.zeros_like(fg)
    if coarse_to_fine and min(h, w) >= 2 * _MIN_COARSE_SIDE:
        coarse_alpha, _ = _solve_alpha(
            *_coarsen(image, fg, bg, valid),
            epsilon=epsilon,
            radius=radius,
            tol=tol,
            max_iter=max_iter,
            check_every=check_every,
            coarse_to_fine=coarse_to_fine,
            kernels=kernels,
            cg=cg,
        )
        up = F.interpolate(coarse_alpha, scale_factor=2.0, mode="bilinear", align_corners=False)
        x0 = up[..., :h, :w].clamp(0.0, 1.0) * free

    stencil = kernels.build_stencil(image, inside_windows(valid, radius), epsilon, radius)
    system, rhs = compact_system(stencil, free, fg, fg.dtype)
    del stencil
    # A zero right-hand side means the unknowns are 0. Starting there makes r = 0, so the image
    # stops at once instead of chasing a relative tolerance of 0.
    x0 = torch.where(batch_dot(rhs, rhs) > 0, gather_unknowns(x0, system), torch.zeros_like(rhs))
    x, converged, iterations = solve(
        system, rhs, x0, width=w, tol=tol, max_iter=max_iter, check_every=check_every, cg=cg, step_fn=kernels.cg_step
    )
    logger.debug("closed-form matting: %d photos at %dx%d, %d CG iterations", image.shape[0], h, w, iterations)
    return (fg + scatter_unknowns(x, system, fg)).clamp(0.0, 1.0), converged


def estimate_alpha_cf_torch(
    images: ArrayLike | Sequence[ArrayLike],
    trimaps: ArrayLike | Sequence[ArrayLike],
    *,
    epsilon: float = 1e-7,
    radius: int = 1,
    tol: float = DEFAULT_TOL,
    max_iter: int = 10000,
    check_every: int = 16,
    coarse_to_fine: bool = True,
    compile: bool | None = None,
    cg: str = "auto",
    device: torch.device | str | None = None,
) -> ArrayLike | list[ArrayLike]:
    """Closed-form alpha mattes for a batch of photos. This is pymatting's `estimate_alpha_cf`,
    batched.

    images: float32 (B, H, W, 3) RGB in [0, 1], or one (H, W, 3) photo, as a torch tensor or a
        numpy array. Callers batch photos of one size. A list of (H_i, W_i, 3) photos of
        different sizes is padded to one batch.
        The padding is exact: windows that reach into it are dropped, as at a photo's border.
        float64 input solves in float64 (slower on GPU, and closer to an exact solve). A
        float32 solve rounds L's off-diagonal entries to float16 values (`_round_coefficients`:
        ~1e-4 MAD on the exact alpha), which the Triton CG then reads in half the bytes.
    trimaps: float (B, H, W), (H, W) or a list to match. A value <= 0.1 is background, >= 0.9 is
        foreground, and anything between is unknown (pymatting's thresholds, BG_THRESHOLD and
        FG_THRESHOLD). Every photo needs both background and foreground pixels.
    epsilon, radius: pymatting's `cf_laplacian` regularisation and window radius.
    tol: stop an image once ||L_UU x - b|| <= tol * ||b||. pymatting uses 1e-7 in float64, with
        a stronger preconditioner. Measured on 11 DreamBench photos in float32, with subject-
        shaped trimaps leaving 17-36% unknown: 1e-4 sits 0.0006-0.0020 MAD from a tight float64
        solve at 512 px and 0.0010-0.0019 at 1024 px, under half of the 0.005 the matte stage
        allows against pymatting (which sits within 1.4e-4 of the tight solve on those photos).
        3e-5 needs ~40% more iterations for a third of that error; 3e-4 (worst photo 0.0041)
        leaves too little margin.
    max_iter: CG iteration cap per pyramid level. Images still short of tol are returned as they
        stand, with a WARNING.
    check_every: iterations between convergence checks (host syncs).
    coarse_to_fine: start CG from a solve at half resolution (recursively down to
        _MIN_COARSE_SIDE px). It converges to the same system in fewer iterations.
    compile: fuse the torch loop's stencil build and CG iteration with torch.compile. None
        means on CUDA only. The first call compiles for ~1 min, and the kernels take dynamic
        shapes, so later sizes reuse them. If compiling fails, the process falls back to eager
        with a WARNING. The Triton loop needs no compiling: it builds the stencil with the
        Triton kernels of laplacian_triton.py, which Triton keeps on disk.
    cg: how CG iterates. "torch" is the torch loop (compiled with `compile`); "triton" runs the
        Triton kernels of cg_triton.py, and "triton-graphs" replays them as CUDA
        graphs. "auto" takes "triton-graphs" for float32 on CUDA when Triton imports, "torch"
        otherwise. All solve the same system with the same stopping test. If the Triton kernels
        fail to build, the process falls back to "torch" with a WARNING.
    device: where to solve. The default is the images' device (CPU for numpy).

    Returns alpha in the working dtype (float32, or float64 for float64 input), in [0, 1],
    shaped like the trimaps: (B, H, W), (H, W) or a list. Known pixels are exactly 0 or 1.
    numpy input gives numpy output, and tensors come back on the images' device.
    Raises ValueError naming the photos whose trimap lacks foreground or background (pymatting
    refuses those as well)."""
    options = dict(
        epsilon=epsilon,
        radius=radius,
        tol=tol,
        max_iter=max_iter,
        check_every=check_every,
        coarse_to_fine=coarse_to_fine,
        compile=compile,
        cg=cg,
    )
    if isinstance(images, (list, tuple)):
        if len(images) != len(trimaps):
            raise ValueError(f"{len(images)} images but {len(trimaps)} trimaps")
        if not images:
            return []
        imgs = [as_tensor(i, device) for i in images]
        tris = [as_tensor(t, imgs[0].device) for t in trimaps]
        h = max(i.shape[0] for i in imgs)
        w = max(i.shape[1] for i in imgs)
        alpha = _estimate_alpha_batch(
            torch.stack([pad_to(i, h, w) for i in imgs]),
            torch.stack([pad_to(t, h, w) for t in tris]),
            torch.stack([pad_to(torch.ones_like(t), h, w) for t in tris]),
            **options,
        )
        return [to_output(a[: t.shape[0], : t.shape[1]], like) for a, t, like in zip(alpha, tris, images, strict=True)]

    img = as_tensor(images, device)
    tri = as_tensor(trimaps, img.device)
    single = img.dim() == 3
    if single:
        img, tri = img.unsqueeze(0), tri.unsqueeze(0)
    if img.dim() != 4 or img.shape[-1] != 3 or tri.shape != img.shape[:-1]:
        raise ValueError(
            f"expected images (B, H, W, 3) and trimaps (B, H, W), got {tuple(img.shape)} and {tuple(tri.shape)}"
        )
    alpha = _estimate_alpha_batch(img, tri, None, **options)
    return to_output(alpha[0] if single else alpha, images)


def _estimate_alpha_batch(
    images: torch.Tensor,
    trimaps: torch.Tensor,
    valid: torch.Tensor | None,
    *,
    epsilon: float,
    radius: int,
    tol: float,
    max_iter: int,
    check_every: int,
    coarse_to_fine: bool,
    compile: bool | None,
    cg: str,
) -> torch.Tensor:
    """(B, H, W, 3) colours, (B, H, W) trimaps and photo masks (None: no padding) on the solve
    device -> (B, H, W) alpha in the working dtype."""
    dtype = working_dtype(images)
    image = images.to(dtype).permute(0, 3, 1, 2)  # (B, 3, H, W)
    tri = trimaps.to(dtype).unsqueeze(1)  # (B, 1, H, W)
    inside = torch.ones_like(tri) if valid is None else valid.to(dtype).unsqueeze(1)
    fg = ((tri >= FG_THRESHOLD) & (inside > 0)).to(dtype)
    bg = ((tri <= BG_THRESHOLD) | (inside == 0)).to(dtype)
    no_fg = (fg.sum((1, 2, 3)) == 0).nonzero().view(-1).tolist()
    no_bg = ((bg * inside).sum((1, 2, 3)) == 0).nonzero().view(-1).tolist()
    if no_fg or no_bg:
        raise ValueError(
            f"trimaps without foreground (>= {FG_THRESHOLD}): {no_fg}; without background (<= {BG_THRESHOLD}): {no_bg}"
        )

    choice = kernel_choice()
    cg = choice.resolve_cg(cg, image)
    solve_levels = functools.partial(
        _solve_alpha,
        image,
        fg,
        bg,
        inside,
        epsilon=epsilon,
        radius=radius,
        tol=tol,
        max_iter=max_iter,
        check_every=check_every,
        coarse_to_fine=coarse_to_fine,
    )
    alpha, converged = choice.run(
        choice.tiers(cg != "torch", compile, image),
        lambda tier: solve_levels(kernels=_kernels_for(tier), cg=cg if tier == TRITON else "torch"),
        "CG kernels",
    )
    if not bool(converged.all()):
        logger.warning(
            "closed-form matting: photos %s did not reach tol=%g in %d iterations",
            (~converged).nonzero().view(-1).tolist(),
            tol,
            max_iter,
        )
    return alpha[:, 0]
