"""SDPA attention for BLIP captioners (stages/caption_attention.py): the same vision features
and the same greedy captions as transformers' eager attention, on a tiny BLIP and on one of
BLIP-base's widths; eager leaves the model alone; BLIP-2 keeps its own attention."""

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.models.blip import modeling_blip

from pipeline.config import PROFILE_MODELS, CaptionConfig, load_config
from pipeline.data.build import processing_digest
from pipeline.data.plan import Cluster, caption_stage
from stages.caption import Captioner
from stages.caption_attention import apply_attention, is_patched, use_sdpa

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_pipeline import BLIP_TEXT, BLIP_VISION, make_random_blip  # noqa: E402

TINY_BLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
# Salesforce/blip-image-captioning-base's widths (ViT-B/16 at 384 px: 577 tokens, 12 heads; the
# BERT-base decoder and its vocabulary), two layers of each to stay quick on a CPU.
BASE_VISION = {**BLIP_VISION["base"], "num_hidden_layers": 2}
BASE_TEXT = {**BLIP_TEXT, "num_hidden_layers": 2}


@pytest.fixture(scope="module", params=["tiny", "base"])
def blip(request, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp(f"blip-{request.param}")
    if request.param == "tiny":
        return str(make_random_blip(out, TINY_BLIP, TINY_BLIP, side=32, vocab=256))
    return str(make_random_blip(out, BASE_VISION, BASE_TEXT, side=384))


@pytest.fixture(scope="module")
def pair(blip) -> tuple[Captioner, Captioner]:
    """The same BLIP captioner (float32 on CPU) with eager and with SDPA attention."""
    return Captioner(blip, max_new_tokens=8, attention="eager"), Captioner(blip, max_new_tokens=8, attention="sdpa")


def _images(n: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8) for i in range(n)]


def _generated(captioner: Captioner, images: list[np.ndarray]) -> torch.Tensor:
    """The tokens generate() returned for `images` inside caption_images."""
    tokens = []
    generate = captioner.model.generate

    def spy(**kwargs):
        tokens.append(generate(**kwargs))
        return tokens[-1]

    captioner.model.generate = spy
    try:
        captioner.caption_images(images)
    finally:
        del captioner.model.generate
    return tokens[0]


def test_sdpa_patches_every_blip_attention(pair):
    eager, sdpa = pair
    layers = sdpa.model.config.vision_config.num_hidden_layers, sdpa.model.config.text_config.num_hidden_layers
    assert sdpa.attention == {"vision": layers[0], "text": 2 * layers[1]}  # the decoder's self- and cross-attention
    assert eager.attention == {"vision": 0, "text": 0}


def test_sdpa_computes_the_vision_encoders_features_as_eager_does(pair):
    eager, sdpa = pair
    side = eager.model.config.vision_config.image_size
    pixels = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = eager.model.vision_model(pixel_values=pixels).last_hidden_state
        got = sdpa.model.vision_model(pixel_values=pixels).last_hidden_state
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("prompt", ["", "a photo of"])
def test_sdpa_captions_are_eagers_token_for_token(blip, pair, prompt):
    """Greedy generate() through the decoder's key/value cache: the prompt's tokens at once
    (causal mask), then one token a step, the image's keys and values made once per layer."""
    eager, sdpa = (Captioner(blip, prompt, max_new_tokens=8, attention=a) for a in ("eager", "sdpa")) if prompt else pair
    want = _generated(eager, _images())
    assert want.shape[1] > 3
    assert torch.equal(_generated(sdpa, _images()), want)


def test_sdpa_masks_padded_text_and_image_tokens_as_eager_does(pair):
    """The decoder's additive masks: right-padded captions (self-attention) and image tokens
    masked out (cross-attention), in one forward without generate."""
    eager, sdpa = pair
    config = eager.model.config
    rng = torch.Generator().manual_seed(0)
    ids = torch.randint(200, 250, (2, 6), generator=rng)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    image = torch.randn(2, 9, config.vision_config.hidden_size, generator=rng)
    image_mask = torch.ones(2, 9, dtype=torch.long)
    image_mask[1, 5:] = 0
    args = {"input_ids": ids, "attention_mask": mask, "encoder_hidden_states": image, "encoder_attention_mask": image_mask}
    with torch.inference_mode():
        want = eager.model.text_decoder(**args, use_cache=False).logits
        got = sdpa.model.text_decoder(**args, use_cache=False).logits
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_sdpa_runs_in_place_of_the_eager_softmax(pair, monkeypatch):
    eager, sdpa = pair
    calls = {"sdpa": 0, "softmax": 0}
    real_sdpa, real_softmax = torch.nn.functional.scaled_dot_product_attention, torch.nn.functional.softmax

    def count(name, fn):
        def spy(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return spy

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", count("sdpa", real_sdpa))
    monkeypatch.setattr(torch.nn.functional, "softmax", count("softmax", real_softmax))
    tokens = _generated(sdpa, _images(2))
    steps = tokens.shape[1] - 1  # BLIP's [DEC] start token is given, each later one is a decoder step
    vision, text = sdpa.attention["vision"], sdpa.attention["text"]
    assert calls == {"sdpa": vision + text * steps, "softmax": 0}
    calls.update(sdpa=0, softmax=0)
    _generated(eager, _images(2))
    assert calls["sdpa"] == 0 and calls["softmax"] == vision + text * steps


def test_eager_leaves_the_model_as_transformers_made_it(pair):
    eager, sdpa = pair
    assert not any("forward" in m.__dict__ for m in eager.model.modules())
    assert apply_attention(eager.model, "eager") == {"vision": 0, "text": 0}
    assert not any("forward" in m.__dict__ for m in eager.model.modules())
    assert sum(is_patched(m) for m in sdpa.model.modules()) == sum(sdpa.attention.values())
    assert use_sdpa(sdpa.model) == {"vision": 0, "text": 0}  # patched once only
    with pytest.raises(ValueError, match="attention must be one of"):
        apply_attention(eager.model, "flash")


def test_a_blip_attention_that_transformers_changed_keeps_its_eager_forward(pair, monkeypatch, caplog):
    """The ViT's forward is not the one caption_attention reimplements: it stays, with the reason
    logged, while the text decoder's attention is still patched."""
    eager, _ = pair

    def changed(self, hidden_states, **kwargs):
        return self.projection(hidden_states), None

    monkeypatch.setattr(modeling_blip.BlipAttention, "forward", changed)
    with caplog.at_level(logging.WARNING, logger="stages.caption_attention"):
        counts = use_sdpa(eager.model)
    try:
        assert counts["vision"] == 0 and counts["text"] > 0
        assert "BlipAttention keeps its eager attention: its forward no longer computes" in caplog.text
    finally:
        for module in eager.model.modules():
            module.__dict__.pop("forward", None)


def test_blip2_keeps_its_own_sdpa_attention():
    """The tiny captioner is a BLIP-2: transformers already runs its attention through SDPA, and
    data.caption.attention leaves it alone."""
    captioner = Captioner(PROFILE_MODELS["tiny"]["captioner"], max_new_tokens=6, attention="sdpa")
    assert type(captioner.model).__name__ == "Blip2ForConditionalGeneration"
    assert captioner.attention == {"vision": 0, "text": 0}
    assert captioner.model.config.vision_config._attn_implementation == "sdpa"
    assert not any("forward" in m.__dict__ for m in captioner.model.modules())
    eager = Captioner(PROFILE_MODELS["tiny"]["captioner"], max_new_tokens=6, attention="eager")
    assert eager.caption_images(_images()) == captioner.caption_images(_images())


def test_the_setting_reaches_the_captioner_and_leaves_the_processing_digest_alone():
    assert CaptionConfig().attention == "sdpa"
    stage = caption_stage(CaptionConfig(attention="eager"), "captioner", Cluster(cpus=4, gpus=1), 512)
    assert stage.args["attention"] == "eager"
    base = load_config(overrides=["profile=tiny"])
    eager = load_config(overrides=["profile=tiny", "data.caption.attention=eager"])
    assert processing_digest(eager, "bg") == processing_digest(base, "bg")
