"""Batched closed-form matting (Levin et al. 2008) and multilevel foreground estimation in torch.

The GPU counterparts of pymatting's `estimate_alpha_cf` and `estimate_foreground_ml`, for the
matte stage. These are pure tensor functions, with no Ray and no I/O. They run on CPU or CUDA.

Alpha solves the system that pymatting solves. With windows w_k of |w| = (2r+1)^2 pixels lying
fully inside the photo, colour means mu_k and S_k = cov_k(I) + eps/|w| * Id, the matting
Laplacian is

    L_ij = sum_{k : i, j in w_k} ( delta_ij - (1 + (I_i - mu_k)^T S_k^-1 (I_j - mu_k)) / |w| ).

The unknown pixels U solve L_UU x_U = -L_UK [known pixel is foreground], and known pixels stay
exactly 0 or 1. The solver uses conjugate gradients with a Jacobi preconditioner for the whole
batch at once.

Why L is stored and not applied matrix-free. Window statistics come from box filters (float64)
and the 3x3 solves are closed-form Cholesky solves. L itself is then stored: first as its 5x5
stencil (for r = 1; 13 float64 planes per image, because it is symmetric), then as the 25
float32 coefficients of each unknown pixel's row, the only rows CG touches. The usual
matrix-free product `(L x)_i = sum_k x_i - xbar_k - (I_i - mu_k)^T S_k^-1 cov_k(I, x)` fails in
float32. Where the colours of a window lie on a line (greys, two-colour blends, the composite at
an edge), S_k^-1 has eigenvalues near |w|/eps = 9e7. Rounding S_k^-1 or cov_k(I, x) to float32
then leaves errors of O(1). We measured this on DreamBench photos at 512 px: a relative operator
error up to 5e-3, and CG converging to alphas 0.09 MAD away from the float64 answer. The stored
entries are O(1), so float32 rounds them harmlessly.

pymatting forms S_k^-1 from the adjugate in float64. In those same rank-deficient windows this
loses up to ~1e-3 of the entries. On one DreamBench photo its alpha sits 0.015 MAD (max 1.0)
away from an 80-bit reference, while this module's float64 path sits 1e-5 away. Where pymatting
is accurate, the two agree to ~1e-4 (see tests/test_matting_torch.py).

Foreground follows pymatting's multilevel scheme (Germer et al. 2020). Its levels, initial
colours, weights and clamping are the same, but each sweep is a red-black Gauss-Seidel sweep,
not the raster-order (sequential) sweep of pymatting's numba version.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# pymatting's trimap_split: values <= 0.1 are background, >= 0.9 foreground, the rest unknown.
BG_THRESHOLD = 0.1
FG_THRESHOLD = 0.9

# Relative CG residual at which an image stops (see estimate_alpha_cf_torch's tol).
DEFAULT_TOL = 1e-4

# Coarse-to-fine start: solve on 2x downsampled photos first while the shorter side is at least
# this many pixels, so CG at full size starts from a guess with the smooth error removed.
_MIN_COARSE_SIDE = 64

_ArrayLike = torch.Tensor | np.ndarray


# ---------------------------------------------------------------------------------------------
# Matting Laplacian as a symmetric stencil
# ---------------------------------------------------------------------------------------------


def _half_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """Offsets d = (dy, dx) of the stencil's upper half: (0, 0) first, then d > 0 in raster
    order. Two pixels share a window when |dy|, |dx| <= 2r. L(i, i - d) is read from the
    neighbour's L(i - d, i), so ((4r+1)^2 + 1) / 2 planes hold all of L."""
    reach = 2 * radius
    rest = [(dy, dx) for dy in range(reach + 1) for dx in range(-reach, reach + 1) if dy > 0 or dx > 0]
    return ((0, 0), *rest)


def _radius_of(n_planes: int) -> int:
    """Inverse of len(_half_offsets(r))."""
    return (math.isqrt(2 * n_planes - 1) - 1) // 4


def _box_sum_valid(x: torch.Tensor, r: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H-2r, W-2r): the sum over each (2r+1)^2 window lying fully inside.
    Separable and direct. A cumsum would cancel in its differences."""
    k = 2 * r + 1
    x = F.avg_pool2d(x, (k, 1), stride=1)
    return F.avg_pool2d(x, (1, k), stride=1) * (k * k)


def _build_stencil(
    image: torch.Tensor, window_weight: torch.Tensor | None, epsilon: float, radius: int
) -> torch.Tensor:
    """Colours (B, 3, H, W) in [0, 1] -> the matting Laplacian's stencil (B, P, H, W), float64.

    Plane j holds L(i, i + d_j) for d_j = _half_offsets(radius)[j]. It is zero where no window
    holds both pixels. window_weight (B, 1, H-2r, W-2r) is 0 for windows that reach into padding
    and drops them, so a padded photo gets the Laplacian of the photo alone. Everything is worked
    in float64. S_k^-1 is never formed: the Cholesky factor S_k = C C^T whitens the centred
    colours, z = C^-1 (I - mu_k), and the entry's quadratic form is z_i . z_j. Cholesky is
    backward stable, but the adjugate is not (see the module docstring). The function is written
    without in-place updates, so torch.compile can fuse it into a few kernels."""
    r = radius
    k = 2 * r + 1
    area = k * k
    img = image.to(torch.float64)
    b, _, h, w = img.shape
    hv, wv = h - 2 * r, w - 2 * r
    offsets = _half_offsets(r)
    if hv <= 0 or wv <= 0:  # no window fits: L = 0, as in pymatting
        return img.new_zeros((b, len(offsets), h, w))

    mean = _box_sum_valid(img, r) / area  # (B, 3, Hv, Wv)
    c0, c1, c2 = img.unbind(1)
    m0, m1, m2 = mean.unbind(1)
    second = _box_sum_valid(torch.stack((c0 * c0, c0 * c1, c0 * c2, c1 * c1, c1 * c2, c2 * c2), 1), r) / area
    # pymatting adds eps to the window sums before dividing by |w|: eps / |w| on the diagonal.
    ridge = epsilon / area
    s00 = second[:, 0] - m0 * m0 + ridge
    s01 = second[:, 1] - m0 * m1
    s02 = second[:, 2] - m0 * m2
    s11 = second[:, 3] - m1 * m1 + ridge
    s12 = second[:, 4] - m1 * m2
    s22 = second[:, 5] - m2 * m2 + ridge
    # Closed-form 3x3 Cholesky, S = C C^T with C lower triangular; each (B, Hv, Wv).
    l00 = s00.sqrt()
    l10 = s01 / l00
    l20 = s02 / l00
    l11 = (s11 - l10 * l10).sqrt()
    l21 = (s12 - l20 * l10) / l11
    l22 = (s22 - l20 * l20 - l21 * l21).sqrt()

    members = [(dy, dx) for dy in range(k) for dx in range(k)]  # position in the window
    whitened = []  # per member: (B, 3, Hv, Wv) C^-1 (I - mu_k), by forward substitution
    for dy, dx in members:
        c = img[:, :, dy : dy + hv, dx : dx + wv] - mean
        z0 = c[:, 0] / l00
        z1 = (c[:, 1] - l10 * z0) / l11
        z2 = (c[:, 2] - l20 * z0 - l21 * z1) / l22
        whitened.append(torch.stack((z0, z1, z2), 1))

    # Plane d at pixel i sums the windows k that hold i as member m and i + d as member n. The
    # entry is computed on the window grid and padded into place (window k -> pixel k + m).
    planes = []
    for dy, dx in offsets:
        plane = None
        for m, (y1, x1) in enumerate(members):
            if (y1 + dy, x1 + dx) not in members:
                continue
            n = members.index((y1 + dy, x1 + dx))
            entry = (1.0 if m == n else 0.0) - (1.0 + (whitened[m] * whitened[n]).sum(1, keepdim=True)) / area
            if window_weight is not None:
                entry = entry * window_weight
            placed = F.pad(entry, (x1, 2 * r - x1, y1, 2 * r - y1))
            plane = placed if plane is None else plane + placed
        planes.append(plane)
    return torch.cat(planes, 1)


def _shift(x: torch.Tensor, dy: int, dx: int, reach: int) -> torch.Tensor:
    """y[..., i, j] = x[..., i + dy, j + dx], zero outside (|dy|, |dx| <= reach)."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (reach, reach, reach, reach))
    return padded[..., reach + dy : reach + dy + h, reach + dx : reach + dx + w]


# ---------------------------------------------------------------------------------------------
# The unknown pixels' system, compacted, and batched preconditioned conjugate gradients
# ---------------------------------------------------------------------------------------------


class _System(NamedTuple):
    """L_UU of a batch, one row per unknown pixel. Rows are padded to the batch's largest count
    N with empty slots (coefficients 0), so per-image reductions are plain sums over the last
    axis.

    CG touches only the unknown pixels, typically 20-30% of a photo. Each row keeps its full
    (4r+1)^2 coefficients, so no neighbour row has to be looked up. Neighbour values are read
    from a zero-bordered dense scratch image that the search direction is scattered into, so no
    index table is needed either."""

    coef: torch.Tensor  # (B, Q, N) L(i, i + d_j) for d_j = _full_offsets(radius)[j]
    inv_diag: torch.Tensor  # (B, 1, N) 1 / L_ii, 0 in empty slots
    index: torch.Tensor  # (B, N) int64 flat position in the (B, H+2R, W+2R) scratch image
    offsets: torch.Tensor  # (Q,) int64 flat offset of d_j in the scratch image
    scratch_size: int  # B * (H+2R) * (W+2R)
    counts: torch.Tensor  # (B,) int64 unknown pixels per image: slots [0, count) are rows


def _full_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """All offsets d with |dy|, |dx| <= 2r, in raster order."""
    reach = 2 * radius
    return tuple((dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1))


def _stencil_entry(stencil: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(B, P, H, W) half stencil -> (B, 1, H, W) plane of L(i, i + d) for any d in reach."""
    offsets = _half_offsets(_radius_of(stencil.shape[1]))
    reach = offsets[-1][0]
    if (dy, dx) in offsets:
        j = offsets.index((dy, dx))
        return stencil[:, j : j + 1]
    j = offsets.index((-dy, -dx))
    return _shift(stencil[:, j : j + 1], dy, dx, reach)  # L(i, i+d) = L(i+d, i)


def _compact_system(
    stencil: torch.Tensor, free: torch.Tensor, fg: torch.Tensor, dtype: torch.dtype
) -> tuple[_System, torch.Tensor]:
    """float64 stencil (B, P, H, W), unknown-pixel mask free and known-foreground mask fg
    (B, 1, H, W) -> (_System in `dtype`, right-hand side -L_UK fg_K (B, 1, N) in `dtype`).
    The right-hand side is summed in float64."""
    b, _, h, w = stencil.shape
    radius = _radius_of(stencil.shape[1])
    reach = 2 * radius
    hp, wp = h + 2 * reach, w + 2 * reach
    image_of, ys, xs = free[:, 0].nonzero(as_tuple=True)  # raster order, image by image
    counts = torch.bincount(image_of, minlength=b)
    # A multiple of 16, so the Triton kernels see one divisibility of their row count for every
    # batch instead of compiling again (stages/matting_triton.py). Empty slots cost nothing.
    n = max(16, -(-int(counts.max()) // 16) * 16)
    slot = torch.arange(image_of.numel(), device=free.device) - (torch.cumsum(counts, 0) - counts)[image_of]
    # Empty slots point at their image's scratch corner, which lies in the zero border.
    index = (torch.arange(b, device=free.device) * (hp * wp)).view(b, 1).repeat(1, n)
    index[image_of, slot] = image_of * (hp * wp) + (ys + reach) * wp + (xs + reach)
    full = _full_offsets(radius)
    coef = stencil.new_zeros((b, len(full), n))
    for j, (dy, dx) in enumerate(full):
        coef[image_of, j, slot] = _stencil_entry(stencil, dy, dx)[image_of, 0, ys, xs]
    if dtype != torch.float64:
        coef = _round_coefficients(coef, full.index((0, 0)))
    offsets = torch.tensor([dy * wp + dx for dy, dx in full], device=free.device)
    fg_padded = F.pad(fg.to(coef.dtype), (reach,) * 4).reshape(-1)
    rhs = -(coef * fg_padded[index.unsqueeze(1) + offsets.view(1, -1, 1)]).sum(1, keepdim=True)
    coef = coef.to(dtype)
    diag = coef[:, full.index((0, 0))].unsqueeze(1)
    inv_diag = torch.where(diag > 0, 1.0 / diag, torch.zeros_like(diag))
    return _System(coef, inv_diag, index, offsets, b * hp * wp, counts), rhs.to(dtype)


def _round_coefficients(coef: torch.Tensor, centre: int) -> torch.Tensor:
    """(B, Q, N) float64 rows of L -> the same with off-diagonals rounded to float16 values and
    each diagonal recomputed as minus its row's off-diagonal sum.

    Why: the Triton CG then reads the off-diagonals as float16, half the bytes of its largest
    memory stream. Why it is safe: each row holds all its (4r+1)^2 entries, so the recomputed
    diagonal keeps L's rows summing to 0 (constants stay in its null space), and L(i, j) and
    L(j, i) round alike, so the system is still a symmetric matting Laplacian, with weights
    moved by at most 2^-11 relative. Measured on DreamBench photos at 256 px: the exact solve
    moves by 5e-5 to 1.4e-4 MAD, against 3e-4 that CG's default tol leaves. Entries stay far
    inside float16's range: |L(i, j)| <= 1 + 3 |w| (28 for r = 1): at most |w| windows hold both
    pixels, each adding (1 + z_i.z_j) / |w| with |z|^2 <= 3 |w| for the whitened colours."""
    rounded = coef.to(torch.float16).to(coef.dtype)
    rounded[:, centre] = 0.0
    rounded[:, centre] = -rounded.sum(1)
    return rounded


def _apply_system(
    coef: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, scratch_size: int, x: torch.Tensor
) -> torch.Tensor:
    """L_UU x for x (B, 1, N) -> (B, 1, N). x must be 0 in empty slots."""
    scratch = torch.zeros(scratch_size, dtype=x.dtype, device=x.device).index_put((index.reshape(-1),), x.reshape(-1))
    neighbours = scratch[index.unsqueeze(1) + offsets.view(1, -1, 1)]  # (B, Q, N)
    return (coef * neighbours).sum(1, keepdim=True)


def _batch_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, 1, N) x (B, 1, N) -> (B, 1, 1) per-image inner products."""
    return (a * b).sum(-1, keepdim=True)


def _cg_step(
    coef: torch.Tensor,
    inv_diag: torch.Tensor,
    index: torch.Tensor,
    offsets: torch.Tensor,
    scratch_size: int,
    x: torch.Tensor,
    r: torch.Tensor,
    p: torch.Tensor,
    rz: torch.Tensor,
    active: torch.Tensor,
    threshold: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One PCG iteration for every image. Images with active = 0 take no step. Vectors are
    (B, 1, N) and scalars (B, 1, 1). This is the hot loop: there are no host syncs, and it is
    what torch.compile fuses on CUDA."""
    q = _apply_system(coef, index, offsets, scratch_size, p)
    pq = _batch_dot(p, q)
    step = torch.where(pq > 0, rz / pq, torch.zeros_like(pq)) * active
    x = x + step * p
    r = r - step * q
    z = inv_diag * r
    rz_new = _batch_dot(r, z)
    beta = torch.where(rz > 0, rz_new / rz, torch.zeros_like(rz))
    p = torch.where(active > 0, z + beta * p, p)
    active = active * (_batch_dot(r, r) > threshold).to(active.dtype)
    return x, r, p, rz_new, active


def _solve_pcg(
    system: _System,
    rhs: torch.Tensor,
    x: torch.Tensor,
    tol: float,
    max_iter: int,
    check_every: int,
    step_fn: Callable[..., tuple[torch.Tensor, ...]],
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Jacobi-preconditioned CG on L_UU x = rhs, where rhs and the start x are (B, 1, N).

    An image stops once ||r|| <= tol * ||rhs||, pymatting's `cg` rtol test. Every `check_every`
    iterations (the only host syncs) the loop ends if all images have stopped. When at most half
    the batch is still running, it shrinks to those images, so easy photos stop costing work.
    Returns x, a (B,) bool tensor of converged images, and the iterations run."""
    coef, inv_diag, index = system.coef, system.inv_diag, system.index
    shared = (system.offsets, system.scratch_size)
    r = rhs - _apply_system(coef, index, *shared, x)
    z = inv_diag * r
    p = z
    rz = _batch_dot(r, z)
    threshold = (tol * tol) * _batch_dot(rhs, rhs)
    active = (_batch_dot(r, r) > threshold).to(x.dtype)

    x_out = x
    rows = torch.arange(x.shape[0], device=x.device)  # row of x_out that each working row fills
    iteration = 0
    while iteration < max_iter:
        if iteration % check_every == 0:
            running = active.view(-1) > 0
            n_running = int(running.sum())
            if n_running == 0:
                break
            if 2 * n_running <= rows.numel():
                x_out = x_out.index_copy(0, rows, x)
                keep = running.nonzero().view(-1)
                rows = rows[keep]
                coef, inv_diag, index, x, r, p, rz, active, threshold = (
                    t[keep] for t in (coef, inv_diag, index, x, r, p, rz, active, threshold)
                )
        x, r, p, rz, active = step_fn(coef, inv_diag, index, *shared, x, r, p, rz, active, threshold)
        iteration += 1
    x_out = x_out.index_copy(0, rows, x)
    converged = torch.ones(x_out.shape[0], dtype=torch.bool, device=x.device)
    converged[rows] = active.view(-1) == 0
    return x_out, converged, iteration


class _Kernels(NamedTuple):
    """The two hot functions of a solve: eager, or compiled by torch.compile."""

    build_stencil: Callable[..., torch.Tensor]
    cg_step: Callable[..., tuple[torch.Tensor, ...]]


_EAGER = _Kernels(_build_stencil, _cg_step)
_compile_failed = False  # set once torch.compile has failed in this process


def _compile(fn: Callable) -> Callable:
    # dynamic=True: batch size, photo size and unknown count change between calls (and while
    # the batch shrinks), and each static shape would compile anew. Some guards still
    # specialise (a batch shrunk to one photo, say), and past dynamo's default limit of 8
    # recompiles a function falls back to eager for the rest of the process.
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
    return torch.compile(fn, dynamic=True)


@functools.cache
def _compiled_kernels() -> _Kernels:
    return _Kernels(_compile(_build_stencil), _compile(_cg_step))


def _triton_kernels() -> _Kernels:
    from stages.laplacian_triton import build_stencil

    return _Kernels(build_stencil, _cg_step)


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


def _window_weight(valid: torch.Tensor, radius: int) -> torch.Tensor | None:
    """(B, 1, H, W) photo mask -> (B, 1, H-2r, W-2r), 1 for windows fully inside the photo.
    Returns None when nothing is padded."""
    if bool(valid.min() > 0):
        return None
    k = 2 * radius + 1
    return -F.max_pool2d(-valid, k, stride=1)


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

    stencil = kernels.build_stencil(image, _window_weight(valid, radius), epsilon, radius)
    system, rhs = _compact_system(stencil, free, fg, fg.dtype)
    del stencil
    # A zero right-hand side means the unknowns are 0. Starting there makes r = 0, so the image
    # stops at once instead of chasing a relative tolerance of 0.
    x0 = torch.where(_batch_dot(rhs, rhs) > 0, _gather(x0, system), torch.zeros_like(rhs))
    if cg == "torch":
        x, converged, iterations = _solve_pcg(system, rhs, x0, tol, max_iter, check_every, kernels.cg_step)
    else:
        from stages.matting_triton import solve_pcg_triton

        r0 = rhs - _apply_system(system.coef, system.index, system.offsets, system.scratch_size, x0)
        reach = (math.isqrt(system.offsets.numel()) - 1) // 2
        row_stride = w + 2 * reach
        x, converged, iterations = solve_pcg_triton(
            system.coef, system.inv_diag, system.index, system.counts, system.scratch_size, row_stride,
            rhs, x0, r0, tol, max_iter, check_every, graphs=cg == "triton-graphs",
        )  # fmt: skip
    logger.debug("closed-form matting: %d photos at %dx%d, %d CG iterations", image.shape[0], h, w, iterations)
    return (fg + _scatter(x, system, fg)).clamp(0.0, 1.0), converged


def _gather(dense: torch.Tensor, system: _System) -> torch.Tensor:
    """(B, 1, H, W) pixel values -> (B, 1, N) at the unknown pixels (0 in empty slots)."""
    b, _, h, w = dense.shape
    reach = (math.isqrt(system.offsets.numel()) - 1) // 2
    padded = F.pad(dense, (reach,) * 4).reshape(-1)
    values = padded[system.index].view(b, 1, -1)
    return values * (system.inv_diag != 0)


def _scatter(x: torch.Tensor, system: _System, like: torch.Tensor) -> torch.Tensor:
    """(B, 1, N) unknown-pixel values -> (B, 1, H, W) image, 0 at known pixels."""
    b, _, h, w = like.shape
    reach = (math.isqrt(system.offsets.numel()) - 1) // 2
    padded = torch.zeros(system.scratch_size, dtype=x.dtype, device=x.device)
    padded = padded.index_put((system.index.reshape(-1),), x.reshape(-1))
    return padded.view(b, 1, h + 2 * reach, w + 2 * reach)[..., reach : reach + h, reach : reach + w]


# ---------------------------------------------------------------------------------------------
# Input handling shared by the public functions
# ---------------------------------------------------------------------------------------------


def _as_tensor(a: _ArrayLike, device: torch.device | str | None) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
    if not t.is_floating_point():
        raise TypeError(f"expected float32 or float64 arrays, got {t.dtype}")
    return t.to(device) if device is not None else t


def _working_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _pad_to(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(H, W, ...) -> (h, w, ...), zero padded at the bottom and right."""
    pad = torch.zeros((h, w, *t.shape[2:]), dtype=t.dtype, device=t.device)
    pad[: t.shape[0], : t.shape[1]] = t
    return pad


def _to_output(t: torch.Tensor, like: _ArrayLike) -> _ArrayLike:
    if isinstance(like, np.ndarray):
        return t.cpu().numpy()
    return t.to(like.device)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def estimate_alpha_cf_torch(
    images: _ArrayLike | Sequence[_ArrayLike],
    trimaps: _ArrayLike | Sequence[_ArrayLike],
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
) -> _ArrayLike | list[_ArrayLike]:
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
        Triton kernels of stages/laplacian_triton.py, which Triton keeps on disk.
    cg: how CG iterates. "torch" is the torch loop (compiled with `compile`); "triton" runs the
        Triton kernels of stages/matting_triton.py, and "triton-graphs" replays them as CUDA
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
        imgs = [_as_tensor(i, device) for i in images]
        tris = [_as_tensor(t, imgs[0].device) for t in trimaps]
        h = max(i.shape[0] for i in imgs)
        w = max(i.shape[1] for i in imgs)
        alpha = _estimate_alpha_batch(
            torch.stack([_pad_to(i, h, w) for i in imgs]),
            torch.stack([_pad_to(t, h, w) for t in tris]),
            torch.stack([_pad_to(torch.ones_like(t), h, w) for t in tris]),
            **options,
        )
        return [_to_output(a[: t.shape[0], : t.shape[1]], like) for a, t, like in zip(alpha, tris, images, strict=True)]

    img = _as_tensor(images, device)
    tri = _as_tensor(trimaps, img.device)
    single = img.dim() == 3
    if single:
        img, tri = img.unsqueeze(0), tri.unsqueeze(0)
    if img.dim() != 4 or img.shape[-1] != 3 or tri.shape != img.shape[:-1]:
        raise ValueError(
            f"expected images (B, H, W, 3) and trimaps (B, H, W), got {tuple(img.shape)} and {tuple(tri.shape)}"
        )
    alpha = _estimate_alpha_batch(img, tri, None, **options)
    return _to_output(alpha[0] if single else alpha, images)


CG_CHOICES = ("auto", "torch", "triton", "triton-graphs")
_triton_failed: list[str] = []  # the error, once the Triton kernels have failed in this process


@functools.cache
def _triton_importable() -> bool:
    try:
        import stages.matting_triton  # noqa: F401
    except Exception as exc:  # ImportError, or a Triton that cannot find its backend
        logger.info("Triton CG kernels unavailable (%r)", exc)
        return False
    return True


def _triton_usable(image: torch.Tensor) -> bool:
    """Whether this process runs the Triton kernels on `image`: float32 on CUDA, with a Triton
    that imports and has not failed here."""
    return image.is_cuda and image.dtype == torch.float32 and not _triton_failed and _triton_importable()


def _resolve_cg(cg: str, image: torch.Tensor) -> str:
    if cg not in CG_CHOICES:
        raise ValueError(f"cg must be one of {CG_CHOICES}, got {cg!r}")
    if cg == "auto":
        return "triton-graphs" if _triton_usable(image) else "torch"
    if cg != "torch" and image.dtype != torch.float32:
        raise ValueError(f"cg={cg!r} solves in float32 only, got {image.dtype} images")
    if cg == "triton-graphs" and not image.is_cuda:
        raise ValueError("cg='triton-graphs' needs CUDA tensors (CUDA graphs)")
    return cg


def _is_triton_error(exc: Exception) -> bool:
    """Errors from building or launching Triton kernels (not out-of-memory or bad input)."""
    return type(exc).__module__.split(".")[0] == "triton" or isinstance(exc, ImportError)


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
    global _compile_failed
    dtype = _working_dtype(images)
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

    cg = _resolve_cg(cg, image)
    use_compile = (image.is_cuda if compile is None else compile) and not _compile_failed
    if cg != "torch":
        # Nothing for torch.compile to do: dynamo re-traced the stencil build at every process
        # start, 25 s even on warm caches (BENCHMARKS.md, "Matte actor").
        kernels = _triton_kernels()
    else:
        kernels = _compiled_kernels() if use_compile else _EAGER
    solve = functools.partial(
        _solve_alpha,
        epsilon=epsilon,
        radius=radius,
        tol=tol,
        max_iter=max_iter,
        check_every=check_every,
        coarse_to_fine=coarse_to_fine,
    )
    try:
        alpha, converged = solve(image, fg, bg, inside, kernels=kernels, cg=cg)
    except Exception as exc:
        # torch.compile and Triton need a working toolchain; anything else (out of memory, bad
        # input) is not a reason to fall back.
        from torch._dynamo.exc import TorchDynamoException

        if cg != "torch" and _is_triton_error(exc):
            _triton_failed.append(repr(exc))  # a failed build costs its time again, so try once
            logger.warning("the Triton CG kernels failed (%r); this process now iterates in torch", exc)
            return _estimate_alpha_batch(
                images, trimaps, valid, epsilon=epsilon, radius=radius, tol=tol, max_iter=max_iter,
                check_every=check_every, coarse_to_fine=coarse_to_fine, compile=compile, cg="torch",
            )  # fmt: skip
        if kernels is _EAGER or not isinstance(exc, TorchDynamoException):
            raise
        _compile_failed = True  # a failed compile costs its full compile time, so try once
        logger.warning("torch.compile of the matting kernels failed (%r); this process now solves eagerly", exc)
        alpha, converged = solve(image, fg, bg, inside, kernels=_EAGER, cg=cg)
    if not bool(converged.all()):
        logger.warning(
            "closed-form matting: photos %s did not reach tol=%g in %d iterations",
            (~converged).nonzero().view(-1).tolist(),
            tol,
            max_iter,
        )
    return alpha[:, 0]


def _resize_nearest(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, C, h0, w0) -> (B, C, h, w), with pymatting's nearest-neighbour rule:
    src = min(dst * size_src // size_dst, size_src - 1)."""
    h0, w0 = x.shape[-2:]
    ys = torch.clamp(torch.arange(h, device=x.device) * h0 // h, max=h0 - 1)
    xs = torch.clamp(torch.arange(w, device=x.device) * w0 // w, max=w0 - 1)
    return x[:, :, ys][:, :, :, xs]


def _neighbour(x: torch.Tensor, axis: int, step: int) -> torch.Tensor:
    """x at the next pixel along `axis` (-1: columns, -2: rows) in direction step = +-1, the
    border pixel repeating itself (pymatting clamps neighbour coordinates)."""
    n = x.shape[axis]
    if n == 1:
        return x
    if step > 0:
        return torch.cat((x.narrow(axis, 1, n - 1), x.narrow(axis, n - 1, 1)), axis)
    return torch.cat((x.narrow(axis, 0, 1), x.narrow(axis, 0, n - 1)), axis)


def _foreground_update(
    image: torch.Tensor,
    alpha: torch.Tensor,
    fg: torch.Tensor,
    bg: torch.Tensor,
    regularization: float,
    gradient_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pixel's new (fg, bg), each (B, 3, h, w), from its neighbours' current ones, for
    image (B, 3, h, w) and alpha (B, 1, h, w). Each pixel solves pymatting's 2x2 system,
    min |a F + (1-a) B - I|^2 + sum over its 4 neighbours n of
    (reg + gw |a - a_n|) (|F - F_n|^2 + |B - B_n|^2), and clamps to [0, 1]. Neighbours are
    clamped at the border."""
    a0 = alpha
    a1 = 1.0 - alpha
    weight_sum = torch.zeros_like(alpha)
    rhs_fg = a0 * image
    rhs_bg = a1 * image
    for axis, step in ((-1, -1), (-1, 1), (-2, -1), (-2, 1)):
        da = regularization + gradient_weight * (a0 - _neighbour(alpha, axis, step)).abs()
        weight_sum = weight_sum + da
        rhs_fg = rhs_fg + da * _neighbour(fg, axis, step)
        rhs_bg = rhs_bg + da * _neighbour(bg, axis, step)
    m00 = a0 * a0 + weight_sum
    m11 = a1 * a1 + weight_sum
    m01 = a0 * a1
    inv_det = 1.0 / (m00 * m11 - m01 * m01)
    new_fg = (inv_det * (m11 * rhs_fg - m01 * rhs_bg)).clamp(0.0, 1.0)
    new_bg = (inv_det * (m00 * rhs_bg - m01 * rhs_fg)).clamp(0.0, 1.0)
    return new_fg, new_bg


def _foreground_sweep(
    image: torch.Tensor,
    alpha: torch.Tensor,
    fg: torch.Tensor,
    bg: torch.Tensor,
    regularization: float,
    gradient_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One red-black Gauss-Seidel sweep: the even checkerboard cells first, then the odd cells
    from the fresh even ones. pymatting's numba sweep is a raster Gauss-Seidel sweep, which
    cannot be parallelised. Red-black is the parallel order that comes closest: at 512 px it
    lands about 4x nearer to numba than a Jacobi sweep (alpha-weighted foreground MAD 0.001
    against 0.004)."""
    h, w = alpha.shape[-2:]
    rows = torch.arange(h, device=alpha.device).view(-1, 1)
    cols = torch.arange(w, device=alpha.device).view(1, -1)
    odd = ((rows + cols) % 2).to(torch.bool)  # (h, w)
    for cells in (~odd, odd):
        new_fg, new_bg = _foreground_update(image, alpha, fg, bg, regularization, gradient_weight)
        fg = torch.where(cells, new_fg, fg)
        bg = torch.where(cells, new_bg, bg)
    return fg, bg


def _estimate_foreground_batch(
    image: torch.Tensor,
    alpha: torch.Tensor,
    regularization: float,
    n_small_iterations: int,
    n_big_iterations: int,
    small_size: int,
    gradient_weight: float,
    sweep: Callable[..., tuple[torch.Tensor, torch.Tensor]] = _foreground_sweep,
) -> tuple[torch.Tensor, torch.Tensor]:
    """image (B, 3, H, W) and alpha (B, 1, H, W) of one size -> foreground, background, each
    (B, 3, H, W) in [0, 1]. It follows pymatting's `_estimate_fb_ml` level by level. `sweep` is
    `_foreground_sweep` or its compiled form."""
    h0, w0 = alpha.shape[-2:]
    # Start from the mean colour of the sure foreground and background.
    is_fg = (alpha > 0.9).to(image.dtype)
    is_bg = (alpha < 0.1).to(image.dtype)
    fg = (image * is_fg).sum((2, 3), keepdim=True) / (is_fg.sum((2, 3), keepdim=True) + 1e-5)
    bg = (image * is_bg).sum((2, 3), keepdim=True) / (is_bg.sum((2, 3), keepdim=True) + 1e-5)

    n_levels = max(1, math.ceil(math.log2(max(w0, h0))))
    for level in range(n_levels + 1):
        # Level sizes grow geometrically from 1x1 to full size, rounded as Python rounds.
        h = round(h0 ** (level / n_levels))
        w = round(w0 ** (level / n_levels))
        image_level = _resize_nearest(image, h, w)
        alpha_level = _resize_nearest(alpha, h, w)
        fg = _resize_nearest(fg, h, w)
        bg = _resize_nearest(bg, h, w)
        small = w <= small_size and h <= small_size
        for _ in range(n_small_iterations if small else n_big_iterations):
            fg, bg = sweep(image_level, alpha_level, fg, bg, regularization, gradient_weight)
    return fg, bg


def estimate_foreground_torch(
    images: _ArrayLike | Sequence[_ArrayLike],
    alphas: _ArrayLike | Sequence[_ArrayLike],
    *,
    regularization: float = 1e-5,
    n_small_iterations: int = 10,
    n_big_iterations: int = 2,
    small_size: int = 32,
    gradient_weight: float = 1.0,
    return_background: bool = False,
    compile: bool | None = None,
    device: torch.device | str | None = None,
) -> _ArrayLike | list[_ArrayLike] | tuple[_ArrayLike | list[_ArrayLike], _ArrayLike | list[_ArrayLike]]:
    """Foreground colours for photos and their alpha mattes. This is pymatting's
    `estimate_foreground_ml` (Germer et al. 2020, multilevel), batched, with red-black sweeps
    (`_foreground_sweep` gives the measured difference).

    images: float32 (B, H, W, 3) RGB in [0, 1], one (H, W, 3) photo, or a list of photos of
        different sizes (each size is solved as its own batch: the level sizes depend on the
        photo size, so padding would change the result). Torch tensors or numpy arrays.
    alphas: float (B, H, W) in [0, 1], (H, W) or a list to match.
    regularization, n_small_iterations, n_big_iterations, small_size, gradient_weight:
        pymatting's parameters, with its defaults.
    return_background: also return the background colours.
    compile: None sweeps float32 on CUDA with the Triton kernel of stages/foreground_triton.py
        (the torch sweep's ~40 small kernels per level otherwise leave the GPU waiting on
        launches), and everything else with the torch sweep. True and False force the torch
        sweep, fused by torch.compile or eager.
    device: where to solve. The default is the images' device (CPU for numpy).

    Returns foreground float32 (float64 for float64 input) shaped like images, in [0, 1]. With
    return_background, it returns (foreground, background). numpy input gives numpy output,
    and tensors come back on the images' device."""
    options = dict(
        regularization=regularization,
        n_small_iterations=n_small_iterations,
        n_big_iterations=n_big_iterations,
        small_size=small_size,
        gradient_weight=gradient_weight,
        compile=compile,
    )
    if isinstance(images, (list, tuple)):
        if len(images) != len(alphas):
            raise ValueError(f"{len(images)} images but {len(alphas)} alphas")
        fgs: list[_ArrayLike] = [None] * len(images)  # type: ignore[list-item]
        bgs: list[_ArrayLike] = [None] * len(images)  # type: ignore[list-item]
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(tuple(image.shape), []).append(i)
        for indices in by_size.values():
            img = torch.stack([_as_tensor(images[i], device) for i in indices])
            alp = torch.stack([_as_tensor(alphas[i], img.device) for i in indices])
            fg, bg = _estimate_foreground_tensors(img, alp, **options)
            for j, i in enumerate(indices):
                fgs[i] = _to_output(fg[j], images[i])
                bgs[i] = _to_output(bg[j], images[i])
        return (fgs, bgs) if return_background else fgs

    img = _as_tensor(images, device)
    alp = _as_tensor(alphas, img.device)
    single = img.dim() == 3
    if single:
        img, alp = img.unsqueeze(0), alp.unsqueeze(0)
    fg, bg = _estimate_foreground_tensors(img, alp, **options)
    if single:
        fg, bg = fg[0], bg[0]
    fg, bg = _to_output(fg, images), _to_output(bg, images)
    return (fg, bg) if return_background else fg


def _estimate_foreground_tensors(
    images: torch.Tensor, alphas: torch.Tensor, compile: bool | None, **options: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, 3) and (B, H, W) on the solve device -> foreground and background (B, H, W, 3)."""
    global _compile_failed
    if images.dim() != 4 or images.shape[-1] != 3 or alphas.shape != images.shape[:-1]:
        raise ValueError(
            f"expected images (B, H, W, 3) and alphas (B, H, W), got {tuple(images.shape)} and {tuple(alphas.shape)}"
        )
    dtype = _working_dtype(images)
    image, alpha = images.to(dtype).permute(0, 3, 1, 2), alphas.to(dtype).unsqueeze(1)
    if compile is None and _triton_usable(image):
        try:
            from stages.foreground_triton import foreground_sweep

            fg, bg = _estimate_foreground_batch(image, alpha, sweep=foreground_sweep, **options)
            return fg.permute(0, 2, 3, 1).contiguous(), bg.permute(0, 2, 3, 1).contiguous()
        except Exception as exc:
            if not _is_triton_error(exc):
                raise
            _triton_failed.append(repr(exc))
            logger.warning("the Triton foreground sweep failed (%r); this process now sweeps in torch", exc)
    use_compile = (images.is_cuda if compile is None else compile) and not _compile_failed
    try:
        fg, bg = _estimate_foreground_batch(image, alpha, sweep=_sweep(use_compile), **options)
    except Exception as exc:
        from torch._dynamo.exc import TorchDynamoException

        if not use_compile or not isinstance(exc, TorchDynamoException):
            raise
        _compile_failed = True
        logger.warning("torch.compile of the foreground sweep failed (%r); this process now runs it eagerly", exc)
        fg, bg = _estimate_foreground_batch(image, alpha, sweep=_foreground_sweep, **options)
    return fg.permute(0, 2, 3, 1).contiguous(), bg.permute(0, 2, 3, 1).contiguous()


@functools.cache
def _compiled_sweep() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    return _compile(_foreground_sweep)


def _sweep(compiled: bool) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    return _compiled_sweep() if compiled else _foreground_sweep
