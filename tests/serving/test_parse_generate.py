"""pipeline/serving/api.py parse_generate: which subject a request names, and the 400 when it
names none or two."""

import base64
import json

import pytest

from pipeline.config import load_config
from pipeline.serving.api import ApiError, json_items_limit, parse_generate, read_json
from pipeline.serving.requests import RequestError
from pipeline.serving.slots import match_slots
from tests.imagefiles import jpeg_bytes, photo

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


PHOTO = base64.b64encode(jpeg_bytes(photo(1, (64, 64)))).decode()


def _mixed(weights, categories=None, prompt="on the beach"):
    """The parsed call of a request mixing zero-shot subjects of one photo with `weights`."""
    categories = categories or ["dog"] * len(weights)
    mix = [{"reference_images": [PHOTO], "category": c, "weight": w} for w, c in zip(weights, categories, strict=True)]
    return parse_generate({"prompt": prompt, "mix": mix}, CONFIG)


@pytest.mark.parametrize("weights", [[1e300, -1e300, 1], [1e39, -1e39, 1], [1, -0.99]])
def test_mix_weights_that_scale_a_subject_far_past_the_sum_are_a_400(weights):
    # [1e300, -1e300, 1] add up to 1: mix_subjects scaled the first subject by 1e300 (inf in
    # float32), inf - inf made a NaN subject, and the answer was a 200 with a black image.
    with pytest.raises(ApiError) as caught:
        _mixed(weights)
    assert (caught.value.status, caught.value.field) == (400, "mix")
    assert "times" in caught.value.message


@pytest.mark.parametrize("weights", [[0.7, 0.3], [7, 3], [2, -1], [1e-300], [1e300, 1e300]])
def test_mix_weights_within_the_scale_parse(weights):
    assert _mixed(weights).subject.weights == tuple(float(w) for w in weights)


def test_the_weights_of_one_slot_are_held_to_the_scale_too():
    # Together the parts add up to 1.1, but the [cat] slot's add up to 0.1, 50 times smaller than its first part.
    call = _mixed([1, 5, -4.9], ["dog", "cat", "cat"], prompt="a [dog] and a [cat]")
    with pytest.raises(RequestError) as caught:
        match_slots(call.request.prompt, call.subject)
    assert caught.value.field == "mix" and "[cat]" in caught.value.message


def test_a_body_of_more_values_than_a_request_holds_is_refused_before_it_is_parsed():
    limit = json_items_limit(CONFIG.serve.limits)
    body = b'{"prompt": "x", "seed": [' + b"0," * limit + b"0]}"
    with pytest.raises(ApiError) as caught:
        read_json(body, len(body), limit)
    assert (caught.value.status, caught.value.field) == (400, "request") and "commas and brackets" in caught.value.message
    # Prompts of nothing but commas and brackets, as long as the limits let them be, still make a request.
    prompt = "[,]" * (CONFIG.serve.limits.max_prompt_chars // 3)
    mix = [{"reference_images": [PHOTO] * 6, "category": "dog", "weight": 1}] * 4
    body = json.dumps({"prompt": prompt, "negative_prompt": prompt, "mix": mix, "seed": 1}).encode()
    assert read_json(body, len(body), limit)["prompt"] == prompt


@pytest.mark.parametrize("subject", ["models:/subjectforge-dog/0", "models:/subjectforge-dog/000", {"name": "subjectforge-dog", "version": 0}])
def test_version_0_is_a_400_as_the_message_says(subject):
    # "must be a version number 1..2147483647" let 0 through, to the registry.
    with pytest.raises(ApiError) as caught:
        parse_generate({"prompt": "x", "subject": subject}, CONFIG)
    assert (caught.value.status, caught.value.field) == (400, "subject.version")
