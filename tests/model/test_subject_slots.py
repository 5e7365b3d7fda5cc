"""Several subjects in one prompt, each in its own slot ("a [dog] next to a [cat]"), tiny profile."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from pipeline.config import PROFILE_MODELS
from pipeline.model import BlipDiffusion
from pipeline.model.prompts import split_subject_slots
from pipeline.model.text_encoder import SubjectSlots, insert_context

TINY = PROFILE_MODELS["tiny"]["blip_diffusion"]
SETTINGS = {"steps": 2, "height": 64, "width": 64, "seed": 3, "output_type": "np", "progress": False}


@pytest.fixture(scope="module")
def model():
    return BlipDiffusion.from_pretrained(TINY)


@pytest.fixture(scope="module")
def embeds(model):
    dog = model.encode_subject(Image.new("RGB", (64, 64), (200, 120, 40)), "dog")
    cat = model.encode_subject(Image.new("RGB", (64, 64), (30, 60, 220)), "cat")
    return {"dog": dog, "cat": cat}


def test_each_subjects_embeddings_go_before_its_position():
    tokens = torch.arange(5.0).view(1, 5, 1)  # token i has value i
    ctx = torch.tensor([10.0, 11.0, 20.0, 21.0]).view(1, 4, 1)  # two subjects of two embeddings
    spliced = insert_context(tokens, ctx, SubjectSlots((2, 4)))
    assert spliced.flatten().tolist() == [0, 1, 10, 11, 2, 3, 20, 21, 4]
    assert torch.equal(insert_context(tokens, ctx[:, :2], SubjectSlots((2,))), insert_context(tokens, ctx[:, :2], 2))


def test_a_bracketed_prompt_is_split_into_text_and_slots():
    slots = split_subject_slots("a  [dog]   next to a [ big  cat ]")
    assert (slots.text, slots.names, slots.prefixes) == ("a dog next to a big cat", ("dog", "big cat"), ("a ", "a dog next to a "))
    for bad in ("a [] dog", "a [dog next to", "a dog] here", "no slots here", "a [[dog]]"):
        with pytest.raises(ValueError, match="slot|bracket"):
            split_subject_slots(bad)


def test_one_slot_draws_what_the_single_subject_draws(model, embeds):
    """The reference puts the subject after "a", before its category: "a [dog] on the beach" is that prompt."""
    alone = model.generate("on the beach", subject_embeds=embeds["dog"], category="dog", **SETTINGS)
    slotted = model.generate("a [dog] on the beach", subjects={"dog": embeds["dog"]}, **SETTINGS)
    assert (slotted == alone).all()


def test_two_slots_draw_each_subject_in_its_place(model, embeds):
    both = model.generate("a [dog] next to a [cat]", subjects=embeds, **SETTINGS)
    swapped = model.generate("a [dog] next to a [cat]", subjects={"dog": embeds["cat"], "cat": embeds["dog"]}, **SETTINGS)
    assert both.shape == (1, 64, 64, 3) and abs(both - swapped).max() > 0
    slots = split_subject_slots("a [dog] next to a [cat]")
    ids = model.tokenizer(slots.text).input_ids  # <bos> a dog next to a cat <eos>
    for name, prefix in zip(slots.names, slots.prefixes, strict=True):
        position = 1 + len(model.tokenizer(prefix, add_special_tokens=False).input_ids)
        assert ids[position] == model.tokenizer(name, add_special_tokens=False).input_ids[0]


@pytest.mark.parametrize("prompt, subjects, words", [
    ("a [dog] next to a [horse]", ("dog", "cat"), "[horse], which is not given"),
    ("a [dog] on the grass", ("dog", "cat"), "'cat' is given but no prompt names it"),
    (" ".join(["word"] * 40) + " a [dog] and a [cat]", ("dog", "cat"),
     "[cat] is prompt token 165, past the 43 prompt tokens the text encoder reads beside 2 subjects; name it earlier"),
    # 300 slots take 4,800 of the 77 positions: the message once counted -4725 tokens left for the text.
    (" ".join(["[dog]"] * 300), ("dog",), "names 300 subjects, which take 16 positions each and a word; at most 4 fit in one prompt"),
], ids=["unknown-slot", "unused-subject", "slot-too-late", "too-many-slots"])
def test_slots_and_subjects_that_do_not_match_are_errors(model, embeds, prompt, subjects, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        model.generate(prompt, subjects={name: embeds[name] for name in subjects}, **SETTINGS)
