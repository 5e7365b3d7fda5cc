"""Prompt text as BLIP-Diffusion builds it (LAVIS `_build_prompt`, diffusers 0.33 pipeline)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipeline.errors import UserError

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


class PromptError(UserError, ValueError):
    """A prompt whose [subject slots] cannot be drawn as written; the message names the slot."""

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


# A subject slot of a prompt: "a [dog] next to a [cat]" names two subjects, each drawn where
# its name stands. The name is the subject's category word, which stays in the text.
_SLOT = re.compile(r"\[([^\[\]]*)\]")


@dataclass(frozen=True)
class SlotPrompt:
    """A prompt with subject slots, split for the text encoder.

    text: the prompt with the brackets removed ("a dog next to a cat");
    names: each slot's name in order of appearance (("dog", "cat"));
    prefixes: the text before each slot's name ("a ", "a dog next to a "), whose token count
    is where that subject's embeddings go.
    """

    text: str
    names: tuple[str, ...]
    prefixes: tuple[str, ...]


def has_subject_slots(prompt: str) -> bool:
    """Whether `prompt` names subjects in brackets ("a [dog] next to a [cat]")."""
    return bool(_SLOT.search(prompt))


def split_subject_slots(prompt: str) -> SlotPrompt:
    """`prompt` with [name] slots as a SlotPrompt. PromptError for an empty or nested slot, or
    a bracket left open.

    >>> split_subject_slots(" a [dog] next to a [cat] ")
    SlotPrompt(text='a dog next to a cat', names=('dog', 'cat'), prefixes=('a ', 'a dog next to a '))
    """
    check_text(prompt, "prompt")
    text, names, prefixes, end = "", [], [], 0
    source = " ".join(_WORD.findall(prompt))  # one space between words, as the tokenizer reads them
    for match in _SLOT.finditer(source):
        name = " ".join(match.group(1).split())
        if not name:
            raise PromptError(f"prompt {source[:80]!r}: an empty subject slot []")
        text += source[end : match.start()]
        prefixes.append(text)
        names.append(name)
        text += name
        end = match.end()
    text += source[end:]
    if "[" in text or "]" in text:
        raise PromptError(f"prompt {source[:80]!r}: a bracket that does not close one subject slot [name]")
    if not names:
        raise PromptError(f"prompt {source[:80]!r} has no subject slot [name]")
    return SlotPrompt(text, tuple(names), tuple(prefixes))


def build_slot_prompt(slots: SlotPrompt, prompt_strength: float = 1.0, prompt_reps: int = DEFAULT_PROMPT_REPS) -> str:
    """The reference's repetition of a prompt with slots: its text joined with ", " `strength
    * reps` times. Only the first copy carries the subjects (their embeddings take Q positions
    each), so the slots' prefixes are prefixes of the result.

    >>> build_slot_prompt(split_subject_slots("a [dog] and a [cat]"), prompt_reps=2)
    'a dog and a cat, a dog and a cat'
    """
    repeats = int(prompt_strength * prompt_reps)
    if repeats < 1:
        raise ValueError(f"prompt_strength * prompt_reps must be >= 1, got {prompt_strength} * {prompt_reps}")
    return ", ".join([truncate_prompt(slots.text)] * repeats)


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
