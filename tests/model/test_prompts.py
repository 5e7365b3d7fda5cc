"""Prompt building: the text is cut to what the tokenizer reads before it is repeated, so an
enormous prompt stays small, and the tokens of every prompt are those of the reference's text."""

import pytest
from transformers import CLIPTokenizer

from pipeline.config import PROFILE_MODELS
from pipeline.model.prompts import DEFAULT_PROMPT_REPS, MAX_PROMPT_TOKENS, TOKEN_CHARS, build_prompt, truncate_prompt

SUBJECT_POSITIONS = MAX_PROMPT_TOKENS - 16  # what the text encoder leaves beside the subject tokens

PROMPTS = [
    "on the beach",
    "  in the jungle ",
    "on top of a purple rug in a forest, oil painting",
    "with the Eiffel Tower in the background!!",
    "on\tthe\nbeach  at   dusk",
    "wearing a santa hat \u00e9t\u00e9 \u65e5\u672c \U0001f600",
    "dog\x1cbeach \x1c\x1d",  # separators Python's \\s knows but the tokenizer keeps as tokens
    " ".join(f"word{i}" for i in range(76)),
    " ".join(f"word{i}" for i in range(77)),
    " ".join(f"w{i}" for i in range(78)),
    " ".join(f"red{i}, blue" for i in range(300)),
    "x" * 5000,  # one word longer than the character budget
]


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(f"{PROFILE_MODELS['tiny']['blip_diffusion']}/tokenizer", local_files_only=True)


def reference_prompt(category, prompt, reps=DEFAULT_PROMPT_REPS):
    """The reference's text (LAVIS `_build_prompt`): the whole prompt, repeated."""
    return ", ".join([f"a {category} {prompt.strip()}"] * reps)


def ids(tokenizer, text, length):
    return tokenizer([text], padding="max_length", truncation=True, max_length=length).input_ids[0]


@pytest.mark.parametrize("prompt", PROMPTS, ids=[f"prompt{i}" for i in range(len(PROMPTS))])
@pytest.mark.parametrize("length", [SUBJECT_POSITIONS, MAX_PROMPT_TOKENS])
def test_tokens_are_those_of_the_reference_text(tokenizer, prompt, length):
    for category in ("dog", "teddy bear"):
        assert ids(tokenizer, build_prompt(category, prompt), length) == ids(tokenizer, reference_prompt(category, prompt), length)


def test_short_prompts_are_unchanged():
    assert build_prompt("dog", " on the beach ", prompt_reps=2) == "a dog on the beach, a dog on the beach"
    assert truncate_prompt("on the beach") == "on the beach"


def test_an_enormous_prompt_is_cut_before_it_is_repeated(tokenizer):
    words = " ".join(["word"] * 200_000)  # 1 MB of prompt
    built = build_prompt("dog", words)
    bound = DEFAULT_PROMPT_REPS * (MAX_PROMPT_TOKENS * (TOKEN_CHARS + 1) + 2)
    assert len(built) <= bound < len(words)
    one_word = build_prompt("dog", "x" * 2**20)
    assert len(one_word) <= bound
    # The model still reads the same tokens (checked on a prompt the reference's way can afford).
    shorter = " ".join(["word"] * 2_000)
    assert ids(tokenizer, build_prompt("dog", shorter), SUBJECT_POSITIONS) == ids(tokenizer, reference_prompt("dog", shorter), SUBJECT_POSITIONS)


def test_truncate_prompt_keeps_words_within_the_budget():
    assert truncate_prompt(" on  the\tbeach ") == "on the beach"
    assert truncate_prompt("a b c d", max_tokens=2) == "a b"
    assert truncate_prompt("abcdef", max_tokens=1) == "abcdef"
    assert len(truncate_prompt("y" * (TOKEN_CHARS + 10), max_tokens=1)) == TOKEN_CHARS
    assert truncate_prompt("\x1c a") == "\x1c a"  # a token for the tokenizer, so a word here


@pytest.mark.parametrize("bad", [None, 5, "", "   "])
def test_a_prompt_that_is_not_text_is_an_error(bad):
    with pytest.raises(ValueError, match="prompt"):
        build_prompt("dog", bad)
