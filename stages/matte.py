"""Matte stage: closed-form matting (Levin et al. 2008) -> the subject's alpha and colours.

Backends are picked by name from BACKENDS; `auto` resolves to the best one for the device the
stage runs on. The pymatting backend solves one photo at a time on a CPU core (`matte_batch`, one
photo per Ray task); the torch backend (stages/matting_torch.py) solves the same system for many
photos at once, which is what `Matter`, the GPU actor of the stage, does.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from stages.matting_torch import DEFAULT_TOL
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
    """Same contract as matte_pymatting, solved by stages/matting_torch.py on the GPU when
    there is one (CPU otherwise); alpha within ~1e-3 of pymatting's (see its tests). tol is the
    solver's relative CG residual."""
    from stages.matting_torch import estimate_alpha_cf_torch, estimate_foreground_torch

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


def resolve_backend(name: str) -> str:
    """`auto` -> the torch solver when it is installed and a GPU is present, else pymatting."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown matting backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
        return name
    return "torch" if "torch" in BACKENDS and torch.cuda.is_available() else "pymatting"


def matte_batch(
    batch: dict[str, np.ndarray], *, backend: str = "auto", tol: float = DEFAULT_TOL
) -> dict[str, np.ndarray]:
    """Ray Data adapter: IMAGE + TRIMAP -> ALPHA and FOREGROUND for each healthy row, one photo
    at a time. tol is the torch solver's (pymatting has its own)."""
    backend = resolve_backend(backend)
    matte = functools.partial(matte_torch, tol=tol) if backend == "torch" else BACKENDS[backend]

    def one(i: int) -> dict[str, object]:
        alpha, foreground = matte(batch[IMAGE][i], batch[TRIMAP][i])
        return {ALPHA: alpha, FOREGROUND: foreground}

    with timed(batch, STAGE):
        return apply_per_row(batch, one, {ALPHA: PLACEHOLDER_MAP, FOREGROUND: PLACEHOLDER_RGB})


def _trimap_refusal(trimap: np.ndarray) -> str | None:
    """Why the closed-form solvers refuse `trimap`, or None. Checked per photo before a batched
    solve, which would otherwise refuse the whole batch for one photo."""
    from stages.matting_torch import BG_THRESHOLD, FG_THRESHOLD

    if not (trimap >= FG_THRESHOLD).any():
        return f"closed-form matting refused the trimap: no foreground (>= {FG_THRESHOLD})"
    if not (trimap <= BG_THRESHOLD).any():
        return f"closed-form matting refused the trimap: no background (<= {BG_THRESHOLD})"
    return None


def _to_uint8(unit: torch.Tensor) -> torch.Tensor:
    return (unit * 255.0).round().clamp(0, 255).to(torch.uint8)


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
        self, batch_size: int = 64, tol: float = DEFAULT_TOL, warm_up: bool = True, photo_size: int = 512
    ):
        self.batch_size = batch_size
        self.tol = tol
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if warm_up:
            self._warm_up(photo_size)

    def _warm_up(self, size: int) -> None:
        """One solve of two photos at the decoded size on CUDA, so that torch.compile's minute is
        spent while the actor starts, not on its first batch. The kernels take dynamic shapes,
        but a warm-up at 64 px compiled again on the first 512 px batch (its pyramid levels and
        the foreground's 10 levels hit new specialisations): 84 s for that batch on an H100."""
        from stages.matting_torch import estimate_alpha_cf_torch, estimate_foreground_torch

        if self.device.type != "cuda":
            return  # compiling is CUDA-only by default
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
        with timed(batch, STAGE):
            rows = [int(i) for i in healthy_rows(batch) if _trimap_refusal(batch[TRIMAP][i]) is None]
            rows.sort(key=lambda i: batch[IMAGE][i].shape)
            results: dict[int, tuple[np.ndarray, np.ndarray] | str] = {}
            # As few solves as batch_size allows, of even sizes: a bundle of 148 photos at batch
            # 128 is solved as 74 + 74, not 128 + 20, since a small batch solves at a fraction of
            # a full one's rate per photo (Ray Data bundles whole blocks, so a bundle is not one
            # batch when blocks were split by size on the way).
            step = math.ceil(len(rows) / max(1, math.ceil(len(rows) / self.batch_size))) if rows else 1
            for start in range(0, len(rows), step):
                chunk = rows[start : start + step]
                solved = self._solve([batch[IMAGE][i] for i in chunk], [batch[TRIMAP][i] for i in chunk])
                results.update(zip(chunk, solved, strict=True))

            def one(i: int) -> dict[str, object]:
                refusal = _trimap_refusal(batch[TRIMAP][i])
                if refusal is not None:
                    raise Reject(STAGE, refusal)
                result = results[i]
                if isinstance(result, str):
                    raise Reject(STAGE, result)
                return {ALPHA: result[0], FOREGROUND: result[1]}

            return apply_per_row(batch, one, {ALPHA: PLACEHOLDER_MAP, FOREGROUND: PLACEHOLDER_RGB})

    def _solve(self, images: list[np.ndarray], trimaps: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray] | str]:
        """uint8 (H, W, 3) photos and float32 (H, W) trimaps -> per photo (alpha float32 (H, W),
        foreground uint8 (H, W, 3)), or the reason it is rejected."""
        from stages.matting_torch import estimate_alpha_cf_torch, estimate_foreground_torch

        with torch.inference_mode():
            if len({image.shape for image in images}) == 1:  # one upload, one stacked solve
                rgb = torch.from_numpy(np.stack(images)).to(self.device).float() / 255.0  # (B, H, W, 3)
                tri = torch.from_numpy(np.stack(trimaps).astype(np.float32)).to(self.device)
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
            if isinstance(alpha, torch.Tensor):  # one download for the batch
                alpha, foreground = alpha.cpu().numpy(), _to_uint8(foreground).cpu().numpy()
            else:
                alpha, foreground = [a.cpu().numpy() for a in alpha], [_to_uint8(f).cpu().numpy() for f in foreground]
            finite = finite.cpu().numpy()
        return [
            (alpha[j], foreground[j]) if finite[j] else "closed-form matting diverged (non-finite alpha)"
            for j in range(len(images))
        ]
