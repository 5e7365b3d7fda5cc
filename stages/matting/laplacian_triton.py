"""The matting Laplacian's stencil as two Triton kernels: `laplacian.build_stencil` without
torch.compile, for the solver on CUDA.

Why: compiled by torch.compile, the stencil build cost the matte actor 25 s of dynamo tracing
at every start even with warm caches (BENCHMARKS.md, "Matte actor"), and eager it is hundreds of
float64 kernels per pyramid level. Triton keeps its compiled kernels on disk, so a process
after the first loads them in milliseconds.

Same arithmetic as `laplacian.build_stencil`, in float64:
1. `_window_kernel`, one lane per window centre: the window's colour mean and the Cholesky
   factor C of S_k = cov_k(I) + eps/|w| Id, and its weight (0 where the window leaves the
   photo or the caller's window_weight drops it).
2. `_stencil_kernel`, one lane per pixel i: for each half offset d and each window k that holds
   i and i + d (a choice made at compile time), z = C^-1 (I - mu_k) of both pixels and the
   entry delta_{d,0} - (1 + z_i . z_{i+d}) / |w|, summed over the windows. Each pixel writes its
   own planes, so there are no atomics and the sums are deterministic.

Triton is imported lazily by the caller, as for cg_triton.py; the tests run these
kernels under Triton's interpreter on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 128  # lanes per program: the float64 stencil kernel holds many live values per lane
_WINDOW_PLANES = 10  # mean (3), Cholesky factor (6), weight


@triton.jit
def _load_colour(image_ptr, base, offset, plane, mask):
    """The three float64 channels of pixel `offset` of an image whose channels start at `base`."""
    c0 = tl.load(image_ptr + base + offset, mask=mask, other=0.0).to(tl.float64)
    c1 = tl.load(image_ptr + base + plane + offset, mask=mask, other=0.0).to(tl.float64)
    c2 = tl.load(image_ptr + base + 2 * plane + offset, mask=mask, other=0.0).to(tl.float64)
    return c0, c1, c2


@triton.jit(do_not_specialize=["height", "width"])
def _window_kernel(
    image_ptr,  # (B, 3, H, W) colours in [0, 1]
    weight_ptr,  # (B, H - 2R, W - 2R) window weights, read when HAS_WEIGHT
    out_ptr,  # (B, 10, H, W) float64 out, per window centre: mu (3), C (6), weight
    height,
    width,
    ridge,  # eps / |w|
    R: tl.constexpr,
    SIDE: tl.constexpr,  # 2 R + 1 (static_range needs a constexpr, not an expression of one)
    HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    image = tl.program_id(0).to(tl.int64)
    plane = height * width
    pixel = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    y, x = pixel // width, pixel % width
    inside = (pixel < plane) & (y >= R) & (y < height - R) & (x >= R) & (x < width - R)
    base = image * 3 * plane
    s0 = tl.zeros((BLOCK,), tl.float64)
    s1, s2 = s0, s0
    q00, q01, q02, q11, q12, q22 = s0, s0, s0, s0, s0, s0
    for dy in tl.static_range(SIDE):
        for dx in tl.static_range(SIDE):
            c0, c1, c2 = _load_colour(image_ptr, base, pixel + (dy - R) * width + (dx - R), plane, inside)
            s0, s1, s2 = s0 + c0, s1 + c1, s2 + c2
            q00, q01, q02 = q00 + c0 * c0, q01 + c0 * c1, q02 + c0 * c2
            q11, q12, q22 = q11 + c1 * c1, q12 + c1 * c2, q22 + c2 * c2
    area = SIDE * SIDE
    m0, m1, m2 = s0 / area, s1 / area, s2 / area
    # S + ridge and its closed-form Cholesky factor, as in laplacian.build_stencil. Windows that leave
    # the photo get C = Id (weight 0), so that nothing downstream divides by 0.
    l00 = tl.sqrt(tl.where(inside, q00 / area - m0 * m0 + ridge, 1.0))
    l10 = tl.where(inside, (q01 / area - m0 * m1) / l00, 0.0)
    l20 = tl.where(inside, (q02 / area - m0 * m2) / l00, 0.0)
    l11 = tl.sqrt(tl.where(inside, q11 / area - m1 * m1 + ridge - l10 * l10, 1.0))
    l21 = tl.where(inside, (q12 / area - m1 * m2 - l20 * l10) / l11, 0.0)
    l22 = tl.sqrt(tl.where(inside, q22 / area - m2 * m2 + ridge - l20 * l20 - l21 * l21, 1.0))
    weight = tl.where(inside, 1.0, 0.0).to(tl.float64)
    if HAS_WEIGHT:
        inner_plane = (height - 2 * R) * (width - 2 * R)
        inner = (y - R) * (width - 2 * R) + (x - R)
        weight *= tl.load(weight_ptr + image * inner_plane + inner, mask=inside, other=0.0).to(tl.float64)
    out = out_ptr + image * 10 * plane + pixel
    mask = pixel < plane
    tl.store(out, m0, mask=mask)
    tl.store(out + plane, m1, mask=mask)
    tl.store(out + 2 * plane, m2, mask=mask)
    tl.store(out + 3 * plane, l00, mask=mask)
    tl.store(out + 4 * plane, l10, mask=mask)
    tl.store(out + 5 * plane, l20, mask=mask)
    tl.store(out + 6 * plane, l11, mask=mask)
    tl.store(out + 7 * plane, l21, mask=mask)
    tl.store(out + 8 * plane, l22, mask=mask)
    tl.store(out + 9 * plane, weight, mask=mask)


@triton.jit
def _whiten(c0, c1, c2, m0, m1, m2, l00, l10, l20, l11, l21, l22):
    """C^-1 (I - mu) by forward substitution."""
    z0 = (c0 - m0) / l00
    z1 = (c1 - m1 - l10 * z0) / l11
    z2 = (c2 - m2 - l20 * z0 - l21 * z1) / l22
    return z0, z1, z2


@triton.jit(do_not_specialize=["height", "width"])
def _stencil_kernel(
    image_ptr,  # (B, 3, H, W) colours
    window_ptr,  # (B, 10, H, W) float64 from _window_kernel
    out_ptr,  # (B, P, H, W) float64 out: plane j holds L(i, i + d_j), d_j = _half_offsets(R)[j]
    height,
    width,
    R: tl.constexpr,
    SIDE: tl.constexpr,  # 2 R + 1, a window's side
    REACH: tl.constexpr,  # 2 R, the stencil's reach
    SPAN: tl.constexpr,  # 4 R + 1, the stencil's side
    BLOCK: tl.constexpr,
):
    image = tl.program_id(0).to(tl.int64)
    plane = height * width
    pixel = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = pixel < plane
    y, x = pixel // width, pixel % width
    base = image * 3 * plane
    windows = window_ptr + image * 10 * plane
    i0, i1, i2 = _load_colour(image_ptr, base, pixel, plane, mask)
    area = SIDE * SIDE
    for oy in tl.static_range(REACH + 1):  # the half offsets d = (oy, ox - REACH), raster order
        for ox in tl.static_range(SPAN):
            if oy > 0 or ox >= REACH:
                acc = tl.zeros((BLOCK,), tl.float64)
                for wy in tl.static_range(SIDE):  # windows centred at i + (wy - R, wx - R)
                    for wx in tl.static_range(SIDE):
                        # ... that also hold i + d: decided here, at compile time.
                        if oy - wy <= 0 and wy - oy <= 2 * R and ox - wx <= REACH and wx - ox <= 0:
                            cy, cx = y + (wy - R), x + (wx - R)
                            ok = mask & (cy >= 0) & (cy < height) & (cx >= 0) & (cx < width)
                            at = windows + pixel + (wy - R) * width + (wx - R)
                            weight = tl.load(at + 9 * plane, mask=ok, other=0.0)
                            m0 = tl.load(at, mask=ok, other=0.0)
                            m1 = tl.load(at + plane, mask=ok, other=0.0)
                            m2 = tl.load(at + 2 * plane, mask=ok, other=0.0)
                            l00 = tl.load(at + 3 * plane, mask=ok, other=1.0)
                            l10 = tl.load(at + 4 * plane, mask=ok, other=0.0)
                            l20 = tl.load(at + 5 * plane, mask=ok, other=0.0)
                            l11 = tl.load(at + 6 * plane, mask=ok, other=1.0)
                            l21 = tl.load(at + 7 * plane, mask=ok, other=0.0)
                            l22 = tl.load(at + 8 * plane, mask=ok, other=1.0)
                            a0, a1, a2 = _whiten(i0, i1, i2, m0, m1, m2, l00, l10, l20, l11, l21, l22)
                            # A window that holds i + d lies in the photo only if i + d does.
                            qy, qx = y + oy, x + (ox - REACH)
                            q_ok = ok & (weight > 0) & (qy < height) & (qx >= 0) & (qx < width)
                            shift = oy * width + (ox - REACH)
                            j0, j1, j2 = _load_colour(image_ptr, base, pixel + shift, plane, q_ok)
                            b0, b1, b2 = _whiten(j0, j1, j2, m0, m1, m2, l00, l10, l20, l11, l21, l22)
                            delta = 1.0 if oy == 0 and ox == REACH else 0.0
                            entry = delta - (1.0 + a0 * b0 + a1 * b1 + a2 * b2) / area
                            acc += tl.where(q_ok, entry * weight, 0.0)
                j = ox - REACH if oy == 0 else (REACH + 1) + (oy - 1) * SPAN + ox
                tl.store(out_ptr + (image * (REACH * SPAN + REACH + 1) + j) * plane + pixel, acc, mask=mask)


def build_stencil(image: torch.Tensor, window_weight: torch.Tensor | None, epsilon: float, radius: int) -> torch.Tensor:
    """`laplacian.build_stencil` on the image's CUDA device (or Triton's interpreter):
    colours (B, 3, H, W) -> the stencil (B, P, H, W), float64. window_weight (B, 1, H-2r,
    W-2r) or None, as there."""
    b, _, h, w = image.shape
    side = 2 * radius + 1
    span = 4 * radius + 1
    n_planes = (span * span + 1) // 2
    image = image.contiguous()
    windows = torch.empty((b, _WINDOW_PLANES, h, w), dtype=torch.float64, device=image.device)
    stencil = torch.empty((b, n_planes, h, w), dtype=torch.float64, device=image.device)
    grid = (b, triton.cdiv(h * w, _BLOCK))
    weight = image if window_weight is None else window_weight.to(image.dtype).contiguous()
    _window_kernel[grid](
        image, weight, windows, h, w, epsilon / (side * side),
        R=radius, SIDE=side, HAS_WEIGHT=window_weight is not None, BLOCK=_BLOCK,
    )  # fmt: skip
    _stencil_kernel[grid](image, windows, stencil, h, w, R=radius, SIDE=side, REACH=2 * radius, SPAN=span, BLOCK=_BLOCK)
    return stencil
