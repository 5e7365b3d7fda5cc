"""The matting Laplacian of Levin et al. (2008): its stencil, and the unknown pixels' rows of it.

With windows w_k of |w| = (2r+1)^2 pixels lying fully inside the photo, colour means mu_k and
S_k = cov_k(I) + eps/|w| * Id, the matting Laplacian is

    L_ij = sum_{k : i, j in w_k} ( delta_ij - (1 + (I_i - mu_k)^T S_k^-1 (I_j - mu_k)) / |w| ).

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
is accurate, the two agree to ~1e-4 (see tests/stages/test_matting.py).

`build_stencil` has a Triton twin for CUDA (laplacian_triton.py) that computes the same entries.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


def half_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """Offsets d = (dy, dx) of the stencil's upper half: (0, 0) first, then d > 0 in raster
    order. Two pixels share a window when |dy|, |dx| <= 2r. L(i, i - d) is read from the
    neighbour's L(i - d, i), so ((4r+1)^2 + 1) / 2 planes hold all of L."""
    reach = 2 * radius
    rest = [(dy, dx) for dy in range(reach + 1) for dx in range(-reach, reach + 1) if dy > 0 or dx > 0]
    return ((0, 0), *rest)


def _radius_of(n_planes: int) -> int:
    """Inverse of len(half_offsets(r))."""
    return (math.isqrt(2 * n_planes - 1) - 1) // 4


def _box_sum_valid(x: torch.Tensor, r: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H-2r, W-2r): the sum over each (2r+1)^2 window lying fully inside.
    Separable and direct. A cumsum would cancel in its differences."""
    k = 2 * r + 1
    x = F.avg_pool2d(x, (k, 1), stride=1)
    return F.avg_pool2d(x, (1, k), stride=1) * (k * k)


def build_stencil(image: torch.Tensor, window_weight: torch.Tensor | None, epsilon: float, radius: int) -> torch.Tensor:
    """Colours (B, 3, H, W) in [0, 1] -> the matting Laplacian's stencil (B, P, H, W), float64.

    Plane j holds L(i, i + d_j) for d_j = half_offsets(radius)[j]. It is zero where no window
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
    offsets = half_offsets(r)
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


class System(NamedTuple):
    """L_UU of a batch, one row per unknown pixel. Rows are padded to the batch's largest count
    N with empty slots (coefficients 0), so per-image reductions are plain sums over the last
    axis.

    CG touches only the unknown pixels, typically 20-30% of a photo. Each row keeps its full
    (4r+1)^2 coefficients, so no neighbour row has to be looked up. Neighbour values are read
    from a zero-bordered dense scratch image that the search direction is scattered into, so no
    index table is needed either."""

    coef: torch.Tensor  # (B, Q, N) L(i, i + d_j) for d_j = full_offsets(radius)[j]
    inv_diag: torch.Tensor  # (B, 1, N) 1 / L_ii, 0 in empty slots
    index: torch.Tensor  # (B, N) int64 flat position in the (B, H+2R, W+2R) scratch image
    offsets: torch.Tensor  # (Q,) int64 flat offset of d_j in the scratch image
    scratch_size: int  # B * (H+2R) * (W+2R)
    counts: torch.Tensor  # (B,) int64 unknown pixels per image: slots [0, count) are rows


def full_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """All offsets d with |dy|, |dx| <= 2r, in raster order."""
    reach = 2 * radius
    return tuple((dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1))


def _stencil_entry(stencil: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(B, P, H, W) half stencil -> (B, 1, H, W) plane of L(i, i + d) for any d in reach."""
    offsets = half_offsets(_radius_of(stencil.shape[1]))
    reach = offsets[-1][0]
    if (dy, dx) in offsets:
        j = offsets.index((dy, dx))
        return stencil[:, j : j + 1]
    j = offsets.index((-dy, -dx))
    return _shift(stencil[:, j : j + 1], dy, dx, reach)  # L(i, i+d) = L(i+d, i)


def compact_system(
    stencil: torch.Tensor, free: torch.Tensor, fg: torch.Tensor, dtype: torch.dtype
) -> tuple[System, torch.Tensor]:
    """float64 stencil (B, P, H, W), unknown-pixel mask free and known-foreground mask fg
    (B, 1, H, W) -> (System in `dtype`, right-hand side -L_UK fg_K (B, 1, N) in `dtype`).
    The right-hand side is summed in float64."""
    b, _, h, w = stencil.shape
    radius = _radius_of(stencil.shape[1])
    reach = 2 * radius
    hp, wp = h + 2 * reach, w + 2 * reach
    image_of, ys, xs = free[:, 0].nonzero(as_tuple=True)  # raster order, image by image
    counts = torch.bincount(image_of, minlength=b)
    # A multiple of 16, so the Triton kernels see one divisibility of their row count for every
    # batch instead of compiling again (cg_triton.py). Empty slots cost nothing.
    n = max(16, -(-int(counts.max()) // 16) * 16)
    slot = torch.arange(image_of.numel(), device=free.device) - (torch.cumsum(counts, 0) - counts)[image_of]
    # Empty slots point at their image's scratch corner, which lies in the zero border.
    index = (torch.arange(b, device=free.device) * (hp * wp)).view(b, 1).repeat(1, n)
    index[image_of, slot] = image_of * (hp * wp) + (ys + reach) * wp + (xs + reach)
    full = full_offsets(radius)
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
    return System(coef, inv_diag, index, offsets, b * hp * wp, counts), rhs.to(dtype)


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


def inside_windows(valid: torch.Tensor, radius: int) -> torch.Tensor | None:
    """(B, 1, H, W) photo mask -> (B, 1, H-2r, W-2r), 1 for windows fully inside the photo.
    Returns None when nothing is padded."""
    if bool(valid.min() > 0):
        return None
    k = 2 * radius + 1
    return -F.max_pool2d(-valid, k, stride=1)


def gather_unknowns(dense: torch.Tensor, system: System) -> torch.Tensor:
    """(B, 1, H, W) pixel values -> (B, 1, N) at the unknown pixels (0 in empty slots)."""
    b, _, h, w = dense.shape
    reach = (math.isqrt(system.offsets.numel()) - 1) // 2
    padded = F.pad(dense, (reach,) * 4).reshape(-1)
    values = padded[system.index].view(b, 1, -1)
    return values * (system.inv_diag != 0)


def scatter_unknowns(x: torch.Tensor, system: System, like: torch.Tensor) -> torch.Tensor:
    """(B, 1, N) unknown-pixel values -> (B, 1, H, W) image, 0 at known pixels."""
    b, _, h, w = like.shape
    reach = (math.isqrt(system.offsets.numel()) - 1) // 2
    padded = torch.zeros(system.scratch_size, dtype=x.dtype, device=x.device)
    padded = padded.index_put((system.index.reshape(-1),), x.reshape(-1))
    return padded.view(b, 1, h + 2 * reach, w + 2 * reach)[..., reach : reach + h, reach : reach + w]
