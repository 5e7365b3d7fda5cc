"""The jobs a replica draws before it reports ready.

With `serve.compile` the UNet is compiled (`compile_for_inference`), and Dynamo compiles a graph
for each new variant of its inputs: the first batch size, then one with the batch size
symbolic that serves every other, and the ControlNet's residuals; and, with `serve.lora_merge`,
each of them for both modes of the LoRA slot layers it draws in (serving/lora_slots.py: rows of
one slot draw it merged, rows of several each their own slot merged into its row's weights), as
Dynamo guards on the mode. (Without it every batch adds the per-row products: one mode.) A
variant first met by a request would compile then, for minutes on a GPU, on the replica's one
compute thread, with every request queued behind it. Serve routes no request to a replica
before its constructor returns, so the constructor draws one small job of each: one image, two
images (each alone, so that they are two batch sizes) and, with a ControlNet, a canny-controlled
image; with `serve.lora_merge` the one- and two-image jobs again in the per-row merged mode
(the engine's `lora_per_row`: rows of one slot drawn as if they were of several). (A control
job is a group of its own, of one subject: with merging on it is always drawn merged.) The
warm-up subject is zero-shot (every row on slot 0), which draws the same graphs as any LoRA
subject or mix of them: only tensor contents differ. Edits run eagerly
(serving/edits.py), so they add none. Without compile only the one-image job runs (on a GPU:
CUDA's first kernels).
"""

from __future__ import annotations

import logging

import PIL.Image
import torch

from pipeline.config import Config
from pipeline.serving.controls import ControlRequest
from pipeline.serving.engine import Engine, Job
from pipeline.serving.requests import GenerationRequest
from pipeline.serving.subjects import ZeroShotSubject

log = logging.getLogger(__name__)

PROMPT, CATEGORY = "a photo of a dog", "dog"


def warm_up(engine: Engine, config: Config) -> None:
    """Draw each of `warm_up_jobs` in a batch of its own, with the engine's `lora_per_row` set as
    the job asks (then as it was). A failing generation fails the replica (it could serve
    nothing); a failing ControlNet job is logged and the replica starts: the ControlNet is an id
    that may not be in this machine's Hub cache, and only requests with a control image then get
    that error."""
    per_row = engine.lora_per_row
    try:
        for job, rows in warm_up_jobs(config, engine.controlnet_path is not None):
            engine.lora_per_row = rows
            engine.run([job])
            if job.error is None:
                continue
            if job.control is None:
                raise job.error
            log.warning("the ControlNet warm-up failed; requests with a control_image will compile or fail on their own: %s", job.error)
    finally:
        engine.lora_per_row = per_row


def warm_up_jobs(config: Config, controlnet: bool) -> list[tuple[Job, bool]]:
    """(job, whether the engine draws its rows in the per-row mode, `Engine.lora_per_row`): one
    image; with `serve.compile` also two images and (with `controlnet`) a canny-controlled image,
    and with `serve.lora_merge` on, the one and two images again in the per-row merged mode.
    `serve.warmup_steps` steps at the `generate:` size, a grey reference photo, seed 0."""
    gen, steps, merge = config.generate, config.serve.warmup_steps, config.serve.lora_merge
    subject = ZeroShotSubject((PIL.Image.new("RGB", (224, 224), "gray"),), CATEGORY)

    def job(num_images: int = 1, **kwargs) -> Job:
        request = GenerationRequest(PROMPT, num_images, 0, steps, gen.guidance_scale, None, gen.height, gen.width)
        return Job(request, subject, gen.height, gen.width, **kwargs)

    if not config.serve.compile:
        return [(job(), False)]
    jobs = [(job(), False), (job(2), False)]
    if controlnet:
        jobs.append((job(control=ControlRequest(PIL.Image.new("RGB", (gen.width, gen.height), "gray"), "canny", 1.0)), False))
    if merge:  # rows of several subjects: the per-row merged graphs (without merging they are the graphs above)
        jobs += [(job(), True), (job(2), True)]
    return jobs


def hold_compiled_graphs() -> None:
    """After the warm-up, a request that would make Dynamo compile a new graph (an image size
    the warm-up did not draw, such as a subject's own training resolution) runs eagerly
    instead: a compile takes minutes on a GPU, on the replica's one compute thread, with every
    other request queued behind it, where an eager image takes a few times a compiled one's
    time. The graphs compiled so far are still used wherever they fit. Process-wide
    (torch.compiler.set_stance): the replica's process draws nothing else."""
    torch.compiler.set_stance("eager_on_recompile")
