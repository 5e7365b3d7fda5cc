"""compile_for_inference gives every caller (the server) the layout the generation benchmarks
were measured with: before it, the benchmark converted the UNet to channels-last and set
Inductor's 1x1-convolution lowering itself, so the server compiled a slower model than the one
measured."""

import numpy as np
import torch
import torch._inductor.config
from PIL import Image

from pipeline.config import ASSETS_DIR
from pipeline.model import BlipDiffusion

TINY = ASSETS_DIR / "tiny-blipdiffusion"


def _generate(model: BlipDiffusion, photo: Image.Image) -> np.ndarray:
    return model.generate(
        "on the beach", subject_images=[photo], category="dog", steps=2, height=64, width=64,
        output_type="np", progress=False, seed=0,
    )


def test_compile_for_inference_converts_the_layout_and_keeps_the_images(monkeypatch):
    monkeypatch.setattr(torch._inductor.config, "conv_1x1_as_mm", False)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    model = BlipDiffusion.from_pretrained(TINY)
    before = _generate(model, photo)
    torch._dynamo.reset()
    model.compile_for_inference(backend="eager")  # traces only: the layout is what is checked
    assert model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.unet.conv_in.weight.is_contiguous()  # converted, not merely 1x1
    assert torch._inductor.config.conv_1x1_as_mm
    np.testing.assert_allclose(_generate(model, photo), before, atol=1e-5)
    torch._dynamo.reset()
