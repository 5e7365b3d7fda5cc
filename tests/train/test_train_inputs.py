"""Training-input stage: crops, the Q-Former's pixels, and the frozen encoders' outputs."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.config import PROFILE_MODELS
from pipeline.model import BlipDiffusion
from stages.train_inputs import (
    CAPTION,
    IMAGE_FEATURES,
    LATENT_PARAMS,
    PIXEL_VALUES,
    TARGET,
    FrozenEncoder,
    crop_target,
    image_features,
    latent_params,
    prepare_batch,
)
from tests.tinydata import publish_dataset

TINY = PROFILE_MODELS["tiny"]["blip_diffusion"]


@pytest.fixture(scope="module")
def model():
    return BlipDiffusion.from_pretrained(TINY)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    version = publish_dataset(tmp_path_factory.mktemp("ds"), {"dog": "dog", "cat": "cat"}, per_subject=2, size=(96, 64))
    return pq.read_table(version / "data").to_pydict()


def test_crop_target_resizes_the_short_side_and_scales_to_unit_range():
    photo = np.zeros((64, 128, 3), np.uint8)
    photo[:, 64:] = 255  # right half white
    centre = crop_target(photo, 32, "center", np.random.default_rng(0))
    assert centre.shape == (3, 32, 32) and centre.dtype == np.float32
    assert centre.min() == -1.0 and centre.max() == 1.0  # the crop straddles the edge
    assert np.allclose(centre[:, :, :12], -1.0, atol=0.02) and np.allclose(centre[:, :, -12:], 1.0, atol=0.02)
    lefts = {float(crop_target(photo, 32, "random", np.random.default_rng(s)).mean()) for s in range(20)}
    assert len(lefts) > 5  # random offsets along the long side


def test_prepare_batch_gives_processor_pixels_and_targets(model, rows):
    out = prepare_batch(
        {k: np.asarray(v, dtype=object) for k, v in rows.items()}, processor=model.image_processor, resolution=64, crop="center"
    )
    assert out[PIXEL_VALUES].shape == (4, 3, 224, 224) and out[TARGET].shape == (4, 3, 64, 64)
    assert list(out[CAPTION]) == [""] * 4
    # The same pixels `encode_subject` feeds the Q-Former for a reference photo.
    reference = model.image_processor.preprocess(Image.open(io.BytesIO(rows["composite"][0])))[0].numpy()
    assert np.array_equal(out[PIXEL_VALUES][0], reference)


def test_precomputed_features_give_the_same_prediction_as_pixels(model):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 224, 224, generator=g)
    noisy = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900])
    features = image_features(model.qformer, pixels)
    assert features.shape[:2] == (2, 1 + (224 // model.qformer.vision_config.patch_size) ** 2)
    with torch.no_grad():
        from_pixels = model.predict_noise(pixels, ["dog", "cat"], ["a dog", "a cat"], noisy, t)
        from_features = model.predict_noise(features, ["dog", "cat"], ["a dog", "a cat"], noisy, t)
    assert torch.equal(from_pixels, from_features)


def test_latent_params_are_the_vae_posterior(model):
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    params = latent_params(model.vae, images)
    assert params.shape == (2, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(params, model.vae.encode(images).latent_dist.parameters)


def test_frozen_encoder_replaces_pixels_by_encodings(model, rows):
    batch = prepare_batch(
        {k: np.asarray(v, dtype=object) for k, v in rows.items()}, processor=model.image_processor, resolution=64, crop="center"
    )
    out = FrozenEncoder(TINY)(batch)
    assert set(out) == {"category", CAPTION, LATENT_PARAMS, IMAGE_FEATURES}
    assert out[LATENT_PARAMS].dtype == np.float32 and out[LATENT_PARAMS].shape == (4, 8, 8, 8)
    assert out[IMAGE_FEATURES].dtype == np.float16 and out[IMAGE_FEATURES].shape[0] == 4
