"""pipeline/serving/api.py parse_generate: which subject a request names, and the 400 when it
names none or two."""

import pytest

from pipeline.config import load_config
from pipeline.serving.api import ApiError, parse_generate

CONFIG = load_config(overrides=["profile=tiny"])


@pytest.mark.parametrize("body", [{"prompt": "on the beach"}, {"prompt": "on the beach", "subject": None, "reference_images": None}])
def test_a_request_without_a_subject_is_told_what_to_give(body):
    # It was told "..., not both", as if it had sent two subjects.
    with pytest.raises(ApiError) as caught:
        parse_generate(body, CONFIG)
    assert (caught.value.status, caught.value.field) == (400, "subject")
    assert "not both" not in caught.value.message and "mix" in caught.value.message


def test_a_request_with_two_subjects_is_told_not_both():
    with pytest.raises(ApiError, match="not both"):
        parse_generate({"prompt": "x", "subject": "models:/a@b", "reference_images": ["QUJD"], "category": "dog"}, CONFIG)
