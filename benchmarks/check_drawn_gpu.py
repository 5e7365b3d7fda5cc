"""GPU check of the replica's pipelined drawing (pipeline/serving/drawn.py): not a timing.

The CPU tests cannot see what only a GPU does: `Engine.draw` returns while the device still
runs the batch, the pixels reach page-locked host memory asynchronously, and the finishing
thread must wait for them. Here each VAE decode is preceded by a GPU-side sleep (torch.cuda._sleep),
so the device lags the host by far more than a batch's host work, and three batches are
drawn back to back before any is finished, each finished on another thread, as the replica
does. Every image must equal the one the same job gets from `Engine.run` (draw and finish one
batch at a time), and every phase must be positive. Exit status 0 when all hold, 1 otherwise.

    python3 benchmarks/check_drawn_gpu.py --out $OUT/check_drawn_gpu.json   # the GPU machine
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import PROFILE_MODELS
from pipeline.model import BlipDiffusion
from pipeline.serving.drawn import finish_jobs
from pipeline.serving.engine import Engine, Job
from pipeline.serving.requests import GenerationRequest
from pipeline.serving.subjects import ZeroShotSubject

SLEEP_CYCLES = 200_000_000  # ~0.1 s of an H100's clock before each decode: the host gets far ahead


def jobs(batch: int) -> list[Job]:
    photo = Image.new("RGB", (64, 48), (40 * batch, 90, 200 - 30 * batch))
    return [Job(GenerationRequest(f"a dog number {batch} {i}", 1 + i % 2, 100 * batch + i, 4, 7.5, None, None, None),
                ZeroShotSubject((photo,), "dog"), 64, 64) for i in range(3)]


def pixels(job: Job) -> np.ndarray:
    return np.stack([np.asarray(image) for image in job.images])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("check_drawn_gpu.json"))
    parser.add_argument("--sync-debug", action="store_true", help="warn at each synchronizing call while the batches are drawn")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself (no sleep, nothing asynchronous)")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = BlipDiffusion.from_pretrained(PROFILE_MODELS["tiny"]["blip_diffusion"], device=device)
    decode = model.vae.decode

    def late_decode(*a, **k):
        if device.type == "cuda":
            torch.cuda._sleep(SLEEP_CYCLES)
        return decode(*a, **k)

    model.vae.decode = late_decode
    engine = Engine(model, max_batch_images=8, max_subjects=8, max_lora_adapters=2)
    expected = [[pixels(job) for job in engine.run(jobs(b))] for b in range(3)]

    if device.type == "cuda":
        torch.cuda.synchronize()
    started, returned = time.perf_counter(), []
    drawn = []
    if args.sync_debug:  # warn, with the stack, at each call that makes the host wait for the device
        torch.cuda.set_sync_debug_mode("warn")
    for b in range(3):
        drawn.append(engine.draw(jobs(b)))
        returned.append(round(time.perf_counter() - started, 3))
    if args.sync_debug:
        torch.cuda.set_sync_debug_mode("default")
    with ThreadPoolExecutor(1) as finisher:
        finished = [finisher.submit(finish_jobs, batch).result() for batch in drawn]
    total_s = time.perf_counter() - started
    failures = []
    for b, batch in enumerate(finished):
        for i, job in enumerate(batch):
            if job.error is not None:
                failures.append(f"batch {b} job {i}: {job.error!r}")
            elif not np.array_equal(pixels(job), expected[b][i]):
                failures.append(f"batch {b} job {i}: images differ from Engine.run's")
            elif min(job.timings.values()) < 0:
                failures.append(f"batch {b} job {i}: a negative phase {job.timings}")
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
        # Seconds after the start at which each draw returned, and all three were finished: with
        # the device 3 x ~0.1 s behind, draws that return early show the host ahead of it; a draw
        # that returns late waited for the device somewhere (a synchronising copy or read).
        "draws_returned_s": returned, "finished_s": round(total_s, 3),
        "timings": [job.timings for batch in finished for job in batch],
        "failures": failures,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
