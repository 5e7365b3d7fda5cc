"""Matte stage: closed-form matting (Levin et al. 2008) -> the subject's alpha and colours.

Backends are picked by name from BACKENDS. The pymatting backend solves one photo at a time on
a CPU core (`matte_batch`, one photo per Ray task); the torch backend (stages/matting/) solves
the same system for many photos at once, which is what `Matter`, the GPU actor of the stage,
does. The actor that also filters and composites on its device is in stages/matte_composite.py.
The backend comes here resolved: "auto" is the plan's to decide (pipeline/data/plan.py), by the
GPUs it lays the stages on.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from stages.matting import DEFAULT_TOL
from stages.records import (
    ALPHA,
    FOREGROUND,
    IMAGE,
    PLACEHOLDER_MAP,
    PLACEHOLDER_RGB,
    TRIMAP,
    Reject,
    apply_per_row,
    healthy_rows,
    timed,
)

log = logging.getLogger(__name__)

STAGE = "matte"

MatteFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def matte_pymatting(image: np.ndarray, trimap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (H, W, 3) photo + float32 (H, W) trimap -> (alpha float32 (H, W) in [0, 1],
    foreground uint8 (H, W, 3)), with pymatting's estimate_alpha_cf and estimate_foreground_ml."""
    from pymatting import estimate_alpha_cf, estimate_foreground_ml

    rgb = image.astype(np.float64) / 255.0
    try:
        alpha = estimate_alpha_cf(rgb, trimap.astype(np.float64))
    except ValueError as exc:  # pymatting's own trimap checks (e.g. no known pixels)
        raise Reject(STAGE, f"closed-form matting refused the trimap: {exc}") from None
    alpha = np.clip(alpha, 0.0, 1.0)
    if not np.isfinite(alpha).all():
        raise Reject(STAGE, "closed-form matting diverged (non-finite alpha)")
    foreground = estimate_foreground_ml(rgb, alpha)
    foreground = np.clip(np.rint(foreground * 255.0), 0, 255).astype(np.uint8)
    return alpha.astype(np.float32), foreground


def matte_torch(image: np.ndarray, trimap: np.ndarray, tol: float = DEFAULT_TOL) -> tuple[np.ndarray, np.ndarray]:
    """Same contract as matte_pymatting, solved by stages/matting/ on the GPU when
    there is one (CPU otherwise); alpha within ~1e-3 of pymatting's (see its tests). tol is the
    solver's relative CG residual."""
    from stages.matting import estimate_alpha_cf_torch, estimate_foreground_torch

    rgb = image.astype(np.float32) / 255.0
    try:
        alpha = estimate_alpha_cf_torch(rgb, trimap.astype(np.float32), tol=tol)
    except ValueError as exc:  # no foreground or no background in the trimap
        raise Reject(STAGE, f"closed-form matting refused the trimap: {exc}") from None
    if not np.isfinite(alpha).all():
        raise Reject(STAGE, "closed-form matting diverged (non-finite alpha)")
    foreground = estimate_foreground_torch(rgb, alpha)
    foreground = np.clip(np.rint(foreground * 255.0), 0, 255).astype(np.uint8)
    return alpha.astype(np.float32), foreground


BACKENDS: dict[str, MatteFn] = {"pymatting": matte_pymatting, "torch": matte_torch}


def matte_batch(batch: dict[str, np.ndarray], *, backend: str, tol: float = DEFAULT_TOL) -> dict[str, np.ndarray]:
    """Ray Data adapter: IMAGE + TRIMAP -> ALPHA and FOREGROUND for each healthy row, one photo
    at a time, by the BACKENDS entry `backend` (resolved: not "auto"). tol is the torch solver's
    (pymatting has its own)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown matting backend {backend!r}; available: {', '.join(sorted(BACKENDS))}")
    matte = functools.partial(matte_torch, tol=tol) if backend == "torch" else BACKENDS[backend]

    def one(i: int) -> dict[str, object]:
        alpha, foreground = matte(batch[IMAGE][i], batch[TRIMAP][i])
        return {ALPHA: alpha, FOREGROUND: foreground}

    with timed(batch, STAGE):
        return apply_per_row(batch, one, {ALPHA: PLACEHOLDER_MAP, FOREGROUND: PLACEHOLDER_RGB})


def trimap_refusal(trimap: np.ndarray) -> str | None:
    """Why the closed-form solvers refuse `trimap`, or None. Checked per photo before a batched
    solve, which would otherwise refuse the whole batch for one photo."""
    from stages.matting import BG_THRESHOLD, FG_THRESHOLD

    if not (trimap >= FG_THRESHOLD).any():
        return f"closed-form matting refused the trimap: no foreground (>= {FG_THRESHOLD})"
    if not (trimap <= BG_THRESHOLD).any():
        return f"closed-form matting refused the trimap: no background (<= {BG_THRESHOLD})"
    return None


def to_uint8_torch(unit: torch.Tensor) -> torch.Tensor:
    """write.to_uint8 on the device: the same rounding, so the same bytes."""
    return (unit * 255.0).round().clamp(0, 255).to(torch.uint8)


DIVERGED = "closed-form matting diverged (non-finite alpha)"


@dataclass
class Solved:
    """A solve's results on the device, per photo of the solve: stacked (B, ...) tensors when the
    photos share a size, else lists."""

    alpha: torch.Tensor | list[torch.Tensor]  # float (H, W) in [0, 1], zeros where not finite
    foreground: torch.Tensor | list[torch.Tensor]  # uint8 (H, W, 3)
    trimap: torch.Tensor | list[torch.Tensor]  # float (H, W)
    finite: np.ndarray  # bool per photo: False where the alpha diverged


class Matter:
    """Ray Data actor of the torch backend: photos solved `batch_size` at a time.

    Photos are sorted by size and cut into batches, so that a batch holds one size (after
    decode's resize most photos share one) or a few close sizes. The batch is solved on the
    actor's GPU (CPU without one) without leaving the device: alpha with `estimate_alpha_cf_torch`
    (mixed sizes are zero-padded into one system; padding is known background, so CG does no
    work on it, and only the coarse-to-fine start changes, within tol), then the foreground with
    `estimate_foreground_torch` (one solve per size: its pyramid depends on the size). Same
    columns and rejects as `matte_batch`.
    """

    def __init__(
        self,
        batch_size: int = 64,
        tol: float = DEFAULT_TOL,
        warm_up: bool = True,
        photo_size: int = 512,
    ):
        self.batch_size = batch_size
        self.tol = tol
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._staging = Staging(self.device)
        if warm_up:
            self._warm_up(photo_size)

    def _warm_up(self, size: int) -> None:
        """One solve of two photos at the decoded size on CUDA, so that the matting's Triton
        kernels are built while the actor starts, not on its first batch: compiled the first
        time on a machine, loaded from Triton's disk cache after that."""
        from stages.matting import estimate_alpha_cf_torch, estimate_foreground_torch

        if self.device.type != "cuda":
            return  # the Triton kernels are CUDA-only
        generator = torch.Generator().manual_seed(0)
        images = torch.rand((2, size, size, 3), generator=generator).to(self.device)
        trimaps = torch.full((2, size, size), 0.5, device=self.device)
        edge, middle = size // 8, slice(3 * size // 8, 5 * size // 8)
        trimaps[:, :edge], trimaps[:, middle, middle] = 0.0, 1.0
        # A loose tol: the kernels are what is wanted, and it takes the same ones.
        started = time.perf_counter()
        alpha = estimate_alpha_cf_torch(images, trimaps, tol=0.5)
        torch.cuda.synchronize()
        solved = time.perf_counter()
        estimate_foreground_torch(images, alpha)
        torch.cuda.synchronize()
        # The actor's start decides the rate of small builds: say where it goes.
        log.warning(
            "matte actor warm-up at %d px: alpha %.1f s, foreground %.1f s",
            size,
            solved - started,
            time.perf_counter() - solved,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            return self._matte(batch)

    def _matte(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """ALPHA and FOREGROUND per row, as matte_batch gives them."""
        with timed(batch, STAGE):
            results: dict[int, tuple[np.ndarray, np.ndarray] | str] = {}

            def solve(chunk: list[int]) -> None:
                solved = self._solve([batch[IMAGE][i] for i in chunk], [batch[TRIMAP][i] for i in chunk])
                results.update(zip(chunk, solved, strict=True))

            self._each_fitting(self._chunks(batch), solve)

            def one(i: int) -> dict[str, object]:
                refusal = trimap_refusal(batch[TRIMAP][i])
                if refusal is not None:
                    raise Reject(STAGE, refusal)
                result = results[i]
                if isinstance(result, str):
                    raise Reject(STAGE, result)
                return {ALPHA: result[0], FOREGROUND: result[1]}

            return apply_per_row(batch, one, {ALPHA: PLACEHOLDER_MAP, FOREGROUND: PLACEHOLDER_RGB})

    def _chunks(self, batch: dict[str, np.ndarray]) -> list[list[int]]:
        """The rows to solve, sorted by size and cut into solves of at most batch_size photos."""
        rows = [int(i) for i in healthy_rows(batch) if trimap_refusal(batch[TRIMAP][i]) is None]
        rows.sort(key=lambda i: batch[IMAGE][i].shape)
        # As few solves as batch_size allows, of even sizes: a bundle of 148 photos at batch
        # 128 is solved as 74 + 74, not 128 + 20, since a small batch solves at a fraction of
        # a full one's rate per photo (Ray Data bundles whole blocks, so a bundle is not one
        # batch when blocks were split by size on the way).
        step = math.ceil(len(rows) / max(1, math.ceil(len(rows) / self.batch_size))) if rows else 1
        return [rows[start : start + step] for start in range(0, len(rows), step)]

    def _each_fitting(self, chunks: list[list[int]], work: Callable[[list[int]], None]) -> None:
        """work(chunk) for each chunk, halving a chunk whose work runs out of device memory
        (and batch_size with it, for this actor's later batches) and retrying the halves.
        Several actors share a GPU (data.matte.num_actors), and a batch size that fits an 80 GB
        H100 three times over need not fit a smaller card. `work` must leave nothing behind
        when it fails. A single photo that does not fit is an error."""
        pending = collections.deque(chunks)
        while pending:
            chunk = pending.popleft()
            try:
                work(chunk)
            except torch.cuda.OutOfMemoryError:
                if len(chunk) == 1:
                    raise
                half = (len(chunk) + 1) // 2
                log.warning(
                    "matte actor: a solve of %d photos ran out of device memory; batch_size %d -> %d",
                    len(chunk), self.batch_size, min(self.batch_size, half),
                )  # fmt: skip
                self.batch_size = min(self.batch_size, half)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                pending.extendleft([chunk[half:], chunk[:half]])

    def _solve(self, images: list[np.ndarray], trimaps: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray] | str]:
        """uint8 (H, W, 3) photos and float32 (H, W) trimaps -> per photo (alpha float32 (H, W),
        foreground uint8 (H, W, 3)), or the reason it is rejected."""
        return _download(self._solve_on_device(images, trimaps), self._staging)

    def _solve_on_device(self, images: list[np.ndarray], trimaps: list[np.ndarray]) -> Solved:
        """_solve's photos matted, left on the device."""
        from stages.matting import estimate_alpha_cf_torch, estimate_foreground_torch

        if len({image.shape for image in images}) == 1:  # one upload, one stacked solve
            rgb = self._staging.upload(images, torch.uint8, self.device).float() / 255.0  # (B, H, W, 3)
            tri = self._staging.upload(trimaps, torch.float32, self.device)
        else:  # lists: alpha pads them into one batch, foreground solves each size apart
            rgb = [torch.from_numpy(image).to(self.device).float() / 255.0 for image in images]
            tri = [torch.from_numpy(trimap.astype(np.float32)).to(self.device) for trimap in trimaps]
        alpha = estimate_alpha_cf_torch(rgb, tri, tol=self.tol)  # (B, H, W), or a list for mixed sizes
        if isinstance(alpha, torch.Tensor):
            finite = torch.isfinite(alpha).flatten(1).all(1)
            # A diverged photo must not spread NaNs through the shared foreground solve.
            alpha = torch.where(finite.view(-1, 1, 1), alpha, torch.zeros_like(alpha))
        else:
            finite = torch.stack([torch.isfinite(a).all() for a in alpha])
            alpha = [torch.where(ok, a, torch.zeros_like(a)) for a, ok in zip(alpha, finite, strict=True)]
        foreground = estimate_foreground_torch(rgb, alpha)
        foreground = (
            to_uint8_torch(foreground)
            if isinstance(foreground, torch.Tensor)
            else [to_uint8_torch(f) for f in foreground]
        )
        return Solved(alpha, foreground, tri, finite.cpu().numpy())


class Staging:
    """Page-locked host buffers, one per dtype, kept and grown across calls, that every copy
    between host and device goes through. From pageable memory those copies ran at ~1 GB/s on
    the H100 node (1.6 ms a photo for alpha and foreground), and pinning fresh buffers for every
    batch cost more still (cudaHostAlloc, ~15 ms per buffer; bench_matte_actor.py). Downloads
    are copied out of the buffer into ordinary arrays, which the rows keep."""

    def __init__(self, device: torch.device):
        self.pinned = device.type == "cuda"
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        held = self.buffers.get(dtype)
        if held is None or held.numel() < numel:
            held = self.buffers[dtype] = torch.empty(numel, dtype=dtype, pin_memory=self.pinned)
        return held[:numel]

    def upload(self, arrays: list[np.ndarray], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Same-shape host arrays -> one stacked tensor on `device`, in one copy."""
        shape = (len(arrays), *arrays[0].shape)
        host = self.buffer(math.prod(shape), dtype).view(shape)
        np.stack(arrays, out=host.numpy(), casting="same_kind")
        return host.to(device)  # synchronous: the buffer is free again once it returns

    def fetch(self, tensors: list[torch.Tensor]) -> list[np.ndarray]:
        """Host copies of device tensors of one dtype, in one device-to-host copy."""
        if not tensors:
            return []
        flat = torch.cat([t.reshape(-1) for t in tensors])
        host = self.buffer(flat.numel(), flat.dtype).copy_(flat).numpy().copy()
        parts = np.split(host, np.cumsum([t.numel() for t in tensors])[:-1])
        return [part.reshape(t.shape) for part, t in zip(parts, tensors, strict=True)]


def _download(solved: Solved, staging: Staging) -> list[tuple[np.ndarray, np.ndarray] | str]:
    """Per photo (alpha float32 (H, W), foreground uint8 (H, W, 3)) on the host, or why it is
    rejected; one download per stacked batch."""
    if isinstance(solved.alpha, torch.Tensor):
        alpha, foreground = staging.fetch([solved.alpha])[0], staging.fetch([solved.foreground])[0]
    else:
        alpha, foreground = [a.cpu().numpy() for a in solved.alpha], [f.cpu().numpy() for f in solved.foreground]
    return [(alpha[j], foreground[j]) if ok else DIVERGED for j, ok in enumerate(solved.finite)]
