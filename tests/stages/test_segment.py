from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import PROFILE_MODELS
from stages.records import CATEGORY, CONFIDENCE, IMAGE, REJECT_REASON, REJECT_STAGE, SOURCE_URI
from stages.segment import Segmenter, confidence_from_logits


def test_confidence_is_sigmoid_of_upsampled_logits():
    logits = torch.tensor([[-2.0, 0.0], [0.0, 2.0]])
    conf = confidence_from_logits(logits, 4, 6)
    assert conf.shape == (4, 6) and conf.dtype == np.float32
    assert 0.0 < conf.min() < conf.max() < 1.0
    # Constant logits upsample to the same constant: sigmoid(0) = 0.5 exactly.
    np.testing.assert_allclose(confidence_from_logits(torch.zeros(3, 3), 7, 5), 0.5)
    # Corners keep the ordering of the input.
    assert conf[0, 0] < conf[-1, -1]


def test_minmax_normalisation_spans_unit_interval():
    conf = confidence_from_logits(torch.tensor([[-1.0, 0.5], [0.2, 0.3]]), 8, 8, normalize="minmax")
    assert conf.min() == pytest.approx(0.0, abs=1e-6) and conf.max() == pytest.approx(1.0, abs=1e-6)


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter(PROFILE_MODELS["tiny"]["clipseg"], batch_size=2)


def test_tiny_clipseg_loads_and_maps_every_photo_at_its_resolution(segmenter):
    rng = np.random.default_rng(0)
    shapes = [(40, 60), (64, 64), (50, 30)]
    images = [rng.integers(0, 255, (*s, 3), dtype=np.uint8) for s in shapes]
    images_col = np.empty(3, dtype=object)
    images_col[:] = images
    batch = {
        SOURCE_URI: np.array(["a", "b", "c"], dtype=object),
        CATEGORY: np.array(["dog", "cat", "dog"], dtype=object),
        IMAGE: images_col,
        REJECT_STAGE: np.array(["", "decode", ""], dtype=object),
        REJECT_REASON: np.array(["", "bad", ""], dtype=object),
    }
    out = segmenter(batch)
    assert out[CONFIDENCE][0].shape == (40, 60) and out[CONFIDENCE][2].shape == (50, 30)
    assert out[CONFIDENCE][1].shape == (1, 1)  # rejected row untouched
    for i in (0, 2):
        assert 0.0 <= out[CONFIDENCE][i].min() and out[CONFIDENCE][i].max() <= 1.0
    assert list(out[REJECT_STAGE]) == ["", "decode", ""]


def test_single_photo_batch_keeps_batch_axis(segmenter):
    img = np.zeros((32, 32, 3), np.uint8)
    assert segmenter.predict_logits([img], ["dog"]).shape[0] == 1


def test_prompt_changes_the_map(segmenter):
    img = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    a, b = segmenter.predict_logits([img, img], ["dog", "teapot"])
    assert not torch.allclose(a, b)


def test_loads_the_released_clipseg_file_layout(tmp_path):
    """CIDAS/clipseg-rd64-refined ships preprocessor_config.json (not processor_config.json),
    a slow-tokenizer config and special_tokens_map.json; the Segmenter must load that layout."""
    import json
    import shutil

    src = Path(PROFILE_MODELS["tiny"]["clipseg"])
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
        shutil.copy(src / name, tmp_path / name)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_resize": True, "image_processor_type": "ViTImageProcessor",
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
        "processor_class": "CLIPSegProcessor", "resample": 2, "rescale_factor": 0.00392156862745098,
        "size": {"height": 64, "width": 64},
    }))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "processor_class": "CLIPSegProcessor",
    }))
    released = Segmenter(str(tmp_path))
    shipped = Segmenter(str(src))
    img = np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    torch.testing.assert_close(released.predict_logits([img], ["dog"]), shipped.predict_logits([img], ["dog"]))


def test_stacked_logits_give_the_same_maps_each_normalised_on_its_own():
    logits = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 4.0, 0.2]).view(3, 1, 1)
    stacked = confidence_from_logits(logits, 9, 11, normalize="minmax")
    assert stacked.shape == (3, 9, 11)
    for i in range(3):
        single = confidence_from_logits(logits[i], 9, 11, normalize="minmax")
        np.testing.assert_allclose(stacked[i], single, atol=1e-6, rtol=0)
        assert stacked[i].min() == pytest.approx(0.0, abs=1e-6) and stacked[i].max() == pytest.approx(1.0, abs=1e-6)


def _photos() -> list[np.ndarray]:
    """Real photos at their size, one cropped off-square, and random noise smaller than the model
    input (an upsample), so both resize directions are checked."""
    from PIL import Image

    files = sorted(Path(__file__).parents[2].glob("datasets/dreambench-mini/*/0[12].jpg"))[:4]
    photos = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    photos.append(photos[0][:300, 50:470])
    photos.append(np.random.default_rng(3).integers(0, 256, (40, 90, 3), dtype=np.uint8))
    return photos


def testtensor_preprocessing_matches_clipseg_processor_within_one_level():
    from pipeline.tiny_models import clipseg_image_processor
    from stages.segment import pixels_for_clipseg

    processor = clipseg_image_processor(352)  # the released models' size
    photos = _photos()
    assert len(photos) == 6
    reference = processor(images=photos, return_tensors="pt")["pixel_values"]
    ours = pixels_for_clipseg(
        photos, 352, 352, processor.image_mean, processor.image_std, processor.resample, torch.device("cpu"), torch.float32
    )
    levels = (ours - reference).abs() * 255 * torch.tensor(processor.image_std).view(1, 3, 1, 1)
    assert ours.shape == reference.shape
    assert levels.max() <= 1.0 + 1e-3  # PIL and torch round some pixels to neighbouring levels
    assert (levels.mean(dim=(1, 2, 3)) < 0.25).all()


def test_segmenter_tensor_path_gives_the_processors_logits(segmenter):
    assert segmenter.tensor_preprocessing
    photos = _photos()
    categories = ["dog", "backpack", "dog", "cat", "dog", "teapot"]
    fast = segmenter.predict_logits(photos, categories)
    segmenter.tensor_preprocessing = False
    try:
        slow = segmenter.predict_logits(photos, categories)
    finally:
        segmenter.tensor_preprocessing = True
    # The random tiny model turns one-level pixel differences into logit changes of ~1% of
    # their spread; a wrong channel order or scale changes them by about the spread itself.
    relative = (fast - slow).abs().mean(dim=(1, 2)) / slow.std(dim=(1, 2))
    assert (relative < 0.02).all(), relative


def test_processors_the_tensor_path_cannot_match_are_left_to_the_processor():
    from pipeline.tiny_models import clipseg_image_processor
    from stages.segment import tensor_preprocessing_matches

    processor = clipseg_image_processor(352)
    assert tensor_preprocessing_matches(processor)
    processor.resample = 0  # nearest
    assert not tensor_preprocessing_matches(processor)
    processor = clipseg_image_processor(352)
    processor.do_normalize = False
    assert not tensor_preprocessing_matches(processor)


@pytest.mark.parametrize("tensor_path", [True, False])
def test_a_prompt_past_clips_77_tokens_is_cut_there(segmenter, tensor_path):
    # A subjects.csv category of 100 emoji (within its 100 characters) is ~400 tokens: CLIPSeg's
    # ValueError failed the whole data build, and edit --mask-prompt, with a stack trace.
    img = np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    long = "\U0001f436" * 100
    segmenter.tensor_preprocessing = tensor_path
    try:
        cut, longer, short = segmenter.predict_logits([img, img, img], [long, long + " teapot", "dog"])
    finally:
        segmenter.tensor_preprocessing = True
    torch.testing.assert_close(cut, longer)  # what is past the 77th token is not read
    assert not torch.allclose(cut, short)
