"""The evaluation actors, called directly (no Ray): prompt splitting, atomic writes, scoring."""

import numpy as np
import pytest
from PIL import Image

from pipeline.config import BUNDLED_DATASETS_DIR, PROFILE_MODELS
from pipeline.evaluation.metrics import text_similarity
from pipeline.evaluation.workers import ImageScorer, save_png_atomic, split_prompt

DOG_PHOTOS = sorted(str(p) for p in (BUNDLED_DATASETS_DIR / "dreambench-mini" / "dog").glob("*.jpg"))


def test_split_prompt_gives_back_the_exact_text():
    for prompt, parts in {
        "a dog in the jungle": ("dog", "in the jungle"),
        "a red dog": ("red", "dog"),
        "a cube shaped stuffed animal": ("cube", "shaped stuffed animal"),
    }.items():
        assert split_prompt(prompt) == parts
        assert f"a {parts[0]} {parts[1]}" == prompt  # what BLIP-Diffusion's build_prompt writes
    for bad in ("the dog in snow", "a dog"):
        with pytest.raises(ValueError, match="must read 'a "):
            split_prompt(bad)


def test_save_png_atomic_leaves_only_the_finished_file(tmp_path):
    path = tmp_path / "images" / "dog" / "p" / "0.png"
    save_png_atomic(Image.new("RGB", (8, 8), "red"), path)
    assert [p.name for p in path.parent.iterdir()] == ["0.png"]
    assert Image.open(path).getpixel((0, 0)) == (255, 0, 0)


def test_scorer_gives_one_for_a_real_photo_against_itself(tmp_path):
    (tmp_path / "gen").mkdir()
    Image.open(DOG_PHOTOS[0]).save(tmp_path / "gen" / "same.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "gen" / "noise.png")
    tiny = PROFILE_MODELS["tiny"]
    scorer = ImageScorer(tiny["dino"], tiny["clip"], str(tmp_path), {"dog": DOG_PHOTOS[:1], "two": DOG_PHOTOS[:2]}, batch_size=2)
    batch = {
        "subject_id": np.array(["dog", "dog", "two"], dtype=object),
        "prompt": np.array(["a dog", "a dog", "a dog on the beach"], dtype=object),
        "path": np.array(["gen/same.png", "gen/noise.png", "gen/same.png"], dtype=object),
    }
    out = scorer(batch)
    assert out["dino"][0] == pytest.approx(1.0, abs=1e-6) and out["clip_i"][0] == pytest.approx(1.0, abs=1e-6)
    for metric in ("dino", "clip_i", "clip_t"):
        assert out[metric].shape == (3,) and np.all(np.abs(out[metric]) <= 1.0)
    # Subject "two": the mean of cos(photo 0, photo 0) = 1 and cos(photo 0, photo 1) < 1.
    assert out["dino"][2] < 1.0
    same = Image.open(tmp_path / "gen" / "same.png").convert("RGB")
    expected = text_similarity(scorer.clip.encode_images([same]), scorer.clip.encode_texts(["a dog"]))
    assert out["clip_t"][0] == pytest.approx(float(expected[0]), abs=1e-6)
