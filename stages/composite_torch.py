"""The composite stage on the device that holds the mattes: `composite_batch`'s draws and
`paste_subject`'s pixel work in torch, for the matte actor that composites on its GPU
(stages/matte_composite.py).

This is the on-device twin of the CPU path in stages/composite.py, kept apart so that torch
stays out of the CPU path: the draws are composite.py's own (draw_composites), and the pixels
follow paste_subject operation for operation. A change to one path is a change to the other;
tests/stages/test_composite_torch.py holds them a level apart at most.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from stages.composite import CompositeDraw, Placement, covered_background, draw_composites


def _lanczos3(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) < 3.0, np.sinc(x) * np.sinc(x / 3.0), 0.0)


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(x))


# PIL's LANCZOS and BILINEAR: support (input pixels either side at scale 1) and filter.
_FILTERS = {"lanczos3": (3.0, _lanczos3), "triangle": (1.0, _triangle)}


@lru_cache(maxsize=4096)
def resample_weights(in_size: int, out_size: int, kernel: str) -> np.ndarray:
    """float64 (out_size, in_size): the weights each output pixel gives the input pixels when
    an axis is resized from in_size to out_size, as PIL weighs them. The filter sits on the
    output pixel's centre mapped into the input, and when shrinking it is stretched by the
    shrink factor, so that every input pixel counts (antialiasing: unstretched, a 4x shrink
    would see 6 of every 12 pixels and alias). Rows sum to 1. An axis that keeps its size is
    copied, as PIL does. Read-only: the array is shared through the cache."""
    if in_size == out_size:
        weights = np.eye(in_size)
    else:
        support, filter_fn = _FILTERS[kernel]
        scale = in_size / out_size
        stretch = max(scale, 1.0)
        centres = (np.arange(out_size) + 0.5) * scale
        # Only the taps within reach of each centre: the matte actor's CPU computes these for
        # every new (box, size) pair, and a dense evaluation cost 3 ms per axis at 512 px.
        reach = support * stretch
        taps = np.floor(centres - reach - 0.5).astype(np.int64)[:, None] + np.arange(math.ceil(2 * reach) + 2)
        inside = (taps >= 0) & (taps < in_size)
        values = np.where(inside, filter_fn((taps + 0.5 - centres[:, None]) / stretch), 0.0)
        weights = np.zeros((out_size, in_size))
        rows = np.broadcast_to(np.arange(out_size)[:, None], taps.shape)
        weights[rows[inside], taps[inside]] = values[inside]
        weights /= weights.sum(axis=1, keepdims=True)
    weights.flags.writeable = False
    return weights


@dataclass(frozen=True)
class PasteJob:
    """One composite for composite_subjects_torch: photo `photo` of the batch, its subject box,
    the composite's draws, and its background covered to the photo's size (covered_background)
    as a uint8 (h, w, 3) tensor on the device."""

    photo: int
    bbox: tuple[int, int, int, int]
    placement: Placement
    background: torch.Tensor


def composite_subjects_torch(
    foreground: Sequence[torch.Tensor], alpha: Sequence[torch.Tensor], jobs: Sequence[PasteJob]
) -> list[torch.Tensor]:
    """paste_subject for each job, on the device of the tensors: one uint8 (H, W, 3) composite
    per job. foreground[i] holds photo i's colours as (H, W, 3) 0-255 levels (uint8, or float
    holding whole levels), alpha[i] its (H, W) float alpha in [0, 1]; a stacked (B, H, W, ...)
    tensor serves as well as a list.

    The resizes are PIL's filters as weight matrices (resample_weights), two matmuls each, and
    the colours are rounded to 8 bits after each pass, as PIL stores an RGB image's passes:
    horizontal first, which is PIL's order for a box whose axes both shrink or both grow by one
    factor, as a subject's box does (Pillow 13 goes vertical first for some other resizes, and
    with the rounding in between the two orders can differ by tens of levels on noise). What is
    left is float32 against PIL's fixed point: a level here and there (tests/stages/test_composite_torch.py).
    That assumes float32 matmuls in full precision, torch's default: TF32 (a process that turns
    it on) keeps 10 bits of mantissa, ~0.1 level at 255, and would round many more apart."""
    if not jobs:
        return []
    device = jobs[0].background.device
    heights = [job.bbox[1] - job.bbox[0] for job in jobs]
    widths = [job.bbox[3] - job.bbox[2] for job in jobs]
    out_heights = [job.placement.height for job in jobs]
    out_widths = [job.placement.width for job in jobs]
    # Every job's four matrices at once, on the device: built on the host, they took ~4 ms of
    # CPU per composite on the H100 node and ~3 MB of upload each (bench_matte_actor.py).
    weights = [
        resample_weights_torch(sizes, out_sizes, kernel, device)
        for kernel in ("lanczos3", "triangle")
        for sizes, out_sizes in ((heights, out_heights), (widths, out_widths))
    ]
    return [
        _paste_torch(
            foreground[job.photo],
            alpha[job.photo],
            job,
            *(w[j, :out, :size] for w, out, size in zip(weights, (oh, ow, oh, ow), (h, w_, h, w_), strict=True)),
        )
        for j, (job, h, w_, oh, ow) in enumerate(zip(jobs, heights, widths, out_heights, out_widths, strict=True))
    ]


def resample_weights_torch(
    in_sizes: Sequence[int], out_sizes: Sequence[int], kernel: str, device: torch.device
) -> torch.Tensor:
    """float32 (J, max out, max in): resample_weights(in_sizes[j], out_sizes[j], kernel) for each
    j, zero-padded, evaluated on `device` in float64 as resample_weights does (every input pixel
    is weighed: those out of the filter's reach get 0, as there)."""
    support, _ = _FILTERS[kernel]
    f64 = {"dtype": torch.float64, "device": device}
    n_in, n_out = torch.tensor(in_sizes, **f64), torch.tensor(out_sizes, **f64)
    scale = n_in / n_out
    stretch = scale.clamp(min=1.0)
    centres = (torch.arange(max(out_sizes), **f64) + 0.5)[None] * scale[:, None]  # (J, out)
    taps = torch.arange(max(in_sizes), **f64)
    x = (taps[None, None] + 0.5 - centres[:, :, None]) / stretch[:, None, None]  # (J, out, in)
    if kernel == "lanczos3":
        values = torch.where(x.abs() < support, torch.sinc(x) * torch.sinc(x / 3.0), 0.0)
    else:
        values = (1.0 - x.abs()).clamp(min=0.0)
    values = values * (taps[None, None] < n_in[:, None, None])
    sums = values.sum(-1, keepdim=True)
    values = values / torch.where(sums == 0, 1.0, sums)
    # An axis that keeps its size is copied, as PIL does.
    eye = torch.arange(values.shape[1], device=device)[:, None] == torch.arange(values.shape[2], device=device)
    values = torch.where((n_in == n_out)[:, None, None], eye.to(values.dtype), values)
    rows = torch.arange(values.shape[1], **f64)[None, :, None] < n_out[:, None, None]
    return (values * rows).float()


def _paste_torch(
    foreground: torch.Tensor,
    alpha: torch.Tensor,
    job: PasteJob,
    fg_rows: torch.Tensor,
    fg_cols: torch.Tensor,
    alpha_rows: torch.Tensor,
    alpha_cols: torch.Tensor,
) -> torch.Tensor:
    """paste_subject for one job, given its weights (_job_weights, on the device)."""
    height, width = alpha.shape
    top, bottom, left, right = job.bbox
    p = job.placement
    composite = job.background[p.crop_top : p.crop_top + height, p.crop_left : p.crop_left + width].clone()
    box = foreground[top:bottom, left:right].permute(2, 0, 1).float()  # (3, h, w): a matmul per channel
    fg = _to_levels(fg_rows @ _to_levels(box @ fg_cols.T)).permute(1, 2, 0)  # (height, width, 3)
    a = (alpha_rows @ (alpha[top:bottom, left:right].float() @ alpha_cols.T)).clamp_(0.0, 1.0)[..., None]
    region = composite[p.y : p.y + p.height, p.x : p.x + p.width]
    # paste_subject's arithmetic, operation for operation, so equal inputs give equal bytes.
    region.copy_((fg * a + region.float() * (1.0 - a)).round_().clamp_(0, 255))
    return composite


def _to_levels(x: torch.Tensor) -> torch.Tensor:
    """Rounded and clipped to 0-255, as PIL stores each pass of an 8-bit resize."""
    return x.round_().clamp_(0, 255)


@dataclass(frozen=True)
class Subject:
    """A photo to composite: photo `photo` of the batch's tensors, its content hash (the draws'
    seed) and its subject box (subject_bbox)."""

    photo: int
    sha256: str
    bbox: tuple[int, int, int, int]


def composite_photos_torch(
    foreground: Sequence[torch.Tensor],
    alpha: Sequence[torch.Tensor],
    subjects: Sequence[Subject],
    background: Callable[[str, int, int], torch.Tensor],
    cover: Callable[[str, int, int], np.ndarray] = covered_background,
    **composite_args: object,
) -> list[list[tuple[CompositeDraw, torch.Tensor]]]:
    """composite_batch's work for photos on the device: per subject, its composites' draws
    (draw_composites with `composite_args`, composite_batch's keyword arguments) and their uint8
    (H, W, 3) pixels (composite_subjects_torch), on the tensors' device. `background(path,
    height, width)` gives covered_background(path, height, width) as a uint8 tensor there, and
    `cover` the same on the host (for the draws' sizes)."""
    draws, jobs = [], []
    for subject in subjects:
        height, width = alpha[subject.photo].shape
        draws.append(draw_composites(subject.sha256, height, width, subject.bbox, cover=cover, **composite_args))
        for d in draws[-1]:
            background_pixels = background(d.background_path, height, width)
            jobs.append(PasteJob(subject.photo, subject.bbox, d.placement, background_pixels))
    pixels = iter(composite_subjects_torch(foreground, alpha, jobs))
    return [[(d, next(pixels)) for d in photo_draws] for photo_draws in draws]
