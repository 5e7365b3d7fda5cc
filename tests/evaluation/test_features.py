"""DINO and CLIP feature extractors: preprocessing by definition, loading the tiny checkpoints
and a folder saved in the official layout, identical images scoring 1."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline.config import PROFILE_MODELS
from pipeline.evaluation.features import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClipFeatures,
    DinoFeatures,
    preprocess_images,
)
from pipeline.evaluation.make_tiny import make_tiny_clip, make_tiny_dino
from pipeline.evaluation.metrics import mean_pairwise_cosine, text_similarity
from pipeline.model.image_processing import CLIP_MEAN, CLIP_STD

TINY_DINO = PROFILE_MODELS["tiny"]["dino"]
TINY_CLIP = PROFILE_MODELS["tiny"]["clip"]


def _noise(height, width, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def dino():
    return DinoFeatures(TINY_DINO)


@pytest.fixture(scope="module")
def clip():
    return ClipFeatures(TINY_CLIP)


def test_uniform_image_normalises_to_the_metric_constants():
    value = np.array([200, 100, 50], dtype=np.uint8)
    image = Image.fromarray(np.broadcast_to(value, (40, 60, 3)).copy())
    pixels = preprocess_images([image], resize=36, crop=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert pixels.shape == (1, 3, 32, 32) and pixels.dtype == torch.float32
    expected = (value / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    for c in range(3):
        assert torch.allclose(pixels[0, c], torch.full((32, 32), float(expected[c])), atol=1e-5)


def test_short_side_resize_then_centre_crop_keeps_the_middle():
    # Left third black, middle third white, right third black: after resizing the short side
    # and cropping the centre square, the crop is white in the middle and black at the edges.
    array = np.zeros((100, 300, 3), dtype=np.uint8)
    array[:, 100:200] = 255
    pixels = preprocess_images([Image.fromarray(array)], resize=30, crop=30, mean=(0, 0, 0), std=(1, 1, 1))
    assert pixels.shape == (1, 3, 30, 30)  # 300x100 -> 90x30 -> centre 30x30 = the white band
    assert pixels[0, :, :, 2:-2].min() > 0.95
    gray = preprocess_images([Image.fromarray(array).convert("L")], 30, 30, (0, 0, 0), (1, 1, 1))
    assert gray.shape == (1, 3, 30, 30)  # grayscale becomes RGB
    with pytest.raises(ValueError, match="must not exceed"):
        preprocess_images([Image.fromarray(array)], resize=20, crop=30, mean=(0, 0, 0), std=(1, 1, 1))


def test_clip_preprocessing_matches_the_reference_clip_processor():
    from transformers import CLIPImageProcessorPil

    reference = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    for image in (_noise(300, 400), _noise(500, 260, seed=1)):
        ours = preprocess_images([image], 224, 224, CLIP_MEAN, CLIP_STD)
        theirs = reference(images=[image], return_tensors="pt").pixel_values
        assert (ours - theirs).abs().max() < 1e-5


def test_tiny_extractors_load_and_give_fixed_width_features(dino, clip):
    images = [_noise(48, 64), _noise(64, 48, seed=1), _noise(20, 20, seed=2)]
    assert dino.crop == 32 and dino.resize == round(32 * 256 / 224)
    assert dino.encode_images(images).shape == (3, dino.model.config.hidden_size)
    assert clip.encode_images(images).shape == (3, clip.model.config.projection_dim)
    texts = clip.encode_texts(["a dog in the jungle", "a cube shaped stuffed animal " * 20])  # long: truncated
    assert texts.shape == (2, clip.model.config.projection_dim) and torch.isfinite(texts).all()


def test_identical_images_score_one(dino, clip):
    image = _noise(64, 80)
    assert mean_pairwise_cosine(dino.encode_images([image]), dino.encode_images([image.copy()])) == pytest.approx(1.0, abs=1e-6)
    assert mean_pairwise_cosine(clip.encode_images([image]), clip.encode_images([image.copy()])) == pytest.approx(1.0, abs=1e-6)
    text = clip.encode_texts(["a red dog"])
    assert float(text_similarity(text, clip.encode_texts(["a red dog"]))[0]) == pytest.approx(1.0, abs=1e-6)


def test_a_folder_saved_in_the_official_layout_loads_the_same(tmp_path, dino, clip):
    """save_pretrained writes what the Hub repos hold; loading it gives the same features."""
    dino.model.save_pretrained(tmp_path / "dino")
    clip.model.save_pretrained(tmp_path / "clip")
    clip.tokenizer.save_pretrained(tmp_path / "clip")
    assert (tmp_path / "dino" / "config.json").is_file() and (tmp_path / "clip" / "tokenizer_config.json").is_file()
    images = [_noise(40, 40)]
    assert torch.equal(DinoFeatures(str(tmp_path / "dino")).encode_images(images), dino.encode_images(images))
    reloaded = ClipFeatures(str(tmp_path / "clip"))
    assert torch.equal(reloaded.encode_images(images), clip.encode_images(images))
    assert torch.equal(reloaded.encode_texts(["a teapot"]), clip.encode_texts(["a teapot"]))


def test_make_tiny_rewrites_the_shipped_checkpoints(tmp_path):
    for make, shipped in ((make_tiny_dino, TINY_DINO), (make_tiny_clip, TINY_CLIP)):
        written = make(tmp_path / Path(shipped).name)
        ours, theirs = load_file(written / "model.safetensors"), load_file(Path(shipped) / "model.safetensors")
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert {p.name for p in written.iterdir()} == {p.name for p in Path(shipped).iterdir()}
