"""Batched Jacobi-preconditioned conjugate gradients on the unknown pixels' system L_UU x = b.

One system per photo of the batch, all iterated at once; a photo stops on pymatting's `cg` test,
||r|| <= tol * ||b||. Two loops solve it: `solve_pcg` in torch (eager or compiled, on any
device), and the Triton kernels of cg_triton.py on CUDA. `solve` picks one by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from stages.matting.laplacian import System


def apply_system(
    coef: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, scratch_size: int, x: torch.Tensor
) -> torch.Tensor:
    """L_UU x for x (B, 1, N) -> (B, 1, N). x must be 0 in empty slots."""
    scratch = torch.zeros(scratch_size, dtype=x.dtype, device=x.device).index_put((index.reshape(-1),), x.reshape(-1))
    neighbours = scratch[index.unsqueeze(1) + offsets.view(1, -1, 1)]  # (B, Q, N)
    return (coef * neighbours).sum(1, keepdim=True)


def batch_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, 1, N) x (B, 1, N) -> (B, 1, 1) per-image inner products."""
    return (a * b).sum(-1, keepdim=True)


def cg_step(
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
    q = apply_system(coef, index, offsets, scratch_size, p)
    pq = batch_dot(p, q)
    step = torch.where(pq > 0, rz / pq, torch.zeros_like(pq)) * active
    x = x + step * p
    r = r - step * q
    z = inv_diag * r
    rz_new = batch_dot(r, z)
    beta = torch.where(rz > 0, rz_new / rz, torch.zeros_like(rz))
    p = torch.where(active > 0, z + beta * p, p)
    active = active * (batch_dot(r, r) > threshold).to(active.dtype)
    return x, r, p, rz_new, active


def solve_pcg(
    system: System,
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
    r = rhs - apply_system(coef, index, *shared, x)
    z = inv_diag * r
    p = z
    rz = batch_dot(r, z)
    threshold = (tol * tol) * batch_dot(rhs, rhs)
    active = (batch_dot(r, r) > threshold).to(x.dtype)

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


def solve(
    system: System,
    rhs: torch.Tensor,
    x0: torch.Tensor,
    *,
    width: int,
    tol: float,
    max_iter: int,
    check_every: int,
    cg: str,
    step_fn: Callable[..., tuple[torch.Tensor, ...]],
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """L_UU x = rhs for photos `width` pixels wide, from x0, both (B, 1, N): by the torch loop
    (cg "torch", iterating with `step_fn`) or the Triton kernels ("triton", or "triton-graphs"
    replayed as CUDA graphs). Returns x, a (B,) bool tensor of converged images, and the
    iterations run."""
    if cg == "torch":
        return solve_pcg(system, rhs, x0, tol, max_iter, check_every, step_fn)
    from stages.matting.cg_triton import solve_pcg_triton

    r0 = rhs - apply_system(system.coef, system.index, system.offsets, system.scratch_size, x0)
    reach = (math.isqrt(system.offsets.numel()) - 1) // 2
    row_stride = width + 2 * reach
    return solve_pcg_triton(
        system.coef, system.inv_diag, system.index, system.counts, system.scratch_size, row_stride,
        rhs, x0, r0, tol, max_iter, check_every, graphs=cg == "triton-graphs",
    )  # fmt: skip
