"""Textual inversion's learned word (Gal et al., "An Image is Worth One Word", 2022).

A textual-inversion subject is a new word, written `[S]` in a prompt: V embedding vectors
(`finetune.ti_vectors`, 1 as in the paper) in the text encoder's token-embedding space. The
vectors stand exactly where `[S]` stands, in place of its text, inside any prompt:

    "a painting of [S] in the snow"  ->  <bos> a painting of <V vectors> in the snow <eos>

A prompt without `[S]` has it put where the subject goes (`compose_prompt`): "a [S] on the
beach" for an object, "on the beach, in the style of [S]" for a style. Training draws each
row's prompt from the paper's neutral templates ("a photo of a [S]", "a rendition of the [S]";
for a style, "a painting in the style of [S]"), so the word carries the subject and nothing of
any one prompt. The vectors start at the token embedding of the subject's category word, the
paper's coarse initial descriptor.

Subjects trained before this word existed (16 vectors inserted after "a" with the category,
no `ti_property` in subject.json) still draw the way they were trained (pipeline/model/subject.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.model.prompts import PromptError, check_text

PLACEHOLDER = "[S]"  # the learned word in a prompt

# Neutral prompts of the Textual Inversion paper's training (its "small" ImageNet templates).
OBJECT_TEMPLATES: tuple[str, ...] = tuple(
    t.replace("{}", PLACEHOLDER)
    for t in (
        "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}", "a photo of a clean {}",
        "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}", "a photo of the cool {}",
        "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}", "a photo of the {}",
        "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}", "a rendition of the {}",
        "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}",
        "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
        "a photo of a cool {}", "a photo of a small {}",
    )
)  # fmt: skip
STYLE_TEMPLATES: tuple[str, ...] = tuple(
    t.replace("{}", PLACEHOLDER)
    for t in (
        "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
        "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
        "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
        "a close-up painting in the style of {}", "a bright painting in the style of {}", "a good painting in the style of {}",
        "a rendition in the style of {}", "a nice painting in the style of {}", "a small painting in the style of {}",
        "a weird painting in the style of {}", "a large painting in the style of {}",
    )
)  # fmt: skip
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


def compose_prompt(prompt: str, learned: str) -> str:
    """`prompt` as the learned word's prompt: as it is when it holds PLACEHOLDER, else with the
    word where the subject goes: "a [S] <prompt>" (`learned` "object") or "<prompt>, in the
    style of [S]" ("style").

    >>> compose_prompt("on the beach", "object"), compose_prompt("a cat", "style")
    ('a [S] on the beach', 'a cat, in the style of [S]')
    """
    prompt = check_text(prompt, "prompt").strip()
    if PLACEHOLDER in prompt:
        return prompt
    return f"a {PLACEHOLDER} {prompt}" if learned == "object" else f"{prompt}, in the style of {PLACEHOLDER}"


def placeholder_ids(tokenizer: Any, prompt: str, length: int) -> tuple[list[int], int]:
    """CLIP ids of `prompt` without its one PLACEHOLDER, `length` long (bos, text, eos, padding;
    text beyond length - 2 tokens cut, as the tokenizer cuts), and the position the learned
    vectors go before. The text either side is tokenized apart, so a word next to [S] stays
    the word it is. PromptError for no or several [S], or one past the tokens the encoder reads.
    """
    count = prompt.count(PLACEHOLDER)
    if count != 1:
        raise PromptError(f"prompt {prompt[:80]!r}: the learned word {PLACEHOLDER} must appear once, found {count}")
    before, after = prompt.split(PLACEHOLDER)
    head = tokenizer(before, add_special_tokens=False).input_ids
    tail = tokenizer(after, add_special_tokens=False).input_ids
    if len(head) > length - 2:
        raise PromptError(
            f"prompt {prompt[:80]!r}: {PLACEHOLDER} stands after the {length - 2} tokens the text encoder reads; "
            "put it earlier or shorten the prompt"
        )
    body = (head + tail)[: length - 2]
    ids = [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
    return ids + [tokenizer.pad_token_id] * (length - len(ids)), 1 + len(head)


def encode_pseudoword_prompts(model: Any, prompts: Sequence[str], vectors: torch.Tensor) -> torch.Tensor:
    """Text-encoder states (B, 77, D) of B prompts each holding PLACEHOLDER, the learned vectors
    (1, V, D) in its place (differentiable in `vectors`). `model` is a BlipDiffusion."""
    if vectors.ndim != 3 or vectors.shape[0] != 1:
        raise ValueError(f"the learned word must be (1, V, D), got {tuple(vectors.shape)}")
    length = model.text_encoder.max_positions - vectors.shape[1]
    rows = [placeholder_ids(model.tokenizer, check_text(p, "prompt"), length) for p in prompts]
    ids = torch.tensor([ids for ids, _ in rows], dtype=torch.int64, device=model.device)
    ctx = vectors.to(device=model.device, dtype=model.text_encoder.dtype).expand(len(rows), -1, -1)
    return model.text_encoder(ids, ctx, [position for _, position in rows])


@torch.no_grad()
def initial_vectors(model: Any, category: str, count: int) -> torch.Tensor:
    """(1, count, D) float32: each vector the token embedding of `category` (the mean over its
    tokens when the word has several), the paper's initialisation from a coarse descriptor."""
    ids = model.tokenizer(check_text(category, "category"), add_special_tokens=False).input_ids
    table = model.text_encoder.text_model.embeddings.token_embedding.weight
    word = table[torch.tensor(ids, device=table.device)].float().mean(dim=0)  # (D,)
    return word.expand(1, count, -1).clone()
