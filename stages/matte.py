"""Matte stage: closed-form matting (Levin et al. 2008) -> the subject's alpha and colours.

Backends are picked by name from BACKENDS; `auto` resolves to the best one for the device the
stage runs on. The pymatting backend solves one photo at a time on a CPU core (`matte_batch`, one
photo per Ray task); the torch backend (stages/matting_torch.py) solves the same system for many
photos at once, which is what `Matter`, the GPU actor of the stage, does. Given `finish`, the
actor also runs the filter and composite stages on its device, on the mattes it holds there.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from stages.composite import (
    BBOX_THRESHOLD,
    CompositeDraw,
    PasteJob,
    bbox_of_profiles,
    composite_rows,
    composite_subjects_torch,
    covered_background,
    draw_composites,
)
from stages.composite import STAGE as COMPOSITE_STAGE
from stages.filter import STAGE as FILTER_STAGE
from stages.filter import check_matte_stats
from stages.matting_torch import DEFAULT_TOL
from stages.records import (
    ALPHA,
    ALPHA_AREA,
    FOREGROUND,
    IMAGE,
    PLACEHOLDER_MAP,
    PLACEHOLDER_RGB,
    SOURCE_SHA256,
    SOURCE_URI,
    TIMING_PREFIX,
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
    """write.to_uint8 on the device: the same rounding, so the same bytes."""
    return (unit * 255.0).round().clamp(0, 255).to(torch.uint8)


_DIVERGED = "closed-form matting diverged (non-finite alpha)"

# ALPHA and TRIMAP of a row without a matte, when a finishing Matter sends them as uint8: a
# column's arrays must share a dtype on their way into Arrow.
_PLACEHOLDER_UINT8 = np.zeros((1, 1), np.uint8)


@dataclass
class _Solved:
    """A solve's results on the device, per photo of the solve: stacked (B, ...) tensors when the
    photos share a size, else lists."""

    alpha: torch.Tensor | list[torch.Tensor]  # float (H, W) in [0, 1], zeros where not finite
    foreground: torch.Tensor | list[torch.Tensor]  # uint8 (H, W, 3)
    trimap: torch.Tensor | list[torch.Tensor]  # float (H, W)
    finite: np.ndarray  # bool per photo: False where the alpha diverged


@dataclass
class _Finished:
    """A photo that passed the filter, with what the composite rows carry, on the host."""

    alpha: np.ndarray  # uint8 (H, W)
    trimap: np.ndarray  # uint8 (H, W)
    area: float
    composites: list[tuple[CompositeDraw, np.ndarray]]


# Per photo of a finishing Matter: a matte reject's reason, a filter Reject, or the rows' makings.
_Outcome = str | Reject | _Finished


class _Passed(NamedTuple):
    """A photo that passed the filter: photo j of its solve, row `row` of the batch."""

    j: int
    row: int
    area: float
    bbox: tuple[int, int, int, int]


class Matter:
    """Ray Data actor of the torch backend: photos solved `batch_size` at a time.

    Photos are sorted by size and cut into batches, so that a batch holds one size (after
    decode's resize most photos share one) or a few close sizes. The batch is solved on the
    actor's GPU (CPU without one) without leaving the device: alpha with `estimate_alpha_cf_torch`
    (mixed sizes are zero-padded into one system; padding is known background, so CG does no
    work on it, and only the coarse-to-fine start changes, within tol), then the foreground with
    `estimate_foreground_torch` (one solve per size: its pyramid depends on the size). Same
    columns and rejects as `matte_batch`.

    With `finish` ({"filter_args": filter_batch's keyword arguments, "composite_args":
    composite_batch's}), the photos do not leave the device after matting either: the filter
    and the composites run there (composite_subjects_torch), and the actor returns the rows
    composite_batch would, with the filter's rejects and timings: K rows per accepted photo,
    ALPHA and TRIMAP as uint8 (what the writer makes of them), no FOREGROUND. Only the encoding
    is left for the CPU tasks. On the H100 node, compositing in the CPU task after matting took
    25-29 ms of CPU per photo (PIL's Lanczos resize and the blend; BENCHMARKS.md, "The CPU task
    after matting"), and the
    float32 alpha and the foreground crossed the object store only to be composited there.
    """

    def __init__(
        self,
        batch_size: int = 64,
        tol: float = DEFAULT_TOL,
        warm_up: bool = True,
        photo_size: int = 512,
        finish: dict[str, dict[str, Any]] | None = None,
    ):
        self.batch_size = batch_size
        self.tol = tol
        self.finish = finish
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._staging = _Staging(self.device)
        # A batch's composites draw from a few backgrounds at one photo size: each is resized and
        # uploaded once, not once per composite.
        self._background = functools.lru_cache(maxsize=64)(self._upload_background)
        if warm_up:
            self._warm_up(photo_size)

    def _warm_up(self, size: int) -> None:
        """One solve of two photos at the decoded size on CUDA, so that the matting's Triton
        kernels are built while the actor starts, not on its first batch: compiled the first
        time on a machine, loaded from Triton's disk cache after that."""
        from stages.matting_torch import estimate_alpha_cf_torch, estimate_foreground_torch

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
            return self._matte(batch) if self.finish is None else self._matte_and_finish(batch)

    def _matte(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """ALPHA and FOREGROUND per row, as matte_batch gives them."""
        with timed(batch, STAGE):
            results: dict[int, tuple[np.ndarray, np.ndarray] | str] = {}

            def solve(chunk: list[int]) -> None:
                solved = self._solve([batch[IMAGE][i] for i in chunk], [batch[TRIMAP][i] for i in chunk])
                results.update(zip(chunk, solved, strict=True))

            self._each_fitting(self._chunks(batch), solve)

            def one(i: int) -> dict[str, object]:
                refusal = _trimap_refusal(batch[TRIMAP][i])
                if refusal is not None:
                    raise Reject(STAGE, refusal)
                result = results[i]
                if isinstance(result, str):
                    raise Reject(STAGE, result)
                return {ALPHA: result[0], FOREGROUND: result[1]}

            return apply_per_row(batch, one, {ALPHA: PLACEHOLDER_MAP, FOREGROUND: PLACEHOLDER_RGB})

    def _matte_and_finish(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """matte -> filter -> composite, each stage's rejects and time in its own columns."""
        clock = _StageClock(self.device)
        outcomes: dict[int, _Outcome] = {}

        def solve_and_finish(chunk: list[int]) -> None:
            with clock(STAGE):
                solved = self._solve_on_device([batch[IMAGE][i] for i in chunk], [batch[TRIMAP][i] for i in chunk])
            outcomes.update(self._finish_solve(batch, chunk, solved, clock))

        self._each_fitting(self._chunks(batch), solve_and_finish)

        def matte_row(i: int) -> dict[str, object]:
            outcome = outcomes[i] if i in outcomes else _trimap_refusal(batch[TRIMAP][i])  # unsolved: refused
            if isinstance(outcome, str):
                raise Reject(STAGE, outcome)
            if isinstance(outcome, _Finished):
                return {ALPHA: outcome.alpha, TRIMAP: outcome.trimap}
            return {ALPHA: _PLACEHOLDER_UINT8, TRIMAP: _PLACEHOLDER_UINT8}

        def filter_row(i: int) -> dict[str, object]:
            outcome = outcomes[i]
            if isinstance(outcome, Reject):
                raise outcome
            return {ALPHA_AREA: outcome.area}

        placeholders = {ALPHA: _PLACEHOLDER_UINT8, TRIMAP: _PLACEHOLDER_UINT8}
        batch = apply_per_row(batch, matte_row, placeholders)
        batch = apply_per_row(batch, filter_row, {ALPHA_AREA: 0.0})
        n = len(batch[SOURCE_URI])
        for stage in (STAGE, FILTER_STAGE):
            batch[TIMING_PREFIX + stage] = np.full(n, clock.seconds[stage] / max(n, 1), np.float64)
        made = {i: outcome.composites for i, outcome in outcomes.items() if isinstance(outcome, _Finished)}
        # composite_rows times from a start: put it back by the composites' time on the device.
        return composite_rows(batch, made, time.perf_counter() - clock.seconds[COMPOSITE_STAGE])

    def _chunks(self, batch: dict[str, np.ndarray]) -> list[list[int]]:
        """The rows to solve, sorted by size and cut into solves of at most batch_size photos."""
        rows = [int(i) for i in healthy_rows(batch) if _trimap_refusal(batch[TRIMAP][i]) is None]
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

    def _solve_on_device(self, images: list[np.ndarray], trimaps: list[np.ndarray]) -> _Solved:
        """_solve's photos matted, left on the device."""
        from stages.matting_torch import estimate_alpha_cf_torch, estimate_foreground_torch

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
            _to_uint8(foreground) if isinstance(foreground, torch.Tensor) else [_to_uint8(f) for f in foreground]
        )
        return _Solved(alpha, foreground, tri, finite.cpu().numpy())

    def _finish_solve(
        self, batch: dict[str, np.ndarray], chunk: list[int], solved: _Solved, clock: _StageClock
    ) -> dict[int, _Outcome]:
        """The filter and the composites of a solve's photos (row chunk[j] is photo j), on the
        device."""
        assert self.finish is not None
        outcomes: dict[int, _Outcome] = {}
        passed: list[_Passed] = []
        with clock(FILTER_STAGE):
            peaks, areas, profiles = _matte_stats(solved.alpha, self._staging)
            for j, i in enumerate(chunk):
                if not solved.finite[j]:
                    outcomes[i] = _DIVERGED
                    continue
                try:
                    area = check_matte_stats(float(peaks[j]), float(areas[j]), **self.finish["filter_args"])
                except Reject as reject:
                    outcomes[i] = reject
                    continue
                passed.append(_Passed(j, i, area, bbox_of_profiles(*profiles[j])))
        with clock(COMPOSITE_STAGE):
            outcomes.update(self._composite(batch, passed, solved))
        return outcomes

    def _composite(self, batch: dict[str, np.ndarray], passed: list[_Passed], solved: _Solved) -> dict[int, _Finished]:
        """The composites of the photos that passed the filter, made on the device and brought
        back with their uint8 alphas and trimaps in one download."""
        assert self.finish is not None
        draws, jobs = [], []
        for photo in passed:
            height, width = solved.alpha[photo.j].shape
            sha256 = str(batch[SOURCE_SHA256][photo.row])
            draws.append(draw_composites(sha256, height, width, photo.bbox, **self.finish["composite_args"]))
            for d in draws[-1]:
                background = self._background(d.background_path, height, width)
                jobs.append(PasteJob(photo.j, photo.bbox, d.placement, background))
        composites = composite_subjects_torch(solved.foreground, solved.alpha, jobs)
        maps = [_to_uint8(m[photo.j]) for photo in passed for m in (solved.alpha, solved.trimap)]
        fetched = self._staging.fetch(maps + composites)
        back = iter(fetched[len(maps) :])
        return {
            photo.row: _Finished(fetched[2 * n], fetched[2 * n + 1], photo.area, [(d, next(back)) for d in photo_draws])
            for n, (photo, photo_draws) in enumerate(zip(passed, draws, strict=True))
        }

    def _upload_background(self, path: str, height: int, width: int) -> torch.Tensor:
        return torch.tensor(covered_background(path, height, width), device=self.device)


class _StageClock:
    """Seconds spent per stage over a call. A stage ends on a device synchronise, so that the
    work it queued is counted in it, not in the next."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = collections.defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[stage] += time.perf_counter() - start


class _Staging:
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


def _download(solved: _Solved, staging: _Staging) -> list[tuple[np.ndarray, np.ndarray] | str]:
    """Per photo (alpha float32 (H, W), foreground uint8 (H, W, 3)) on the host, or why it is
    rejected; one download per stacked batch."""
    if isinstance(solved.alpha, torch.Tensor):
        alpha, foreground = staging.fetch([solved.alpha])[0], staging.fetch([solved.foreground])[0]
    else:
        alpha, foreground = [a.cpu().numpy() for a in solved.alpha], [f.cpu().numpy() for f in solved.foreground]
    return [(alpha[j], foreground[j]) if ok else _DIVERGED for j, ok in enumerate(solved.finite)]


def _matte_stats(
    alpha: torch.Tensor | list[torch.Tensor], staging: _Staging
) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """What the filter and the subject box need of each photo's alpha, on the host: peak (max),
    area (mean), and which rows and which columns hold subject pixels (bbox_of_profiles)."""
    groups = [alpha] if isinstance(alpha, torch.Tensor) else [a[None] for a in alpha]
    numbers, profiles = [], []
    for group in groups:  # (b, H, W)
        numbers.append(torch.stack([group.amax((1, 2)), group.mean((1, 2))], 1))
        subject = group > BBOX_THRESHOLD
        profiles += [subject.any(2), subject.any(1)]
    peaks, areas = torch.cat(numbers).cpu().numpy().T
    fetched = staging.fetch(profiles)
    rows = [r for group in fetched[0::2] for r in group]
    cols = [c for group in fetched[1::2] for c in group]
    return peaks, areas, list(zip(rows, cols, strict=True))
