"""SubjectImageProcessor.postprocess's pixels, now rounded by torch on the model's device
(`to_pixels`), against diffusers' own postprocess: the same uint8 values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.model.image_processing import SubjectImageProcessor


def _decoded(dtype: torch.dtype) -> torch.Tensor:
    """VAE-like outputs: random values past both ends of [-1, 1], plus a dense sweep of [-1, 1]
    that crosses every rounding boundary between two grey levels many times."""
    noisy = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(0)) * 0.8
    sweep = torch.linspace(-1.0, 1.0, 3 * 24 * 40 * 2).view(2, 3, 24, 40)
    return torch.cat([noisy, sweep]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pil_pixels_equal_diffusers_postprocess(dtype):
    from diffusers.image_processor import VaeImageProcessor

    decoded = _decoded(dtype)
    ours = np.stack([np.asarray(image) for image in SubjectImageProcessor.postprocess(decoded, "pil")])
    theirs = np.stack([np.asarray(image) for image in VaeImageProcessor(do_resize=False).postprocess(decoded, "pil")])
    assert ours.dtype == np.uint8 and ours.shape == (4, 24, 40, 3)
    np.testing.assert_array_equal(ours, theirs)


def test_to_pixels_stays_on_its_device_and_matches_the_pil_images():
    decoded = _decoded(torch.float32)
    pixels = SubjectImageProcessor.to_pixels(decoded)
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (4, 24, 40, 3) and pixels.device == decoded.device
    images = SubjectImageProcessor.postprocess(decoded, "pil")
    np.testing.assert_array_equal(pixels.numpy(), np.stack([np.asarray(image) for image in images]))
