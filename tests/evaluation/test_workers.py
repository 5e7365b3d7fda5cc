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


def test_generator_draws_a_fine_tuned_subject(tmp_path):
    """Textual inversion: the subject's own embedding, no photos needed. DreamBooth: text only,
    the rare token where DreamBench's stands, image k from seed + k."""
    import torch

    from pipeline.evaluation.workers import ImageGenerator
    from pipeline.model import BlipDiffusion
    from pipeline.model.subject import SubjectSpec, generate_from_text, save_subject

    tiny = PROFILE_MODELS["tiny"]["blip_diffusion"]
    model = BlipDiffusion.from_pretrained(tiny)
    embeds = torch.randn(1, model.num_query_tokens, model.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(0))
    save_subject(tmp_path / "ti", SubjectSpec("textual-inversion", "dog", "dog", tiny, 64), model, embeds)
    save_subject(tmp_path / "db", SubjectSpec("dreambooth", "dog", "dog", tiny, 64, identifier="sks"), model, None)
    settings = {"steps": 1, "guidance_scale": 7.5, "negative_prompt": "blurry", "height": 64, "width": 64, "seed": 3, "dtype": "float32", "batch_size": None}
    batch = {
        "subject_id": np.array(["dog"], dtype=object),
        "category": np.array(["dog"], dtype=object),
        "prompt": np.array(["a red dog"], dtype=object),
        "template": np.array(["a red {class}"], dtype=object),
        "indices": np.array([np.array([0, 2])], dtype=object),
    }
    for method in ("ti", "db"):
        generator = ImageGenerator(tiny, str(tmp_path), {}, settings, subject_folder=str(tmp_path / method))
        paths = [f"out-{method}/0.png", f"out-{method}/2.png"]
        out = generator({**batch, "paths": np.array([np.array(paths)], dtype=object)})
        assert list(out["path"]) == paths and Image.open(tmp_path / paths[1]).size == (64, 64)
    assert torch.equal(ImageGenerator(tiny, str(tmp_path), {}, settings, subject_folder=str(tmp_path / "ti"))._subjects["dog"], embeds)
    expected = generate_from_text(generator.model, ["a red sks dog"], steps=1, negative_prompt="blurry", height=64, width=64, seed=3 + 2)[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out-db/2.png")), np.asarray(expected))


def test_controlled_images_follow_the_window_of_generate_control(tmp_path):
    """evaluate.control steers with generate.control's window: 2 steps are 3 UNet calls, and
    end 0.3 keeps none of them (the image scale 0 draws), start 0.3 the last two (another)."""
    from pipeline.config import PROFILE_CONTROLNETS, load_config
    from pipeline.evaluation.plan import control_settings
    from pipeline.evaluation.workers import ImageGenerator

    assert "window" not in control_settings(load_config(None, ["profile=tiny"]))  # old fingerprints still match
    settings = control_settings(load_config(None, ["profile=tiny", "generate.control.end=0.3"]))
    assert settings["window"] == {"end": 0.3}
    tiny = PROFILE_MODELS["tiny"]["blip_diffusion"]
    shared = {"steps": 2, "guidance_scale": 7.5, "negative_prompt": "blurry", "height": 64, "width": 64, "seed": 3,
              "dtype": "float32", "batch_size": None}
    base = {"controlnet": PROFILE_CONTROLNETS["tiny"]["canny"], "scale": 1.0, "canny_low": 100, "canny_high": 200}
    batch = {
        "subject_id": np.array(["dog"], dtype=object),
        "category": np.array(["dog"], dtype=object),
        "prompt": np.array(["a red dog"], dtype=object),
        "template": np.array(["a red {class}"], dtype=object),
        "indices": np.array([np.array([0])], dtype=object),
    }
    images = {}
    for name, control in {"zero": {**base, "scale": 0.0}, "none": settings | base, "late": {**base, "window": {"start": 0.3}},
                          "full": base}.items():
        generator = ImageGenerator(tiny, str(tmp_path), {"dog": DOG_PHOTOS[:1]}, {**shared, "control": control})
        generator({**batch, "paths": np.array([np.array([f"{name}.png"])], dtype=object)})
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
    assert np.array_equal(images["none"], images["zero"])
    assert not np.array_equal(images["late"], images["zero"]) and not np.array_equal(images["late"], images["full"])


def test_real_photos_are_read_as_generate_reads_them(tmp_path):
    # PIL's own convert("RGB") clipped a 16-bit PNG to white and left an EXIF-rotated photo
    # on its side, so the real photos scored against were not the subject.
    from pipeline.evaluation.workers import load_rgb

    gray = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)
    Image.fromarray(gray).save(tmp_path / "deep.png")
    loaded = np.asarray(load_rgb(tmp_path / "deep.png"))
    assert loaded.shape == (64, 64, 3)
    np.testing.assert_array_equal(loaded[..., 0], np.rint(gray / 257).astype(np.uint8))
    upright = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    exif = upright.getexif()
    exif[0x0112] = 8  # stored turned: a viewer rotates it 90 degrees to stand it up
    upright.rotate(-90, expand=True).save(tmp_path / "turned.png", exif=exif)
    assert load_rgb(tmp_path / "turned.png").size == (60, 40)
