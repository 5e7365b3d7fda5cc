"""The closed-form matting CG loop as Triton kernels, for cg.py on CUDA.

Same system, same Jacobi-preconditioned CG and same per-image stopping test as the torch loop
(`cg.solve_pcg`). Four things make it faster than the compiled torch step:

- The search direction p lives only in the zero-bordered dense scratch image that the matrix
  product gathers from, so no scatter (and no zeroing of the scratch) is needed per iteration.
  Known pixels and the border are never written and stay 0.
- Per-image dot products are two-stage: each block writes its partial sum, and a one-program-
  per-image kernel adds the partials in a fixed order. No atomics, so a solve is deterministic.
- A converged image's blocks are masked off, so a converged photo stops costing memory traffic
  without shrinking the batch (no host sync to shrink, no recompiles). `check_every` iterations
  are captured once as a CUDA graph and replayed (`graphs=True`), which takes the ~15 kernel
  launches per iteration off the host.

- The off-diagonal coefficients are read as float16, and the diagonal as float32 from a plane
  of its own: the coefficients are 100 of the ~165 bytes an iteration moves per unknown pixel
  in float32. The values are exactly those of the torch loop, which `laplacian.compact_system` rounds
  to float16 values for float32 solves (see `_round_coefficients` there for why that is safe).

A product that read half the coefficients (L is symmetric) and found the rest in the
neighbours' rows was measured on an H100 (BENCHMARKS.md, "Solver choices"): 3% less time per
iteration, slower solves overall (its slot map costs more than it saves), so it was removed.

One iteration is five kernels: q = L p with the partial p.q; alpha = rz / p.q; x += alpha p,
r -= alpha q with the partials r.z and r.r; beta and the stopping test; p = z + beta p.

Triton is imported lazily by the caller. On CPU the kernels run under Triton's interpreter
(TRITON_INTERPRET=1 before this module is imported), which is how the tests check them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024  # rows per program of the vector kernels
# Triton compiles a kernel again for each divisibility class of its integer arguments (by 16,
# and 1), and the row count changes with every batch; a build on warm caches still added 16
# Triton cache files (BENCHMARKS.md, "Solver choices"). So rows come padded to a multiple of 16
# (`laplacian.compact_system`), the block count is not specialised, and the per-image reductions have
# one width up to 1024 blocks (1M rows per image).
_MIN_PARTS = 1024
# How the matrix product reads the off-diagonal coefficients. float32 reads the same values
# with twice the bytes; benchmarks/bench_matting.py sets it to time that.
COEFFICIENT_DTYPE = torch.float16


@triton.jit
def _program_rows(active_ptr, count_ptr, n_rows, BLOCK: tl.constexpr):
    """The rows of program (image, block) of a vector kernel: (image, slots, mask, flat rows).
    The mask keeps the image's real rows (its empty slots are never touched), and none once the
    image has stopped."""
    image = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < tl.where(tl.load(active_ptr + image) != 0, tl.load(count_ptr + image), 0)
    return image, cols, mask, image * n_rows + cols


@triton.jit(do_not_specialize=["n_blocks"])
def _matvec_kernel(
    coef_ptr,  # (B, Q, N) float16 (or float32) off-diagonal coefficients; the centre plane is unused
    diag_ptr,  # (B, N) float32 L_ii
    index_ptr,  # (B, N) int32 flat position in the scratch
    p_ptr,  # (B * Hp * Wp,) float32 scratch: p at unknown pixels, 0 elsewhere
    q_ptr,  # (B, N) out: L p
    part_ptr,  # (B, n_blocks) out: partial p.q
    active_ptr,  # (B,) int32
    count_ptr,  # (B,) int32 real rows per image
    n_rows,
    n_blocks,
    row_stride,  # Wp, the scratch's row length
    REACH: tl.constexpr,  # 2 r
    SIDE: tl.constexpr,  # 2 REACH + 1 (static_range needs a constexpr, not an expression of one)
    BLOCK: tl.constexpr,
):
    image, cols, mask, rows = _program_rows(active_ptr, count_ptr, n_rows, BLOCK)
    centre = tl.load(index_ptr + rows, mask=mask, other=0)
    coef_rows = coef_ptr + image * (SIDE * SIDE) * n_rows + cols
    p = tl.load(p_ptr + centre, mask=mask, other=0.0)
    acc = tl.load(diag_ptr + rows, mask=mask, other=0.0) * p
    for dy in tl.static_range(SIDE):
        for dx in tl.static_range(SIDE):
            if dy != REACH or dx != REACH:
                offset = (dy - REACH) * row_stride + (dx - REACH)
                c = tl.load(coef_rows + (dy * SIDE + dx) * n_rows, mask=mask, other=0.0).to(tl.float32)
                acc += c * tl.load(p_ptr + centre + offset, mask=mask, other=0.0)
    tl.store(q_ptr + rows, acc, mask=mask)
    tl.store(part_ptr + image * n_blocks + tl.program_id(1), tl.sum(p * acc, axis=0))


@triton.jit(do_not_specialize=["n_blocks"])
def _step_size_kernel(
    pq_part_ptr,  # (B, n_blocks)
    rz_ptr,  # (B,)
    alpha_ptr,  # (B,) out
    active_ptr,  # (B,) int32
    n_blocks,
    PARTS: tl.constexpr,  # power of two >= n_blocks
):
    image = tl.program_id(0)
    parts = tl.arange(0, PARTS)
    pq = tl.sum(tl.load(pq_part_ptr + image * n_blocks + parts, mask=parts < n_blocks, other=0.0), axis=0)
    rz = tl.load(rz_ptr + image)
    ok = (tl.load(active_ptr + image) != 0) & (pq > 0.0)
    tl.store(alpha_ptr + image, tl.where(ok, rz / tl.where(ok, pq, 1.0), 0.0))


@triton.jit(do_not_specialize=["n_blocks"])
def _update_kernel(
    index_ptr,
    p_ptr,
    q_ptr,
    x_ptr,  # (B, N) in/out
    r_ptr,  # (B, N) in/out
    inv_diag_ptr,  # (B, N)
    alpha_ptr,  # (B,)
    rz_part_ptr,  # (B, n_blocks) out: partial r.z
    rr_part_ptr,  # (B, n_blocks) out: partial r.r
    active_ptr,
    count_ptr,
    n_rows,
    n_blocks,
    BLOCK: tl.constexpr,
):
    image, cols, mask, rows = _program_rows(active_ptr, count_ptr, n_rows, BLOCK)
    alpha = tl.load(alpha_ptr + image)
    p = tl.load(p_ptr + tl.load(index_ptr + rows, mask=mask, other=0), mask=mask, other=0.0)
    x = tl.load(x_ptr + rows, mask=mask, other=0.0) + alpha * p
    r = tl.load(r_ptr + rows, mask=mask, other=0.0) - alpha * tl.load(q_ptr + rows, mask=mask, other=0.0)
    tl.store(x_ptr + rows, x, mask=mask)
    tl.store(r_ptr + rows, r, mask=mask)
    z = tl.load(inv_diag_ptr + rows, mask=mask, other=0.0) * r
    tl.store(rz_part_ptr + image * n_blocks + tl.program_id(1), tl.sum(r * z, axis=0))
    tl.store(rr_part_ptr + image * n_blocks + tl.program_id(1), tl.sum(r * r, axis=0))


@triton.jit(do_not_specialize=["n_blocks"])
def _direction_size_kernel(
    rz_part_ptr,
    rr_part_ptr,
    rz_ptr,  # (B,) in/out: r.z of the last iteration, replaced by this one's
    beta_ptr,  # (B,) out
    threshold_ptr,  # (B,) squared absolute tolerance
    active_ptr,  # (B,) in/out
    n_blocks,
    PARTS: tl.constexpr,
):
    image = tl.program_id(0)
    live = tl.load(active_ptr + image) != 0
    parts = tl.arange(0, PARTS)
    mask = parts < n_blocks
    rz_new = tl.sum(tl.load(rz_part_ptr + image * n_blocks + parts, mask=mask, other=0.0), axis=0)
    rr = tl.sum(tl.load(rr_part_ptr + image * n_blocks + parts, mask=mask, other=0.0), axis=0)
    rz = tl.load(rz_ptr + image)
    ok = rz > 0.0
    tl.store(beta_ptr + image, tl.where(ok, rz_new / tl.where(ok, rz, 1.0), 0.0))
    # A stopped image keeps its state: its vector kernels are masked off from here on.
    tl.store(rz_ptr + image, tl.where(live, rz_new, rz))
    still = live & (rr > tl.load(threshold_ptr + image))
    tl.store(active_ptr + image, still.to(tl.int32))


@triton.jit
def _direction_kernel(
    index_ptr,
    p_ptr,  # scratch, in/out
    r_ptr,
    inv_diag_ptr,
    beta_ptr,
    active_ptr,
    count_ptr,
    n_rows,
    BLOCK: tl.constexpr,
):
    image, cols, mask, rows = _program_rows(active_ptr, count_ptr, n_rows, BLOCK)
    centre = tl.load(index_ptr + rows, mask=mask, other=0)
    z = tl.load(inv_diag_ptr + rows, mask=mask, other=0.0) * tl.load(r_ptr + rows, mask=mask, other=0.0)
    p = tl.load(p_ptr + centre, mask=mask, other=0.0)
    tl.store(p_ptr + centre, z + tl.load(beta_ptr + image) * p, mask=mask)


class TritonPCG:
    """State and kernels of one batched solve, for fixed (B, N). `iterate(k)` runs k
    iterations; the caller checks `running()` between groups."""

    def __init__(
        self,
        coef: torch.Tensor,  # (B, Q, N) float32
        inv_diag: torch.Tensor,  # (B, 1, N)
        index: torch.Tensor,  # (B, N) int64
        counts: torch.Tensor,  # (B,) real rows per image; slots past them are empty
        scratch_size: int,
        row_stride: int,
        rhs: torch.Tensor,  # (B, 1, N)
        x0: torch.Tensor,  # (B, 1, N), 0 in empty slots
        r0: torch.Tensor,  # (B, 1, N) rhs - L x0
        tol: float,
        coefficient_dtype: torch.dtype | None = None,
    ) -> None:
        if scratch_size >= 2**31:
            raise ValueError(f"batch too large for 32-bit scratch indices ({scratch_size} pixels)")
        b, q, n = coef.shape
        self.shape = (b, n)
        self.reach = (int(round(q**0.5)) - 1) // 2
        self.row_stride = row_stride
        self.inv_diag = inv_diag.reshape(b, n).contiguous()
        self.index = index.to(torch.int32).contiguous()
        self.count = counts.to(torch.int32).contiguous()
        # Exact for a float32 solve: laplacian.compact_system rounded the off-diagonals to float16 values.
        self.coef = coef.to(coefficient_dtype or COEFFICIENT_DTYPE).contiguous()
        self.diag = coef[:, q // 2].contiguous()
        self.x = x0.reshape(b, n).clone()
        self.r = r0.reshape(b, n).clone()
        z = self.inv_diag * self.r
        self.p = torch.zeros(scratch_size, dtype=coef.dtype, device=coef.device)
        self.p[index.reshape(-1)] = z.reshape(-1)
        self.rz = (self.r * z).sum(1)
        self.threshold = (tol * tol) * (rhs.reshape(b, n) ** 2).sum(1)
        self.active = ((self.r**2).sum(1) > self.threshold).to(torch.int32)
        self.n_blocks = triton.cdiv(n, _BLOCK)
        self.parts = max(triton.next_power_of_2(self.n_blocks), _MIN_PARTS)
        self.q = torch.empty_like(self.x)
        self.alpha = torch.empty_like(self.rz)
        self.beta = torch.empty_like(self.rz)
        self.pq_part = torch.empty((b, self.n_blocks), dtype=coef.dtype, device=coef.device)
        self.rz_part = torch.empty_like(self.pq_part)
        self.rr_part = torch.empty_like(self.pq_part)
        self.launches = self._launches()

    def _launches(self) -> list[tuple[triton.JITFunction, tuple[int, ...], tuple, dict[str, int]]]:
        """One iteration: (kernel, grid, arguments, constexprs) per launch. The buffers are fixed
        for the solve, so the list is built once."""
        b, n = self.shape
        rows_grid = (b, self.n_blocks)
        side = 2 * self.reach + 1
        rows = {"BLOCK": _BLOCK}
        parts = {"PARTS": self.parts}
        return [
            (_matvec_kernel, rows_grid, (
                self.coef, self.diag, self.index, self.p, self.q, self.pq_part, self.active, self.count,
                n, self.n_blocks, self.row_stride,
            ), {"REACH": self.reach, "SIDE": side, **rows}),
            (_step_size_kernel, (b,), (self.pq_part, self.rz, self.alpha, self.active, self.n_blocks), parts),
            (_update_kernel, rows_grid, (
                self.index, self.p, self.q, self.x, self.r, self.inv_diag, self.alpha,
                self.rz_part, self.rr_part, self.active, self.count, n, self.n_blocks,
            ), rows),
            (_direction_size_kernel, (b,), (
                self.rz_part, self.rr_part, self.rz, self.beta, self.threshold, self.active, self.n_blocks,
            ), parts),
            (_direction_kernel, rows_grid, (
                self.index, self.p, self.r, self.inv_diag, self.beta, self.active, self.count, n,
            ), rows),
        ]  # fmt: skip

    def iterate(self, count: int) -> None:
        for _ in range(count):
            for kernel, grid, args, constexprs in self.launches:
                kernel[grid](*args, **constexprs)

    def running(self) -> int:
        return int(self.active.sum())


def solve_pcg_triton(
    coef: torch.Tensor,
    inv_diag: torch.Tensor,
    index: torch.Tensor,
    counts: torch.Tensor,
    scratch_size: int,
    row_stride: int,
    rhs: torch.Tensor,
    x0: torch.Tensor,
    r0: torch.Tensor,
    tol: float,
    max_iter: int,
    check_every: int,
    graphs: bool,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Returns x (B, 1, N), a (B,) bool tensor of converged images, and the iterations run.
    With graphs, the first group of `check_every` iterations runs eagerly (it also compiles the
    kernels), and later groups replay one CUDA graph captured from it."""
    solver = TritonPCG(coef, inv_diag, index, counts, scratch_size, row_stride, rhs, x0, r0, tol)
    graph = None
    iteration = 0
    while iteration < max_iter and solver.running():
        group = min(check_every, max_iter - iteration)
        if graphs and group == check_every and iteration > 0:
            if graph is None:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    solver.iterate(check_every)
                # Capturing records the kernels without running them.
            graph.replay()
        else:
            solver.iterate(group)
        iteration += group
    converged = solver.active == 0
    return solver.x.view(rhs.shape), converged, iteration
