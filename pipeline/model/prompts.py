"""Prompt text as BLIP-Diffusion builds it (LAVIS `_build_prompt`, diffusers 0.33 pipeline)."""

from __future__ import annotations

# The negative prompt used with the released model in the reference examples (LAVIS notebooks and
# the diffusers 0.33 BlipDiffusionPipeline docstring). diffusers' `__call__` itself defaults to "".
DEFAULT_NEGATIVE_PROMPT = (
    "over-exposure, under-exposure, saturated, duplicate, out of frame, lowres, cropped, "
    "worst quality, low quality, jpeg artifacts, morbid, mutilated, out of frame, ugly, "
    "bad anatomy, bad proportions, deformed, blurry, duplicate"
)

# The reference repeats "a <category> <prompt>" this many times (times prompt_strength) to
# amplify the prompt against the 16 subject tokens; the tokenizer then truncates the text to
# the 61 positions left next to the subject tokens.
DEFAULT_PROMPT_REPS = 20

# The subject embeddings go in after "<bos> a", i.e. the prompt reads "a [subject] <category> ...".
CONTEXT_BEGIN_POS = 2


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
    text = f"a {category} {prompt.strip()}"
    return ", ".join([text] * repeats)


def check_text(text: object, name: str) -> str:
    """Return `text` if it is a non-blank string, else raise ValueError naming `name`."""
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{name} must not be empty")
    return text
