"""Prompt text as BLIP-Diffusion builds it (LAVIS `_build_prompt`, diffusers 0.33 pipeline)."""

from __future__ import annotations

import re

# The negative prompt used with the released model in the reference examples (LAVIS notebooks and
# the diffusers 0.33 BlipDiffusionPipeline docstring). diffusers' `__call__` itself defaults to "".
DEFAULT_NEGATIVE_PROMPT = (
    "over-exposure, under-exposure, saturated, duplicate, out of frame, lowres, cropped, "
    "worst quality, low quality, jpeg artifacts, morbid, mutilated, out of frame, ugly, "
    "bad anatomy, bad proportions, deformed, blurry, duplicate"
)

# The reference repeats "a <category> <prompt>" this many times (times prompt_strength) to
# amplify the prompt against the 16 subject tokens; the tokenizer then truncates the text to
# the 61 positions left next to the subject tokens. The text is cut to what the tokenizer can
# read before it is repeated: a 200,000-word prompt repeated 20 times took gigabytes to tokenize.
DEFAULT_PROMPT_REPS = 20

# The subject embeddings go in after "<bos> a", i.e. the prompt reads "a [subject] <category> ...".
CONTEXT_BEGIN_POS = 2

# The CLIP text encoder's positions: the tokenizer keeps at most this many tokens of a text.
MAX_PROMPT_TOKENS = 77
# More characters than one token of CLIP's byte-level BPE vocabulary covers, so this many
# characters of words always make at least one token.
TOKEN_CHARS = 64
# Unicode White_Space: what the CLIP tokenizer's normaliser turns into one space (Python's
# `\s` also matches U+001C..U+001F, which the tokenizer keeps as tokens).
_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WORD = re.compile(f"[^{_SPACE}]+")


def build_prompt(
    category: str, prompt: str, prompt_strength: float = 1.0, prompt_reps: int = DEFAULT_PROMPT_REPS
) -> str:
    """The reference's prompt: ``"a {category} {prompt}"`` joined with ", " `strength * reps` times.

    >>> build_prompt("dog", " on the beach ", prompt_reps=2)
    'a dog on the beach, a dog on the beach'
    """
    check_text(category, "category")
    check_text(prompt, "prompt")
    repeats = int(prompt_strength * prompt_reps)
    if repeats < 1:
        raise ValueError(f"prompt_strength * prompt_reps must be >= 1, got {prompt_strength} * {prompt_reps}")
    text = truncate_prompt(f"a {category} {prompt.strip()}")
    return ", ".join([text] * repeats)


def truncate_prompt(text: str, max_tokens: int = MAX_PROMPT_TOKENS) -> str:
    """The words of `text` that a tokenizer keeping `max_tokens` tokens can read, one space apart.

    Every word makes at least one token, and `max_tokens * TOKEN_CHARS` characters of words at
    least `max_tokens`, so the tokens of the result begin with the `max_tokens` tokens of `text`
    itself (the tokenizer collapses white space the same way). Its length is at most
    `max_tokens * (TOKEN_CHARS + 1)` characters, whatever the length of `text`.

    >>> truncate_prompt(" on  the\tbeach ")
    'on the beach'
    >>> truncate_prompt("a b c d", max_tokens=2)
    'a b'
    """
    words, budget = [], max_tokens * TOKEN_CHARS
    for match in _WORD.finditer(text):
        start, end = match.span()
        words.append(text[start : min(end, start + budget)])
        budget -= end - start
        if budget <= 0 or len(words) == max_tokens:
            break
    return " ".join(words)


def check_text(text: object, name: str) -> str:
    """Return `text` if it is a non-blank string, else raise ValueError naming `name`."""
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{name} must not be empty")
    return text
