"""A drawn group's images on their way to the host, finished off the compute thread.

The compute thread (Engine.draw) queues a group's whole GPU work: conditioning, denoising, the
VAE decode, the pixels rounded to uint8 on the device (`SubjectImageProcessor.to_pixels`) and
their copy into page-locked host memory, then returns without waiting for any of it. The
replica's finishing thread (`finish_jobs`, batcher.py) waits for the copy, makes the PIL images
and the group's phase timings, and hands each job its images. So while one batch's last steps,
decode and copy run on the GPU, the compute thread already conditions the next batch and queues
its steps behind them, and the GPU does not wait for the host between batches (BENCHMARKS.md
"Serving": at 16 clients it was busy 89% of the time with the waits and the host-side
conversion on the compute thread).

The copy is queued on the compute thread's stream, after the decode, so the next batch's
kernels follow it in order and may reuse the memory the pixels leave; only the host buffer and
an event outlive the call. On a CPU the pixels are on the host already and nothing waits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import PIL.Image
import torch

from pipeline.model.image_processing import SubjectImageProcessor
from pipeline.serving.timings import Mark, PhaseClock

if TYPE_CHECKING:
    from pipeline.serving.engine import Job

log = logging.getLogger(__name__)


@dataclass
class HostPixels:
    """uint8 pixels (N, H, W, 3) in host memory, valid once `ready` (a CUDA event) has passed."""

    pixels: torch.Tensor
    ready: torch.cuda.Event | None = None

    @classmethod
    def copy_of(cls, decoded: torch.Tensor) -> HostPixels:
        """`decoded` (N, 3, H, W, the VAE's output) as uint8 pixels, copied to the host without
        waiting for the device."""
        pixels = SubjectImageProcessor.to_pixels(decoded)
        if pixels.device.type != "cuda":
            return cls(pixels.contiguous())
        host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(pixels, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(host, ready)

    def images(self) -> list[PIL.Image.Image]:
        if self.ready is not None:
            self.ready.synchronize()
        return [PIL.Image.fromarray(image) for image in self.pixels.numpy()]


@dataclass
class DrawnGroup:
    """One drawn group: its jobs, in order, each with `request.num_images` images of `chunks`
    (one HostPixels per denoising chunk), and the marks its phases are read from."""

    jobs: list[Job]
    began: Mark
    conditioned: Mark
    chunks: list[HostPixels] = field(default_factory=list)
    spans: list[tuple[Mark, Mark, Mark]] = field(default_factory=list)  # each chunk's start, denoised, decoded
    finished: bool = False

    def add_chunk(self, start: Mark, denoised: Mark, decoded: torch.Tensor, clock: PhaseClock) -> Mark:
        """A chunk denoised from `start` to `denoised`: its VAE output's pixels on their way to
        the host. Returns the mark after them, where the next chunk starts."""
        self.chunks.append(HostPixels.copy_of(decoded))
        self.spans.append((start, denoised, clock.mark()))
        return self.spans[-1][2]

    def finish(self) -> None:
        """Each job's images and phase timings (queue, condition, denoise, decode). Runs once;
        a failure (the device's) becomes every job's error."""
        if self.finished:
            return
        self.finished = True
        try:
            images = [image for chunk in self.chunks for image in chunk.images()]
            condition = PhaseClock.seconds(self.began, self.conditioned)
            denoise = sum(PhaseClock.seconds(start, denoised) for start, denoised, _ in self.spans)
            decode = sum(PhaseClock.seconds(denoised, decoded) for _, denoised, decoded in self.spans)
        except Exception as exc:  # nothing a request did: the device failed after its work was queued
            log.error("finishing a group of %d request(s) failed", len(self.jobs), exc_info=exc)
            for job in self.jobs:
                job.images, job.error = None, exc
            return
        for job in self.jobs:
            n = job.request.num_images
            job.images, images = images[:n], images[n:]
            job.timings.update(queue=self.began.host - job.enqueued, condition=condition, denoise=denoise, decode=decode)


def finish_jobs(jobs: list[Job]) -> list[Job]:
    """Finish every drawn group of `jobs` (each once, in order): after it, each job holds its
    images or its error. Jobs drawn in full already (edits, failures) are left as they are."""
    for job in jobs:
        if job.drawn is not None:
            job.drawn.finish()
            job.drawn = None
    return jobs
