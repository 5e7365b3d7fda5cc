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


@pytest.mark.parametrize(
    ("subject", "field"),
    [
        ("models:/x@a@b", "subject.alias"),
        ("models:/x@a b", "subject.alias"),
        ("models:/x@a.b", "subject.alias"),
        ("models:/x@" + "a" * 256, "subject.alias"),
        ({"name": "x", "alias": "a@b"}, "subject.alias"),
        ("models:/x:y@a", "subject.name"),
        ({"name": "x:y", "version": 1}, "subject.name"),
    ],
    ids=["second-at", "space", "dot", "too-long", "object", "colon-in-name", "colon-in-object-name"],
)
def test_an_alias_or_name_the_registry_refuses_is_a_400_naming_it(subject, field):
    # It reached MLflow, whose "Invalid alias name" came back as a 404: no such subject.
    with pytest.raises(ApiError) as caught:
        parse_generate({"prompt": "x", "subject": subject}, CONFIG)
    assert (caught.value.status, caught.value.field) == (400, field)
    assert "MLflow" in caught.value.message and "Invalid alias name" not in caught.value.message


def test_an_alias_in_a_mix_is_checked_as_its_part():
    with pytest.raises(ApiError) as caught:
        parse_generate({"prompt": "x", "mix": [{"subject": "models:/x@champion"}, {"subject": "models:/x@a@b"}]}, CONFIG)
    assert (caught.value.status, caught.value.field) == (400, "mix[1].subject.alias")


@pytest.mark.parametrize("alias", ["champion", "v2-candidate_B", "é"])  # MLflow's \w is Unicode
def test_an_alias_mlflow_accepts_parses(alias):
    parse_generate({"prompt": "x", "subject": f"models:/sub.ject name@{alias}"}, CONFIG)
