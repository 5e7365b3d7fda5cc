import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import PROFILE_MODELS
from stages.caption import Captioner, clean_caption
from stages.records import Reject

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_pipeline import make_random_blip  # noqa: E402

# A BLIP captioner built as the benchmark builds BLIP-large and -base: 94k parameters, 32 px photos.
TINY_BLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def test_clean_caption_cuts_the_prompt_and_collapses_white_space():
    assert clean_caption("  a dog\n on   the grass ") == "a dog on the grass"
    assert clean_caption("A photo of  a dog on the grass", prompt="a photo of") == "a dog on the grass"
    assert clean_caption("a dog", prompt="a photo of") == "a dog"  # a prompt it did not repeat stays
    for empty, prompt in (("", ""), (" \n ", ""), ("a photo of", "a photo of")):
        with pytest.raises(Reject, match="empty caption") as info:
            clean_caption(empty, prompt)
        assert info.value.stage == "caption"


@pytest.fixture(scope="module")
def captioner():
    return Captioner(PROFILE_MODELS["tiny"]["captioner"], max_new_tokens=6, batch_size=2)


def _batch(captions, stages):
    rng = np.random.default_rng(0)
    obj = lambda xs: np.array(xs, dtype=object)  # noqa: E731
    images = np.empty(len(captions), dtype=object)
    images[:] = [rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8) for i in range(len(captions))]
    return {
        "source_uri": obj([f"p{i}" for i in range(len(captions))]), "image": images, "caption": obj(captions),
        "reject_stage": obj(stages), "reject_reason": obj(["unreadable" if s else "" for s in stages]),
    }  # fmt: skip


def test_the_captioner_writes_a_caption_for_every_healthy_photo_and_keeps_the_users(captioner):
    out = captioner(_batch(["", "my own words", "", "", ""], ["", "", "decode", "", ""]))
    assert list(out["caption_source"]) == ["model", "user", "", "model", "model"]
    assert out["caption"][1] == "my own words" and out["caption"][2] == ""
    assert all(out["caption"][i].strip() for i in (0, 3, 4))
    assert list(out["reject_stage"]) == ["", "", "decode", "", ""] and "t_caption" in out
    # Greedy decoding: the same photo gets the same caption on every build.
    again = captioner(_batch(["", "my own words", "", "", ""], ["", "", "decode", "", ""]))
    assert list(again["caption"]) == list(out["caption"])


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> str:
    return str(make_random_blip(tmp_path_factory.mktemp("blip"), TINY_BLIP, TINY_BLIP, side=32, vocab=256))


def test_a_blip_captioner_loads_by_path_and_captions_every_healthy_photo(tiny_blip):
    captioner = Captioner(tiny_blip, max_new_tokens=6, batch_size=2)
    assert type(captioner.model).__name__ == "BlipForConditionalGeneration"
    assert type(captioner.processor).__name__ == "BlipProcessor" and captioner.tensor_preprocessing
    out = captioner(_batch(["", "my own words", "", "", ""], ["", "", "decode", "", ""]))
    assert list(out["caption_source"]) == ["model", "user", "", "model", "model"]
    assert all(out["caption"][i].strip() for i in (0, 3, 4))


def _generated_lengths(captioner: Captioner, images: list[np.ndarray]) -> list[int]:
    """Tokens each photo's generate() returned (BLIP's start token, the caption, its end)."""
    lengths = []
    generate = captioner.model.generate

    def spy(**kwargs):
        tokens = generate(**kwargs)
        lengths.extend(int((row != captioner.model.config.text_config.pad_token_id).sum()) for row in tokens)
        return tokens

    captioner.model.generate = spy
    captioner.caption_images(images)
    return lengths


def test_a_blip_caption_ends_at_sep(tiny_blip):
    """BLIP's generate stops at [SEP], which its generation config does not name and the
    captioner's bad_words_ids lists with the other special tokens: generate() leaves the end
    token it is given out of them, so captions still end there, not at max_new_tokens."""
    captioner = Captioner(tiny_blip, max_new_tokens=6, batch_size=2)
    sep = captioner.processor.tokenizer.sep_token_id
    with torch.no_grad():  # the model's favourite next token is [SEP], once min_new_tokens allows it
        captioner.model.text_decoder.cls.predictions.bias[sep] = 1e4
    images = _batch(["", "", ""], ["", "", ""])["image"]
    assert _generated_lengths(captioner, list(images)) == [3, 3, 3]  # [DEC], one word, [SEP]


def test_the_warm_up_batch_changes_no_later_caption(tiny_blip):
    """_warm_up (run on CUDA as the actor starts) captions blank photos through the same path:
    BLIP's generate writes over its input ids in place, so a warm-up that shared the prompt's
    tensors would change every caption after it."""
    images = list(_batch(["", "", ""], ["", "", ""])["image"])
    cold = Captioner(tiny_blip, prompt="a photo of", max_new_tokens=6, batch_size=2)
    warmed = Captioner(tiny_blip, prompt="a photo of", max_new_tokens=6, batch_size=2)
    warmed._warm_up(48)
    assert warmed.caption_images(images) == cold.caption_images(images)


def test_a_blip_captioner_continues_a_prompt_and_cuts_it(tiny_blip):
    """BLIP's generate writes [DEC] over the prompt's [CLS] in place: each batch needs its own copy."""
    captioner = Captioner(tiny_blip, prompt="a photo of", max_new_tokens=6, batch_size=2)
    out = captioner(_batch(["", "", ""], ["", "", ""]))
    assert list(out["caption_source"]) == ["model"] * 3
    assert all(c.strip() and not c.startswith("a photo of") for c in out["caption"])
    assert captioner.text_inputs["input_ids"][0, 0] == captioner.processor.tokenizer.cls_token_id
