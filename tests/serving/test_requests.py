"""Requests checked against `serve.limits`: each bad field is a RequestError naming it, before
any model work; a model server's DataFrame rows come back as the JSON values that were sent."""

import numpy as np
import pandas as pd
import pytest

from pipeline.config import ConfigError, GenerateConfig, ServeLimits, load_config
from pipeline.serving.requests import (
    FIELDS,
    GenerationRequest,
    RequestError,
    check_unicode,
    records_from_frame,
    validate_request,
    validate_requests,
)

LIMITS = ServeLimits()


def test_defaults_fill_what_is_missing_or_null():
    request = validate_request({"prompt": "on the beach", "seed": None}, LIMITS)
    defaults = GenerateConfig()
    assert request == GenerationRequest(
        prompt="on the beach", num_images=1, seed=defaults.seed, steps=defaults.steps, guidance_scale=defaults.guidance_scale,
        negative_prompt=None, height=None, width=None,
    )
    full = {"prompt": "p", "negative_prompt": "", "num_images": 8, "seed": 2**32 - 1, "guidance_scale": 7, "steps": 150, "height": 1024, "width": 64}
    assert validate_request(full, LIMITS) == GenerationRequest("p", 8, 2**32 - 1, 150, 7.0, "", 1024, 64)
    assert set(full) == set(FIELDS)


@pytest.mark.parametrize("row, field, words", [
    ({"prompt": "x", "steps": 100_000}, "steps", "1..150, got 100000"),
    ({"prompt": "x", "steps": 0}, "steps", "1..150, got 0"),
    ({"prompt": "x", "num_images": 10_000}, "num_images", "1..8"),
    ({"prompt": "x", "num_images": 0}, "num_images", "1..8"),
    ({"prompt": "x", "num_images": -1}, "num_images", "1..8"),
    ({"prompt": "x" * 2**20}, "prompt", "1048576 characters; at most 2000"),
    ({"prompt": "x", "negative_prompt": "n" * 2001}, "negative_prompt", "at most 2000"),
    ({"prompt": None}, "prompt", "must be a string, got null"),
    ({}, "prompt", "is required"),
    ({"prompt": 5}, "prompt", "got integer"),
    ({"prompt": "  "}, "prompt", "must not be empty"),
    ({"prompt": "x", "negative_prompt": 3.5}, "negative_prompt", "got number"),
    ({"prompt": "x", "seed": "5"}, "seed", "got string '5'"),
    ({"prompt": "x", "seed": 1.5}, "seed", "got number 1.5"),
    ({"prompt": "x", "seed": 2.0}, "seed", "got number"),
    ({"prompt": "x", "seed": True}, "seed", "got boolean"),
    ({"prompt": "x", "seed": -1}, "seed", "0..4294967295"),
    ({"prompt": "x", "seed": 2**32}, "seed", "0..4294967295"),
    ({"prompt": "x", "steps": [5]}, "steps", "got array"),
    ({"prompt": "x", "guidance_scale": "7"}, "guidance_scale", "got string"),
    ({"prompt": "x", "guidance_scale": float("inf")}, "guidance_scale", "0..30"),
    ({"prompt": "x", "guidance_scale": float("nan")}, "guidance_scale", "0..30"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale", "0..30"),
    ({"prompt": "x", "height": 60}, "height", "multiple of 8"),
    ({"prompt": "x", "width": 2048}, "width", "8..1024"),
    ({"prompt": "x", "width": 0}, "width", "8..1024"),
    ({"prompt": "x", "step": 5}, "'step'", "unknown field;"),
    ({"prompt": "x", "a": 1, "b": 2}, "'a', 'b'", "unknown fields"),
])
def test_each_bad_field_is_named(row, field, words):
    with pytest.raises(RequestError) as caught:
        validate_request(row, LIMITS)
    assert caught.value.field == field and words in caught.value.message


def test_messages_stay_short_whatever_was_sent():
    with pytest.raises(RequestError) as caught:
        validate_request({"prompt": "x", **{f"k{'y' * 1000}{i}": 1 for i in range(10_000)}}, LIMITS)
    assert "and 9995 more" in str(caught.value) and len(str(caught.value)) < 1000
    with pytest.raises(RequestError) as caught:
        validate_request({"prompt": "x", "seed": "9" * 10_000}, LIMITS)
    assert len(str(caught.value)) < 300
    with pytest.raises(RequestError) as caught:
        validate_request({"prompt": "x", "seed": [[0] * 1000] * 1000}, LIMITS)
    assert "got array [[0, 0, " in str(caught.value) and "(1000 items)" in str(caught.value) and len(str(caught.value)) < 300


def test_a_request_is_an_object():
    with pytest.raises(RequestError, match="request: must be an object of fields, got array"):
        validate_request(["x"], LIMITS)


@pytest.mark.parametrize("value, field", [
    ({"prompt": "\ud800"}, "prompt"),
    ({"\ud800": 1}, "request"),
    ({"mix": [{"weight": 1}, {"category": "d\ud800g"}]}, "mix[1].category"),
    ({"mix": [{"subject": {"name": "\udfff"}}]}, "mix[0].subject.name"),
    ({"seed": [0, ["\ud800"]]}, "seed[1][0]"),
    ({"seed": np.int64(3), "prompt": "\ud800"}, "prompt"),  # a DataFrame row's scalar, which json cannot write
])
def test_a_string_that_is_not_text_is_named_by_its_place(value, field):
    with pytest.raises(RequestError) as caught:
        check_unicode(value)
    assert caught.value.field == field
    check_unicode({"seed": np.int64(3), "prompt": "on the beach", "mix": [{"category": "dog"}]})  # all text


def test_checking_the_text_of_a_request_holds_nothing_per_item():
    """A 30 MB body of `"seed": [0, 0, ...]`, within serve.max_request_mb, held 2 GB and 17 s of
    a replica's CPU when every item's field name was made before it was looked at; a base64
    photo is looked at without a copy."""
    import tracemalloc

    value = {"prompt": "x", "seed": [0] * 200_000, "mix": [""] * 200_000, "reference_images": ["QUJD" * 500_000]}
    tracemalloc.start()
    try:
        check_unicode(value)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**16, f"{peak} bytes at the peak"


def test_configured_limits_and_defaults_apply():
    limits = load_config(overrides=["serve.limits.max_steps=20", "serve.limits.max_prompt_chars=5"]).serve.limits
    with pytest.raises(RequestError, match="steps: must be 1..20, got 21"):
        validate_request({"prompt": "x", "steps": 21}, limits)
    with pytest.raises(RequestError, match=r"at most 5"):
        validate_request({"prompt": "xxxxxx"}, limits)
    # A default beyond the limits is refused too, and the message says it was the default.
    with pytest.raises(RequestError, match=r"got 50 \(the configured default\)"):
        validate_request({"prompt": "x"}, limits)
    assert validate_request({"prompt": "x"}, limits, GenerateConfig(steps=20)).steps == 20


@pytest.mark.parametrize("override, key", [
    ("serve.limits.max_num_images=0", "serve.limits.max_num_images"),
    ("serve.limits.max_size=1001", "serve.limits.max_size"),
    ("serve.limits.max_seed=-1", "serve.limits.max_seed"),
    ("serve.limits.max_step=3", "serve.limits.max_step"),
])
def test_bad_limits_are_config_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


def test_rows_together_stay_within_the_image_limit():
    assert len(validate_requests([{"prompt": "a", "num_images": 4}, {"prompt": "b", "num_images": 4}], LIMITS)) == 2
    with pytest.raises(RequestError, match="num_images: 9 images in all; at most 8"):
        validate_requests([{"prompt": "a", "num_images": 8}, {"prompt": "b"}], LIMITS)
    with pytest.raises(RequestError, match="num_images: 10000 prompts"):
        validate_requests([{"prompt": "a"}] * 10_000, LIMITS)
    with pytest.raises(RequestError, match=r"steps: must be 1..150, got 151 \(row 1\)"):
        validate_requests([{"prompt": "a"}, {"prompt": "b", "steps": 151}], LIMITS)
    with pytest.raises(RequestError, match="request: holds no prompts"):
        validate_requests([], LIMITS)


def test_frame_rows_are_the_values_that_were_sent():
    # What `mlflow models serve` makes of {"dataframe_records": [...]} (pd.DataFrame(records)).
    frame = pd.DataFrame([{"prompt": "a", "seed": 5, "guidance_scale": 2.0}, {"prompt": "b", "steps": 3}])
    rows = records_from_frame(frame)
    assert rows[0] == {"prompt": "a", "seed": 5, "guidance_scale": 2.0, "steps": None}
    assert rows[1] == {"prompt": "b", "seed": None, "guidance_scale": None, "steps": 3}
    assert type(rows[0]["seed"]) is int and type(rows[1]["steps"]) is int
    assert [r.seed for r in validate_requests(rows, LIMITS)] == [5, GenerateConfig().seed]
    # A float or a string stays what it was, so the check refuses it.
    assert records_from_frame(pd.DataFrame([{"prompt": "a", "seed": 1.5}, {"prompt": "b"}]))[0]["seed"] == 1.5
    assert records_from_frame(pd.DataFrame([{"prompt": "a", "seed": "abc"}, {"prompt": "b", "seed": 3}]))[0]["seed"] == "abc"
    assert records_from_frame(pd.DataFrame([{"prompt": "a", "seed": True}]))[0]["seed"] is True
    assert records_from_frame(pd.DataFrame([{"prompt": None}])) == [{"prompt": None}]
    assert records_from_frame([{"prompt": "a"}]) == [{"prompt": "a"}]
    assert records_from_frame({"prompt": "a"}) == [{"prompt": "a"}]
    with pytest.raises(RequestError, match="request: must be a table of prompts"):
        records_from_frame(42)


@pytest.mark.parametrize("flags, words", [
    (["-n", "9"], "-n: must be 1..8, got 9 (the limit is serve.limits.max_num_images)"),
    (["-n", "0"], "-n: must be 1..8, got 0"),
    (["--steps", "151"], "--steps: must be 1..150, got 151"),
    (["--seed", str(2**32)], "--seed: must be 0..4294967295"),
    (["--prompt", "x" * 2001], "--prompt: has 2001 characters"),
    (["--height", "1032"], "--height: must be 8..1024"),
    (["--model", "models:/subjectforge-dog@champion", "--steps", "151"], "--steps: must be 1..150"),
])
def test_generate_refuses_what_a_model_server_refuses_before_loading_a_model(tmp_path, capsys, flags, words):
    from pipeline.cli import main

    argv = ["generate", "--profile", "tiny", "--prompt", "on the beach", "--category", "dog", "--out", str(tmp_path / "o")]
    argv += ["--subject-image", str(tmp_path / "missing.png"), "--set", f"tracking.uri=http://127.0.0.1:9/{tmp_path.name}", *flags]
    assert main(argv) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # The limits are config keys: raised, the same flags pass the check (and fail later, on the missing photo).
    if "--steps" in flags and "--model" not in flags:
        assert main([*argv, "--set", "serve.limits.max_steps=200"]) == 2
        assert "missing.png" in capsys.readouterr().err
