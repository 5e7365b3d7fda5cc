"""Textual inversion's learned word [S]: one vector by default, trained from the paper's
templates, placed where [S] stands in any prompt, and where the subject stands in DreamBench."""

import pytest
import torch

import pipeline.model.subject as subject_module
from pipeline.config import load_config
from pipeline.evaluation.workers import draw_prompt
from pipeline.model import BlipDiffusion
from pipeline.model.prompts import PromptError
from pipeline.model.pseudoword import (
    OBJECT_TEMPLATES,
    PLACEHOLDER,
    STYLE_TEMPLATES,
    compose_prompt,
    encode_pseudoword_prompts,
    placeholder_ids,
)
from pipeline.model.subject import SubjectModel
from pipeline.train.methods import REFERENCES_FOLDER, get_method
from tests.imagefiles import photo


@pytest.fixture(scope="module")
def subject_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ti")
    (root / REFERENCES_FOLDER).mkdir()
    photo(0, (64, 64)).save(root / REFERENCES_FOLDER / "0.png")
    return root


def _method(subject_dir, *extra):
    config = load_config(overrides=[
        "profile=tiny", f"train.data={subject_dir}", "train.method=textual-inversion", "train.resolution=64",
        "finetune.method=textual-inversion", "finetune.subject_id=dog", "finetune.category=dog", *extra,
    ])  # fmt: skip
    return get_method("textual-inversion").load(config)


def _word(model, word):
    """The token embedding (1, 1, D) of a one-token word."""
    (token,) = model.tokenizer(word, add_special_tokens=False).input_ids
    return model.text_encoder.text_model.embeddings.token_embedding.weight[token][None, None].detach()


def test_the_word_is_one_vector_started_at_the_category_and_trained_on_neutral_templates(subject_dir):
    method = _method(subject_dir)
    assert method.subject_embeds.shape == (1, 1, method.model.text_encoder.config.hidden_size)
    assert torch.equal(method.subject_embeds.detach(), _word(method.model, "dog"))
    assert [p.requires_grad for p in method.trainable_parameters()] == [True]  # the word alone learns
    torch.manual_seed(0)
    prompts = method.build_prompts(["dog"] * 8, [""] * 8)
    assert set(prompts) <= set(OBJECT_TEMPLATES) and len(set(prompts)) > 1
    style = _method(subject_dir, "finetune.ti_property=style", "finetune.ti_vectors=3")
    assert style.subject_embeds.shape[1] == 3 and style.spec().ti_property == "style"
    assert set(style.build_prompts(["dog"] * 4, [""] * 4)) <= set(STYLE_TEMPLATES)


def test_the_word_stands_where_the_prompt_puts_it(subject_dir):
    model = _method(subject_dir).model
    with torch.no_grad():
        # The vector of a real word at [S] reads exactly as that word written there.
        placed = encode_pseudoword_prompts(model, ["a painting of [S] in the snow"], _word(model, "dog"))
        written = model.encode_prompts(["a painting of dog in the snow"], None)
        assert torch.allclose(placed, written, atol=1e-6)
        moved = encode_pseudoword_prompts(model, ["[S] in the snow, a painting of"], _word(model, "dog"))
        assert not torch.allclose(moved, placed, atol=1e-3)
    ids, position = placeholder_ids(model.tokenizer, "a painting of [S] in the snow", 76)
    assert position == 4 and len(ids) == 76  # after <bos> a painting of
    for bad in ("a painting of a dog", "[S] and [S]"):
        with pytest.raises(PromptError, match=r"\[S\] must appear once"):
            placeholder_ids(model.tokenizer, bad, 76)
    with pytest.raises(PromptError, match="tokens the text encoder reads"):
        placeholder_ids(model.tokenizer, "snow " * 80 + PLACEHOLDER, 76)
    assert compose_prompt("on the beach", "object") == "a [S] on the beach"
    assert compose_prompt("a cat", "style") == "a cat, in the style of [S]"


def test_a_saved_word_draws_in_a_free_prompt(subject_dir, tmp_path):
    method = _method(subject_dir)
    method.eval().save(tmp_path)
    subject = SubjectModel.load(tmp_path / method.MODEL_FOLDER)
    assert subject.spec.ti_property == "object" and subject.subject_embeds.shape[1] == 1
    kwargs = {"steps": 2, "guidance_scale": 2.0, "seed": 0}
    free = subject.generate("a painting of [S] in the snow", **kwargs)[0]
    same = subject.generate("a painting of [S] in the snow", **kwargs)[0]
    other = SubjectModel(subject.model, subject.spec, _word(subject.model, "snow")).generate("a painting of [S] in the snow", **kwargs)[0]
    assert free.size == (64, 64) and free.tobytes() == same.tobytes() != other.tobytes()


def test_dreambench_puts_the_word_where_the_subject_stands(monkeypatch):
    seen = []
    monkeypatch.setattr(subject_module, "generate_from_text", lambda model, texts, **kw: seen.append((texts, kw)) or ["image"])
    word = torch.zeros(1, 1, 8)
    settings = {"steps": 2, "guidance_scale": 2.0, "negative_prompt": "", "height": 64, "width": 64}
    images = draw_prompt(BlipDiffusion, word, None, "dog", "a dog in the jungle", "a {class} in the jungle", [3], settings, "object")
    assert images == ["image"]
    (texts, kwargs), = seen
    assert texts == ["a [S] in the jungle"] and kwargs["learned_word"] is word and kwargs["seed"] == 3
