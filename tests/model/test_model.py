"""BlipDiffusion beyond parity: save/load, determinism, training forward, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline.config import ASSETS_DIR
from pipeline.model import BlipDiffusion, CheckpointError, build_prompt
from pipeline.model.make_tiny import make_tiny

GOLDEN_CKPT = Path(__file__).resolve().parents[1] / "golden" / "tiny-blipdiffusion"
TINY = ASSETS_DIR / "tiny-blipdiffusion"
SIZE = 64  # px; 8x8 latents keep CPU generation in the milliseconds


@pytest.fixture(scope="module")
def model() -> BlipDiffusion:
    return BlipDiffusion.from_pretrained(TINY)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


def small_generate(model, photo, **kwargs):
    args = dict(subject_images=[photo], category="dog", steps=2, height=SIZE, width=SIZE, output_type="np", progress=False)
    return model.generate("on the beach", **{**args, **kwargs})


# --- save / load ------------------------------------------------------------------------------


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        out.update({f"{path.parent.name}/{k}": v for k, v in load_file(str(path)).items()})
    return out


def test_save_load_round_trip_keeps_reference_names_and_values(tmp_path):
    source = BlipDiffusion.from_pretrained(GOLDEN_CKPT)
    source.save_pretrained(tmp_path / "saved")
    original, saved = _tensors(GOLDEN_CKPT), _tensors(tmp_path / "saved")
    assert original.keys() == saved.keys()  # the reference's exact tensor names, position_ids included
    for name, tensor in original.items():
        assert saved[name].dtype == tensor.dtype and torch.equal(saved[name], tensor), name
    for rel in ("model_index.json", "qformer/config.json", "text_encoder/config.json", "image_processor/preprocessor_config.json"):
        assert json.loads((tmp_path / "saved" / rel).read_text()) == json.loads((GOLDEN_CKPT / rel).read_text()), rel
    for rel in ("tokenizer/vocab.json", "tokenizer/merges.txt", "qformer_tokenizer/vocab.txt"):
        assert (tmp_path / "saved" / rel).read_bytes() == (GOLDEN_CKPT / rel).read_bytes(), rel

    reloaded = BlipDiffusion.from_pretrained(tmp_path / "saved")
    ours, theirs = reloaded.state_dict(), source.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_shipped_tiny_checkpoint_is_what_make_tiny_writes(tmp_path):
    out = make_tiny(tmp_path / "tiny")
    shipped = sorted(p.relative_to(TINY).as_posix() for p in TINY.rglob("*") if p.is_file())
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == shipped
    made, ours = _tensors(out), _tensors(TINY)
    assert {k: v.shape for k, v in made.items()} == {k: v.shape for k, v in ours.items()}
    size = sum((TINY / p).stat().st_size for p in shipped)
    assert size < 4 * 2**20, f"tiny checkpoint is {size / 2**20:.1f} MB"


# --- generation -------------------------------------------------------------------------------


def test_generation_is_deterministic_for_a_seed(model, photo):
    first = small_generate(model, photo, seed=3, num_images=2)
    again = small_generate(model, photo, seed=3, num_images=2)
    other = small_generate(model, photo, seed=4, num_images=2)
    assert first.shape == (2, SIZE, SIZE, 3) and first.dtype == np.float32
    assert np.array_equal(first, again)
    assert not np.allclose(first, other)


def test_batching_does_not_change_images(model, photo):
    together = small_generate(model, photo, seed=1, num_images=3)
    one_by_one = small_generate(model, photo, seed=1, num_images=3, batch_size=1)
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_many_reference_photos_go_through_the_vit_in_bounded_batches(model, photo, monkeypatch):
    # `generate --subject-image` takes any number of photos: one ViT batch of hundreds could run
    # a GPU out of memory. The mean is the same as over one batch.
    from pipeline.model import blip_diffusion

    photos = [photo.rotate(angle) for angle in range(0, 50, 5)]  # 10 distinct photos
    sizes = []
    real = type(model).subject_embeddings
    monkeypatch.setattr(type(model), "subject_embeddings", lambda self, pixels, cats: sizes.append(len(cats)) or real(self, pixels, cats))
    monkeypatch.setattr(blip_diffusion, "ENCODE_BATCH", 4)
    chunked = model.encode_subjects([(photos[:6], "dog"), (photos[6:], "cat")])
    assert sizes == [4, 4, 2]
    monkeypatch.setattr(blip_diffusion, "ENCODE_BATCH", 64)
    whole = model.encode_subjects([(photos[:6], "dog"), (photos[6:], "cat")])
    assert sizes == [4, 4, 2, 10]
    for a, b in zip(chunked, whole, strict=True):
        torch.testing.assert_close(a, b)


def test_cached_subject_embeddings_equal_images(model, photo):
    embeds = model.encode_subject([photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], "dog")
    assert embeds.shape == (1, model.num_query_tokens, model.text_encoder.config.hidden_size)
    cached = small_generate(model, photo, seed=0, subject_images=None, subject_embeds=embeds)
    direct = model.generate(
        "on the beach",
        subject_images=[photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)],
        category="dog",
        steps=2,
        height=SIZE,
        width=SIZE,
        seed=0,
        output_type="np",
        progress=False,
    )
    np.testing.assert_allclose(cached, direct, atol=1e-6)


def test_pil_output(model, photo):
    images = small_generate(model, photo, seed=0, num_images=2, output_type="pil")
    assert len(images) == 2 and images[0].size == (SIZE, SIZE) and images[0].mode == "RGB"


# --- training forward -------------------------------------------------------------------------


def test_predict_noise_trains_qformer_not_vit(photo):
    model = BlipDiffusion.from_pretrained(TINY).train()
    pixels = model.image_processor.preprocess([photo, photo, photo])
    latents = torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([10, 500, 999])
    prompts = [build_prompt("dog", "on grass", prompt_reps=1), "a cat", "a dog"]
    drop = torch.tensor([False, True, False])
    noise = model.predict_noise(pixels, ["dog", "cat", "dog"], prompts, latents, timesteps, drop_subject=drop)
    assert noise.shape == latents.shape
    noise.square().mean().backward()
    assert model.qformer.query_tokens.grad is not None and model.qformer.query_tokens.grad.abs().sum() > 0
    assert model.qformer.proj_layer.dense1.weight.grad is not None
    assert all(p.grad is None for p in model.qformer.visual_encoder.parameters())


@torch.no_grad()
def test_dropped_subject_rows_get_the_plain_prompt(model, photo):
    pixels = model.image_processor.preprocess([photo, photo])
    hidden = model.encode_conditioning(pixels, ["dog", "dog"], ["a dog", "a dog"], drop_subject=torch.tensor([True, False]))
    assert hidden.shape == (2, model.text_encoder.max_positions, model.text_encoder.config.hidden_size)
    torch.testing.assert_close(hidden[0:1], model.encode_prompts(["a dog"], None))
    with_subject = model.encode_prompts(["a dog"], model.subject_embeddings(pixels[:1], ["dog"]))
    torch.testing.assert_close(hidden[1:2], with_subject)


# --- bad input --------------------------------------------------------------------------------


def _copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(GOLDEN_CKPT, tmp_path / "ckpt"))


def test_missing_folder_is_named(tmp_path):
    ckpt = _copy(tmp_path)
    shutil.rmtree(ckpt / "unet")
    with pytest.raises(CheckpointError, match="unet"):
        BlipDiffusion.from_pretrained(ckpt)


def test_missing_checkpoint_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        BlipDiffusion.from_pretrained(tmp_path / "nowhere")
    ckpt = _copy(tmp_path)
    (ckpt / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in .*text_encoder"):
        BlipDiffusion.from_pretrained(ckpt)


def test_a_config_of_random_bytes_is_named(tmp_path):
    """A qformer/config.json that is not text (random bytes): a CheckpointError naming the file,
    not the decoder's bare UnicodeDecodeError."""
    ckpt = _copy(tmp_path)
    (ckpt / "qformer" / "config.json").write_bytes(b"\xff\xfe\x00\x81 not json")
    with pytest.raises(CheckpointError, match="qformer/config.json"):
        BlipDiffusion.from_pretrained(ckpt)

@pytest.mark.parametrize("component", ["qformer", "text_encoder"])
@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_weights_that_are_not_safetensors_are_named(tmp_path, component, damage):
    """A model.safetensors of random bytes, or cut short (a broken download): a CheckpointError
    naming the file, not safetensors' bare SafetensorError."""
    ckpt = _copy(tmp_path)
    weights = ckpt / component / "model.safetensors"
    weights.write_bytes(np.random.default_rng(0).bytes(5000) if damage == "random" else weights.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match=f"{component}/model.safetensors"):
        BlipDiffusion.from_pretrained(ckpt)


@pytest.mark.parametrize("component", ["qformer", "unet"])
def test_a_config_nested_past_pythons_recursion_is_named(tmp_path, component):
    """JSON nested 100,000 deep (transformers' and diffusers' configs alike): a CheckpointError
    naming the component, not the decoder's RecursionError."""
    ckpt = _copy(tmp_path)
    (ckpt / component / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=component):
        BlipDiffusion.from_pretrained(ckpt)


@pytest.mark.parametrize("text", ['{"size": ', "[1, 2]"], ids=["truncated", "list"])
def test_an_image_processor_config_that_is_not_a_json_object_is_named(tmp_path, text):
    """image_processor/preprocessor_config.json cut short or not an object: a CheckpointError
    naming it, as every other config of the checkpoint, not a JSONDecodeError or TypeError."""
    ckpt = _copy(tmp_path)
    (ckpt / "image_processor" / "preprocessor_config.json").write_text(text)
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        BlipDiffusion.from_pretrained(ckpt)


@pytest.mark.parametrize(("component", "key", "value"), [
    ("qformer", "num_query_tokens", -1),
    ("text_encoder", "hidden_size", "wide"),
    ("unet", "block_out_channels", [-32, 64]),
    ("vae", "latent_channels", -4),
])
def test_a_config_whose_values_cannot_build_the_component_is_named(tmp_path, component, key, value):
    """Valid JSON whose values no model can be built from: a CheckpointError naming the
    component's config.json, not the model class's RuntimeError or TypeError."""
    ckpt = _copy(tmp_path)
    path = ckpt / component / "config.json"
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"{component}/config.json"):
        BlipDiffusion.from_pretrained(ckpt)


def test_config_that_does_not_fit_the_weights(tmp_path):
    ckpt = _copy(tmp_path)
    config = json.loads((ckpt / "text_encoder" / "config.json").read_text())
    config["intermediate_size"] *= 2
    (ckpt / "text_encoder" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"text_encoder weight .*fc1\.\w+ has shape"):
        BlipDiffusion.from_pretrained(ckpt)


def test_qformer_tokenizer_not_found_offline(tmp_path):
    ckpt = _copy(tmp_path)
    shutil.rmtree(ckpt / "qformer_tokenizer")
    with pytest.raises(CheckpointError, match="Q-Former's BERT tokenizer.*qformer_tokenizer"):
        BlipDiffusion.from_pretrained(ckpt, local_files_only=True)
    # An explicit local tokenizer folder works.
    model = BlipDiffusion.from_pretrained(ckpt, qformer_tokenizer=GOLDEN_CKPT / "qformer_tokenizer")
    assert model.qformer_tokenizer("dog").input_ids == [2, 7, 3]


def test_clip_tokenizer_without_vocabulary(tmp_path):
    ckpt = _copy(tmp_path)
    (ckpt / "tokenizer" / "vocab.json").unlink()
    (ckpt / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(CheckpointError, match="CLIP tokenizer"):
        BlipDiffusion.from_pretrained(ckpt)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": ""}, "prompt must not be empty"),
        ({"prompt": []}, "at least one prompt"),
        ({"category": "  "}, "category must not be empty"),
        ({"category": None}, "category"),
        ({"height": 60}, "multiples of 8"),
        ({"subject_images": None}, "subject_images"),
        ({"subject_images": [42]}, "must be a PIL image or a path"),
        ({"subject_embeds": torch.zeros(1, 3, 5), "subject_images": None}, r"subject_embeds must be \(1, 16, 32\)"),
        ({"latents": torch.zeros(1, 4, 3, 3)}, "latents must be"),
    ],
)
def test_bad_generation_input(model, photo, kwargs, message):
    args = dict(prompt="on the beach", subject_images=[photo], category="dog", steps=1, height=SIZE, width=SIZE, progress=False)
    with pytest.raises(ValueError, match=message):
        model.generate(**{**args, **kwargs})


def test_non_image_reference(model, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="notes.txt.*not a readable image"):
        model.encode_subject([text], "dog")
    with pytest.raises(ValueError, match="at least one reference image"):
        model.encode_subject([], "dog")


def test_wrong_pixel_shape(model):
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, 3, 224, 224\)"):
        model.subject_embeddings(torch.zeros(1, 3, 32, 32), ["dog"])
    with pytest.raises(ValueError, match="2 categories"):
        model.subject_embeddings(torch.zeros(1, 3, 224, 224), ["dog", "cat"])


def test_ddim_from_the_released_pndm_config_does_not_clip_latents():
    """diffusers' DDIM clips each x0 estimate to [-1, 1] unless told otherwise; SD latents are not
    in that range, and the released scheduler config (PNDM) does not mention clip_sample."""
    from pipeline.model.schedulers import fresh_scheduler, load_scheduler

    pndm = load_scheduler(ASSETS_DIR / "tiny-blipdiffusion" / "scheduler")
    assert "clip_sample" not in pndm.config
    assert fresh_scheduler(pndm, "ddim").config.clip_sample is False
