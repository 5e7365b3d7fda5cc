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
