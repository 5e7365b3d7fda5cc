"""The foreground estimation's red-black sweep as one Triton kernel, for
`foreground.estimate_foreground_torch` on CUDA.

Why: the torch sweep is ~40 small kernels per level, so on CUDA it was compiled with
torch.compile, and dynamo re-traced it at every process start (10 s on warm caches, 40 s cold:
BENCHMARKS.md, "Matte actor"). Triton keeps its compiled kernel on disk.

One launch updates the cells of one colour in place: a cell's four neighbours all have the
other colour, so no lane reads what another writes, and the result is what
`foreground._foreground_sweep` computes, in the same order of operations.

Triton is imported lazily by the caller; the tests run the kernel under Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 512


@triton.jit
def _gather(ptr, channel, a, neighbour, plane, mask):
    return tl.load(ptr + channel * plane + neighbour, mask=mask, other=0.0) * a


@triton.jit(do_not_specialize=["height", "width", "parity"])
def _sweep_kernel(
    image_ptr,  # (B, 3, H, W)
    alpha_ptr,  # (B, 1, H, W)
    fg_ptr,  # (B, 3, H, W) in/out
    bg_ptr,  # (B, 3, H, W) in/out
    height,
    width,
    parity,  # update the cells with (y + x) % 2 == parity
    regularization,
    gradient_weight,
    BLOCK: tl.constexpr,
):
    image = tl.program_id(0).to(tl.int64)
    plane = height * width
    pixel = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    y, x = pixel // width, pixel % width
    mask = (pixel < plane) & ((y + x) % 2 == parity)
    alpha = alpha_ptr + image * plane
    colours = image * 3 * plane
    a0 = tl.load(alpha + pixel, mask=mask, other=0.0)
    a1 = 1.0 - a0
    i0 = tl.load(image_ptr + colours + pixel, mask=mask, other=0.0)
    i1 = tl.load(image_ptr + colours + plane + pixel, mask=mask, other=0.0)
    i2 = tl.load(image_ptr + colours + 2 * plane + pixel, mask=mask, other=0.0)
    f0, f1, f2 = a0 * i0, a0 * i1, a0 * i2
    b0, b1, b2 = a1 * i0, a1 * i1, a1 * i2
    weight_sum = tl.zeros_like(a0)
    fg = fg_ptr + colours
    bg = bg_ptr + colours
    # Left, right, up, down, as _foreground_sweep adds them; the border pixel is its own
    # neighbour (pymatting clamps).
    for side in tl.static_range(4):
        if side == 0:
            neighbour = y * width + tl.maximum(x - 1, 0)
        elif side == 1:
            neighbour = y * width + tl.minimum(x + 1, width - 1)
        elif side == 2:
            neighbour = tl.maximum(y - 1, 0) * width + x
        else:
            neighbour = tl.minimum(y + 1, height - 1) * width + x
        da = regularization + gradient_weight * tl.abs(a0 - tl.load(alpha + neighbour, mask=mask, other=0.0))
        weight_sum += da
        f0 += _gather(fg, 0, da, neighbour, plane, mask)
        f1 += _gather(fg, 1, da, neighbour, plane, mask)
        f2 += _gather(fg, 2, da, neighbour, plane, mask)
        b0 += _gather(bg, 0, da, neighbour, plane, mask)
        b1 += _gather(bg, 1, da, neighbour, plane, mask)
        b2 += _gather(bg, 2, da, neighbour, plane, mask)
    m00 = a0 * a0 + weight_sum
    m11 = a1 * a1 + weight_sum
    m01 = a0 * a1
    inv_det = 1.0 / tl.where(mask, m00 * m11 - m01 * m01, 1.0)
    for channel in tl.static_range(3):
        if channel == 0:
            rf, rb = f0, b0
        elif channel == 1:
            rf, rb = f1, b1
        else:
            rf, rb = f2, b2
        new_fg = tl.minimum(tl.maximum(inv_det * (m11 * rf - m01 * rb), 0.0), 1.0)
        new_bg = tl.minimum(tl.maximum(inv_det * (m00 * rb - m01 * rf), 0.0), 1.0)
        tl.store(fg + channel * plane + pixel, new_fg, mask=mask)
        tl.store(bg + channel * plane + pixel, new_bg, mask=mask)


def foreground_sweep(
    image: torch.Tensor,
    alpha: torch.Tensor,
    fg: torch.Tensor,
    bg: torch.Tensor,
    regularization: float,
    gradient_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`foreground._foreground_sweep`: image, fg, bg (B, 3, h, w) and alpha (B, 1, h, w) ->
    the swept (fg, bg). fg and bg are updated in place when contiguous."""
    b, _, h, w = alpha.shape
    image, alpha = image.contiguous(), alpha.contiguous()
    fg, bg = fg.contiguous(), bg.contiguous()
    grid = (b, triton.cdiv(h * w, _BLOCK))
    for parity in (0, 1):  # the even cells first, as the torch sweep
        _sweep_kernel[grid](image, alpha, fg, bg, h, w, parity, regularization, gradient_weight, BLOCK=_BLOCK)
    return fg, bg
