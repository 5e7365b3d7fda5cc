import numpy as np
import pytest

from pipeline.config import PROFILE_MODELS
from stages.caption import Captioner, clean_caption
from stages.records import Reject


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
