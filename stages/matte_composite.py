"""The matte stage's GPU actor that also filters and composites, where the mattes already are.

`MatteFilterComposite` is `Matter` (stages/matte.py) followed by the filter and composite stages
on the actor's device: the photos do not leave it after matting. It returns the rows
composite_batch would, with the filter's rejects and timings: K rows per accepted photo, ALPHA,
TRIMAP and FOREGROUND as uint8 (what the writer makes of them). Only the encoding is left
for the CPU tasks. On the H100 node, compositing in the CPU task after matting took 25-29 ms of
CPU per photo (PIL's Lanczos resize and the blend; BENCHMARKS.md, "The CPU task after
matting"), and the float32 alpha and the foreground crossed the object store only to be
composited there. The composites' pixels are stages/composite_torch.py's.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from stages.composite import (
    BBOX_THRESHOLD,
    CompositeDraw,
    bbox_of_profiles,
    composite_rows,
    covered_background,
    drawn_backgrounds,
)
from stages.composite import STAGE as COMPOSITE_STAGE
from stages.composite_torch import Subject, composite_photos_torch
from stages.filter import STAGE as FILTER_STAGE
from stages.filter import check_matte_stats
from stages.matte import DIVERGED, STAGE, Matter, Solved, Staging, to_uint8_torch, trimap_refusal
from stages.records import (
    ALPHA,
    ALPHA_AREA,
    FOREGROUND,
    IMAGE,
    PLACEHOLDER_RGB,
    SOURCE_SHA256,
    SOURCE_URI,
    TIMING_PREFIX,
    TRIMAP,
    Reject,
    apply_per_row,
    healthy_rows,
)

# Backgrounds a matting actor keeps on its device, and the threads that decode a batch's others.
UPLOADED_BACKGROUNDS = 64
BACKGROUND_THREADS = 4

# ALPHA and TRIMAP of a row without a matte, sent as uint8: a column's arrays must share a dtype
# on their way into Arrow.
_PLACEHOLDER_UINT8 = np.zeros((1, 1), np.uint8)


@dataclass
class _Finished:
    """A photo that passed the filter, with what the composite rows carry, on the host."""

    alpha: np.ndarray  # uint8 (H, W)
    trimap: np.ndarray  # uint8 (H, W)
    foreground: np.ndarray  # uint8 (H, W, 3): with alpha, the row's cutout
    area: float
    composites: list[tuple[CompositeDraw, np.ndarray]]


# Per photo: a matte reject's reason, a filter Reject, or the rows' makings.
_Outcome = str | Reject | _Finished


class _Passed(NamedTuple):
    """A photo that passed the filter: photo j of its solve, row `row` of the batch."""

    j: int
    row: int
    area: float
    bbox: tuple[int, int, int, int]


class MatteFilterComposite(Matter):
    """Ray Data actor: matte -> filter -> composite on the actor's device, each stage's rejects
    and time in its own columns.

    filter_args: filter_batch's keyword arguments; composite_args: composite_batch's. The rest
    is Matter's."""

    def __init__(self, filter_args: dict[str, Any], composite_args: dict[str, Any], **matter_args: Any):
        super().__init__(**matter_args)
        self.filter_args = filter_args
        self.composite_args = composite_args
        # Backgrounds on the device, most recently used last: a batch's composites that draw from
        # a small set (the procedural default) upload each once, not once per composite.
        self._uploaded: collections.OrderedDict[tuple[str, int, int], torch.Tensor] = collections.OrderedDict()
        # Backgrounds decoded on these threads while the device solves the batch's mattes
        # (_load_ahead): with a pool of thousands nearly every composite draws one not seen
        # before, and decoding each on the actor's thread, between its solves, left the GPU's
        # share of this actor idle. PIL decodes without holding the GIL.
        self._loader = ThreadPoolExecutor(BACKGROUND_THREADS, thread_name_prefix="backgrounds")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            return self._matte_and_finish(batch)

    def _matte_and_finish(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        clock = _StageClock(self.device)
        outcomes: dict[int, _Outcome] = {}
        cover = self._load_ahead(batch)

        def solve_and_finish(chunk: list[int]) -> None:
            with clock(STAGE):
                solved = self._solve_on_device([batch[IMAGE][i] for i in chunk], [batch[TRIMAP][i] for i in chunk])
            outcomes.update(self._finish_solve(batch, chunk, solved, clock, cover))

        self._each_fitting(self._chunks(batch), solve_and_finish)

        def matte_row(i: int) -> dict[str, object]:
            outcome = outcomes[i] if i in outcomes else trimap_refusal(batch[TRIMAP][i])  # unsolved: refused
            if isinstance(outcome, str):
                raise Reject(STAGE, outcome)
            if isinstance(outcome, _Finished):
                return {ALPHA: outcome.alpha, TRIMAP: outcome.trimap, FOREGROUND: outcome.foreground}
            return {ALPHA: _PLACEHOLDER_UINT8, TRIMAP: _PLACEHOLDER_UINT8, FOREGROUND: PLACEHOLDER_RGB}

        def filter_row(i: int) -> dict[str, object]:
            outcome = outcomes[i]
            if isinstance(outcome, Reject):
                raise outcome
            return {ALPHA_AREA: outcome.area}

        placeholders = {ALPHA: _PLACEHOLDER_UINT8, TRIMAP: _PLACEHOLDER_UINT8, FOREGROUND: PLACEHOLDER_RGB}
        batch = apply_per_row(batch, matte_row, placeholders)
        batch = apply_per_row(batch, filter_row, {ALPHA_AREA: 0.0})
        n = len(batch[SOURCE_URI])
        for stage in (STAGE, FILTER_STAGE):
            batch[TIMING_PREFIX + stage] = np.full(n, clock.seconds[stage] / max(n, 1), np.float64)
        made = {i: outcome.composites for i, outcome in outcomes.items() if isinstance(outcome, _Finished)}
        # composite_rows times from a start: put it back by the composites' time on the device.
        return composite_rows(batch, made, time.perf_counter() - clock.seconds[COMPOSITE_STAGE])

    def _load_ahead(self, batch: dict[str, np.ndarray]) -> Callable[[str, int, int], np.ndarray]:
        """Start decoding every background the batch's photos will draw (drawn_backgrounds), at
        each photo's size, on the loader threads; return what covered_background returns, from
        those loads (a background not loaded ahead is decoded on the spot, as before). The batch's
        decoded backgrounds stay in host memory until it is done: per_photo per photo, ~0.8 MB
        each at 512 px."""
        ahead: dict[tuple[str, int, int], Future] = {}
        for i in healthy_rows(batch):
            height, width = batch[IMAGE][i].shape[:2]
            for path in drawn_backgrounds(str(batch[SOURCE_SHA256][i]), **self.composite_args):
                key = (path, height, width)
                if key not in ahead and key not in self._uploaded:
                    ahead[key] = self._loader.submit(covered_background, *key)

        def cover(path: str, height: int, width: int) -> np.ndarray:
            loading = ahead.get((path, height, width))
            return loading.result() if loading is not None else covered_background(path, height, width)

        return cover

    def _finish_solve(
        self, batch: dict[str, np.ndarray], chunk: list[int], solved: Solved, clock: _StageClock,
        cover: Callable[[str, int, int], np.ndarray],
    ) -> dict[int, _Outcome]:
        """The filter and the composites of a solve's photos (row chunk[j] is photo j), on the
        device."""
        outcomes: dict[int, _Outcome] = {}
        passed: list[_Passed] = []
        with clock(FILTER_STAGE):
            peaks, areas, profiles = _matte_stats(solved.alpha, self._staging)
            for j, i in enumerate(chunk):
                if not solved.finite[j]:
                    outcomes[i] = DIVERGED
                    continue
                try:
                    area = check_matte_stats(float(peaks[j]), float(areas[j]), **self.filter_args)
                except Reject as reject:
                    outcomes[i] = reject
                    continue
                passed.append(_Passed(j, i, area, bbox_of_profiles(*profiles[j])))
        with clock(COMPOSITE_STAGE):
            outcomes.update(self._composite(batch, passed, solved, cover))
        return outcomes

    def _composite(
        self, batch: dict[str, np.ndarray], passed: list[_Passed], solved: Solved, cover: Callable[[str, int, int], np.ndarray]
    ) -> dict[int, _Finished]:
        """The composites of the photos that passed the filter, made on the device and brought
        back with their uint8 alphas, trimaps and foregrounds in one download."""
        subjects = [Subject(photo.j, str(batch[SOURCE_SHA256][photo.row]), photo.bbox) for photo in passed]
        made = composite_photos_torch(
            solved.foreground, solved.alpha, subjects, functools.partial(self._background, cover), cover=cover,
            **self.composite_args,
        )
        maps = [
            m for photo in passed for m in (to_uint8_torch(solved.alpha[photo.j]), to_uint8_torch(solved.trimap[photo.j]),
                                            solved.foreground[photo.j])
        ]  # fmt: skip
        fetched = self._staging.fetch(maps + [pixels for composites in made for _, pixels in composites])
        back = iter(fetched[len(maps) :])
        return {
            photo.row: _Finished(
                *fetched[3 * n : 3 * n + 3], photo.area, [(d, next(back)) for d, _ in composites]
            )
            for n, (photo, composites) in enumerate(zip(passed, made, strict=True))
        }

    def _background(self, cover: Callable[[str, int, int], np.ndarray], path: str, height: int, width: int) -> torch.Tensor:
        """The covered background on the device: kept for the last UPLOADED_BACKGROUNDS used."""
        key = (path, height, width)
        if key in self._uploaded:
            self._uploaded.move_to_end(key)
        else:
            self._uploaded[key] = torch.tensor(cover(path, height, width), device=self.device)
            if len(self._uploaded) > UPLOADED_BACKGROUNDS:
                self._uploaded.popitem(last=False)
        return self._uploaded[key]


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


def _matte_stats(
    alpha: torch.Tensor | list[torch.Tensor], staging: Staging
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
