"""Denoising never makes the host wait for the device between steps.

PNDM and DDIM compare and index with the timestep (`prev_timestep >= 0`,
`alphas_cumprod[timestep]`, inversion's `int(t)`). With the timesteps on the GPU each of those
reads waited for every queued kernel, once a step: the GPU then idled while the host queued the
next step (a compiled one-image generation on an H100 kept the GPU busy 0.34 s of its 0.44 s).
Here the model sits on PyTorch's meta device, where any read of a device value on the host
raises ("Tensor.item() cannot be called on meta tensors"): the same code paths, and a read
that would be a synchronisation on a GPU is an error instead.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ASSETS_DIR
from pipeline.model import BlipDiffusion
from pipeline.model.editing import edit
from tests.host_copies import HostCopies

TINY = ASSETS_DIR / "tiny-blipdiffusion"


class Denoised(Exception):
    """Raised after the denoising loop: decoding meta tensors into pictures cannot work."""


@pytest.fixture
def meta_model(monkeypatch) -> BlipDiffusion:
    model = BlipDiffusion.from_pretrained(TINY)
    for part in (model.unet, model.vae, model.text_encoder, model.qformer):
        part.to("meta")
    denoise = model._denoise

    def denoise_then_stop(*args, **kwargs):
        raise Denoised(denoise(*args, **kwargs).device)

    monkeypatch.setattr(model, "_denoise", denoise_then_stop)
    return model


def _photo() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))


def test_generation_steps_without_reading_the_device(meta_model):
    with pytest.raises(Denoised, match="meta"):
        meta_model.generate("on the beach", subject_images=[_photo()], category="dog", steps=3, height=64, width=64,
                            progress=False, seed=0)


def test_a_zero_shot_generation_copies_nothing_to_the_device_that_the_host_waits_for(meta_model):
    """The reference photos' pixels, the tokens, the noise: each copy from host memory is
    non-blocking (tests/host_copies.py), so a serving replica conditions its next batch while the
    last one is still denoising."""
    with HostCopies() as copies, pytest.raises(Denoised, match="meta"):
        meta_model.generate("on the beach", subject_images=[_photo()], category="dog", steps=3, height=64, width=64,
                            progress=False, seed=0)
    assert copies.seen and copies.waiting == []

def test_a_photo_edit_inverts_and_steps_without_reading_the_device(meta_model):
    photo = _photo()
    with pytest.raises(Denoised, match="meta"):
        edit(meta_model, "a dog on the beach", "dog", subject_images=[photo], category="cat", image=photo, steps=3,
             height=64, width=64, seed=0, progress=False)


def test_the_unet_gets_each_steps_timestep_on_its_device_and_the_scheduler_on_the_host():
    """The images stay those of the timesteps as the scheduler made them (CPU: one device)."""
    model = BlipDiffusion.from_pretrained(TINY)
    seen: list[tuple[torch.device, int]] = []
    forward = model.unet.forward

    def record(sample, timestep, *args, **kwargs):
        seen.append((timestep.device, int(timestep)))
        return forward(sample, timestep, *args, **kwargs)

    model.unet.forward = record
    model.generate("on the beach", subject_images=[_photo()], category="dog", steps=3, height=64, width=64,
                   progress=False, seed=0)
    scheduler = type(model.scheduler).from_config(model.scheduler.config)
    scheduler.set_timesteps(3)
    assert [t for _, t in seen] == scheduler.timesteps.tolist()
    assert {device for device, _ in seen} == {model.device}
