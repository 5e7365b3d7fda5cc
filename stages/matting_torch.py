"""Batched closed-form matting (Levin et al. 2008) and multilevel foreground estimation in torch.

GPU counterpart of pymatting's `estimate_alpha_cf` and `estimate_foreground_ml`, for the matte
stage. Pure tensor functions: no Ray, no I/O.

The solver never forms the matting Laplacian. With windows w_k of (2r+1)^2 pixels, colour mean
mu_k and regularised covariance S_k = cov_k(I) + eps/|w| * Id, Levin's Laplacian applied to x is

    (L x)_i = sum_{k : i in w_k} [ x_i - xbar_k - (I_i - mu_k)^T S_k^-1 cov_k(I, x) ]

which needs only box filters and a 3x3 inverse per window (He et al. 2010, "Fast matting using
large kernel matting Laplacian matrices", write the same product). It is solved by Jacobi-
preconditioned conjugate gradients for the whole batch at once, on the system pymatting solves.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

# pymatting's trimap_split: values <= 0.1 are background, >= 0.9 foreground, the rest unknown.
BG_THRESHOLD = 0.1
FG_THRESHOLD = 0.9


def _box_sum_valid(x: torch.Tensor, r: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H-2r, W-2r): sum over each (2r+1)^2 window that lies fully inside.

    Separable and direct (no cumsum): a running sum over 1024 float32 values would cancel
    catastrophically in the differences, and r is small."""
    k = 2 * r + 1
    x = F.avg_pool2d(x, (k, 1), stride=1)
    return F.avg_pool2d(x, (1, k), stride=1) * (k * k)


def _box_sum_full(y: torch.Tensor, r: int) -> torch.Tensor:
    """Adjoint of `_box_sum_valid`: (N, C, Hv, Wv) window values -> (N, C, Hv+2r, Wv+2r), each
    pixel summing the windows that contain it."""
    return _box_sum_valid(F.pad(y, (2 * r,) * 4), r)


class _Laplacian(NamedTuple):
    """What defines the matting Laplacian of a batch. Window grids are (B, C, H-2r, W-2r), one
    entry per window centre; pixel grids are (B, C, H, W)."""

    image: torch.Tensor  # (B, 3, H, W) colours in [0, 1]
    mean: torch.Tensor  # (B, 3, Hv, Wv) window colour means mu_k
    inv_cov: torch.Tensor  # (B, 6, Hv, Wv) S_k^-1 as (00, 01, 02, 11, 12, 22); 0 for dropped windows
    weight: torch.Tensor | None  # (B, 1, Hv, Wv) 1 for windows inside the photo, 0 in padding
    count: torch.Tensor  # (B, 1, H, W) windows containing each pixel
    diag: torch.Tensor  # (B, 1, H, W) L_ii
    radius: int


def _sym3_matvec(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Symmetric 3x3 matrix (B, 6, ...) as (00, 01, 02, 11, 12, 22) times vector (B, 3, ...)."""
    m00, m01, m02, m11, m12, m22 = m.unbind(1)
    v0, v1, v2 = v.unbind(1)
    return torch.stack(
        (m00 * v0 + m01 * v1 + m02 * v2, m01 * v0 + m11 * v1 + m12 * v2, m02 * v0 + m12 * v1 + m22 * v2), 1
    )


def _sym3_inverse(s: torch.Tensor) -> torch.Tensor:
    """Inverse of symmetric 3x3 matrices (B, 6, ...) by adjugate over determinant."""
    s00, s01, s02, s11, s12, s22 = s.unbind(1)
    i00 = s11 * s22 - s12 * s12
    i01 = s02 * s12 - s01 * s22
    i02 = s01 * s12 - s02 * s11
    i11 = s00 * s22 - s02 * s02
    i12 = s01 * s02 - s00 * s12
    i22 = s00 * s11 - s01 * s01
    det = s00 * i00 + s01 * i01 + s02 * i02
    return torch.stack((i00, i01, i02, i11, i12, i22), 1) / det.unsqueeze(1)


def _build_laplacian(
    image: torch.Tensor, weight: torch.Tensor | None, epsilon: float, r: int, dtype: torch.dtype
) -> _Laplacian:
    """(B, 3, H, W) colours -> the Laplacian's data in `dtype`.

    Statistics are taken in float64: in flat regions cov_k is far below float32's resolution of
    E[I I^T] - mu mu^T (~1e-7), while epsilon / |w| is ~1e-8, so float32 would give indefinite
    S_k there."""
    k2 = (2 * r + 1) ** 2
    img = image.double()
    mean = _box_sum_valid(img, r) / k2
    c0, c1, c2 = img.unbind(1)
    products = torch.stack((c0 * c0, c0 * c1, c0 * c2, c1 * c1, c1 * c2, c2 * c2), 1)
    m0, m1, m2 = mean.unbind(1)
    mean_products = torch.stack((m0 * m0, m0 * m1, m0 * m2, m1 * m1, m1 * m2, m2 * m2), 1)
    cov = _box_sum_valid(products, r) / k2 - mean_products
    # pymatting adds epsilon to the window sums before dividing by |w|, i.e. eps/|w| to cov.
    ridge = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0], dtype=cov.dtype, device=cov.device)
    inv_cov = _sym3_inverse(cov + (epsilon / k2) * ridge.view(1, 6, 1, 1))
    if weight is not None:
        inv_cov = inv_cov * weight.double()
        window_ones = weight.double()
    else:
        window_ones = torch.ones_like(mean[:, :1])
    count = _box_sum_full(window_ones, r)

    # L_ii = sum_k (1 - (1 + c_ik^T S_k^-1 c_ik) / |w|), with c_ik = I_i - mu_k centred in
    # float64, one window offset at a time.
    b, _, h, w = img.shape
    hv, wv = h - 2 * r, w - 2 * r
    diag = torch.zeros((b, 1, h, w), dtype=torch.float64, device=img.device)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            c = img[:, :, dy : dy + hv, dx : dx + wv] - mean
            quad = (c * _sym3_matvec(inv_cov, c)).sum(1, keepdim=True)
            diag[:, :, dy : dy + hv, dx : dx + wv] += (1.0 - (1.0 + quad) / k2) * window_ones

    return _Laplacian(
        image=image.to(dtype),
        mean=mean.to(dtype),
        inv_cov=inv_cov.to(dtype),
        weight=None if weight is None else weight.to(dtype),
        count=count.to(dtype),
        diag=diag.to(dtype),
        radius=r,
    )


def _apply_laplacian(lap: _Laplacian, x: torch.Tensor) -> torch.Tensor:
    """L x for x (B, 1, H, W) -> (B, 1, H, W), matrix-free in two box-filter passes."""
    r = lap.radius
    k2 = (2 * r + 1) ** 2
    image = lap.image
    sums = _box_sum_valid(torch.cat((x, image * x), 1), r) / k2  # (B, 4, Hv, Wv): E_k[x], E_k[I x]
    x_mean = sums[:, :1]
    if lap.weight is not None:
        x_mean = x_mean * lap.weight
    a = _sym3_matvec(lap.inv_cov, sums[:, 1:] - lap.mean * sums[:, :1])  # S^-1 cov_k(I, x)
    b = x_mean - (a * lap.mean).sum(1, keepdim=True)
    back = _box_sum_full(torch.cat((a, b), 1), r)  # (B, 4, H, W)
    return lap.count * x - (back[:, :3] * image).sum(1, keepdim=True) - back[:, 3:]


def _batch_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) x (B, 1, H, W) -> (B, 1, 1, 1) per-image inner products."""
    return (a * b).sum((1, 2, 3), keepdim=True)


def _solve_pcg(
    lap: _Laplacian,
    rhs: torch.Tensor,
    free: torch.Tensor,
    x: torch.Tensor,
    tol: float,
    max_iter: int,
    check_every: int,
) -> tuple[torch.Tensor, int]:
    """Jacobi-preconditioned CG on (P L P) x = rhs for every image of the batch at once.

    free: (B, 1, H, W) 1 at unknown pixels, 0 at known ones (P); rhs and x are zero where free is
    0. Stops an image once ||r|| <= tol * ||rhs|| (pymatting's `cg` rtol test); the batch leaves
    the loop when every image has stopped, checked every `check_every` iterations (the only host
    syncs). Returns x and the iterations run."""
    inv_diag = torch.where(free > 0, 1.0 / lap.diag, torch.zeros_like(lap.diag))
    r = rhs - free * _apply_laplacian(lap, x)
    z = inv_diag * r
    p = z
    rz = _batch_dot(r, z)
    threshold = (tol * tol) * _batch_dot(rhs, rhs)
    active = (_batch_dot(r, r) > threshold).to(x.dtype)
    iteration = 0
    while iteration < max_iter:
        if iteration % check_every == 0 and not bool(active.any()):
            break
        q = free * _apply_laplacian(lap, p)
        pq = _batch_dot(p, q)
        # Stopped images (and degenerate ones with p^T L p = 0) take a zero step.
        step = torch.where(pq > 0, rz / pq, torch.zeros_like(pq)) * active
        x = x + step * p
        r = r - step * q
        z = inv_diag * r
        rz_new = _batch_dot(r, z)
        beta = torch.where(rz > 0, rz_new / rz, torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_new
        active = active * (_batch_dot(r, r) > threshold).to(x.dtype)
        iteration += 1
    return x, iteration
