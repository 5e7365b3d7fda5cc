"""Foreground colours for photos and their alpha mattes: pymatting's `estimate_foreground_ml`
(Germer et al. 2020, multilevel), batched, in torch, on CPU or CUDA.

Its levels, initial colours, weights and clamping are pymatting's, but each sweep is a red-black
Gauss-Seidel sweep, not the raster-order (sequential) sweep of pymatting's numba version. On CUDA
the sweep runs as the Triton kernel of foreground_triton.py; _kernels.py makes that choice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from stages.matting._inputs import ArrayLike, as_tensor, to_output, working_dtype
from stages.matting._kernels import COMPILED, TRITON, compiled, kernel_choice


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
    images: ArrayLike | Sequence[ArrayLike],
    alphas: ArrayLike | Sequence[ArrayLike],
    *,
    regularization: float = 1e-5,
    n_small_iterations: int = 10,
    n_big_iterations: int = 2,
    small_size: int = 32,
    gradient_weight: float = 1.0,
    return_background: bool = False,
    compile: bool | None = None,
    device: torch.device | str | None = None,
) -> ArrayLike | list[ArrayLike] | tuple[ArrayLike | list[ArrayLike], ArrayLike | list[ArrayLike]]:
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
    compile: None sweeps float32 on CUDA with the Triton kernel of foreground_triton.py
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
        fgs: list[ArrayLike] = [None] * len(images)  # type: ignore[list-item]
        bgs: list[ArrayLike] = [None] * len(images)  # type: ignore[list-item]
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(tuple(image.shape), []).append(i)
        for indices in by_size.values():
            img = torch.stack([as_tensor(images[i], device) for i in indices])
            alp = torch.stack([as_tensor(alphas[i], img.device) for i in indices])
            fg, bg = _estimate_foreground_tensors(img, alp, **options)
            for j, i in enumerate(indices):
                fgs[i] = to_output(fg[j], images[i])
                bgs[i] = to_output(bg[j], images[i])
        return (fgs, bgs) if return_background else fgs

    img = as_tensor(images, device)
    alp = as_tensor(alphas, img.device)
    single = img.dim() == 3
    if single:
        img, alp = img.unsqueeze(0), alp.unsqueeze(0)
    fg, bg = _estimate_foreground_tensors(img, alp, **options)
    if single:
        fg, bg = fg[0], bg[0]
    fg, bg = to_output(fg, images), to_output(bg, images)
    return (fg, bg) if return_background else fg


def _estimate_foreground_tensors(
    images: torch.Tensor, alphas: torch.Tensor, compile: bool | None, **options: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, 3) and (B, H, W) on the solve device -> foreground and background (B, H, W, 3)."""
    if images.dim() != 4 or images.shape[-1] != 3 or alphas.shape != images.shape[:-1]:
        raise ValueError(
            f"expected images (B, H, W, 3) and alphas (B, H, W), got {tuple(images.shape)} and {tuple(alphas.shape)}"
        )
    dtype = working_dtype(images)
    image, alpha = images.to(dtype).permute(0, 3, 1, 2), alphas.to(dtype).unsqueeze(1)
    choice = kernel_choice()
    fg, bg = choice.run(
        choice.tiers(compile is None and choice.triton_usable(image), compile, images),
        lambda tier: _estimate_foreground_batch(image, alpha, sweep=_sweep_for(tier), **options),
        "foreground sweep",
    )
    return fg.permute(0, 2, 3, 1).contiguous(), bg.permute(0, 2, 3, 1).contiguous()


def _sweep_for(tier: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    if tier == TRITON:
        from stages.matting.foreground_triton import foreground_sweep

        return foreground_sweep
    return compiled(_foreground_sweep) if tier == COMPILED else _foreground_sweep
