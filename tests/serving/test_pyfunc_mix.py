"""The subject pyfunc's `mix` column (pipeline/serving/rows.py, tracking.SubjectPyfunc), tiny
profile: the model's own subject mixed with itself draws the subject, a mix with reference
photos draws something else, and bad mixes are refused naming the field and row before any
image is made."""

from __future__ import annotations

import base64
import io
import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from pipeline import tracking
from pipeline.config import DecodeConfig, ServeLimits
from pipeline.serving.requests import RequestError
from pipeline.serving.rows import validate_rows
from pipeline.serving.subjects import OwnSubject, ZeroShotSubject
from tests.serve_subjects import fail_first_call, make_subject


def _png_b64(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


ROW = {"prompt": "on the beach", "steps": 2, "seed": 4}
CAT = {"reference_images": [_png_b64((30, 160, 220))], "category": "cat"}


@pytest.fixture(scope="module")
def pyfunc(tmp_path_factory):
    """A LoRA subject: its mixes are drawn by its own UNet, adapters and all."""
    folder = make_subject(tmp_path_factory.mktemp("pyfunc-mix") / "rex", "lora", 7)
    model = tracking.SubjectPyfunc()
    model.load_context(SimpleNamespace(artifacts={tracking.SUBJECT_ARTIFACT: str(folder)}, model_config={}))
    return model


def test_the_own_subject_mixed_with_itself_draws_the_subject(pyfunc):
    row = {**ROW, "height": 32, "width": 32}
    frame = pd.DataFrame([row, {**row, "mix": [{"weight": 0.5}, {"weight": 0.5}]}, {**row, "mix": [{"weight": 0.5}, {**CAT, "weight": 0.5}]}])
    alone, same, mixed = pyfunc.predict(None, frame)["image"].tolist()
    assert same == alone and mixed != alone


def test_mix_parts_are_the_own_subject_or_reference_photos():
    [row] = validate_rows([{**ROW, "mix": [{"weight": 2}, {**CAT, "weight": 1}]}], ServeLimits(), DecodeConfig())
    own, photos = row.mix.parts
    assert isinstance(own, OwnSubject) and isinstance(photos, ZeroShotSubject) and photos.category == "cat"
    assert row.mix.weights == (2.0, 1.0) and row.request.prompt == ROW["prompt"]
    [as_text] = validate_rows([{**ROW, "mix": json.dumps([{"weight": 2}, {**CAT, "weight": 1}])}], ServeLimits(), DecodeConfig())
    assert as_text.mix.weights == row.mix.weights and as_text.mix.parts[1].category == "cat"


@pytest.mark.parametrize("mix, words", [
    ([], "mix: must be a list of 1..4 weighted subjects (row 1)"),
    ([{"weight": 1}] * 5, "mix: must be a list of 1..4"),
    ("[{\"weight\": 1", "mix: must be a list of weighted subjects, or its JSON text"),
    ([{"weight": 0.5}, {**CAT, "weight": -0.5}], "mix: the weights must add up to a positive number"),
    ([{"weight": "lots"}], "mix[0].weight: must be a finite number"),
    ([{"subject": "models:/subjectforge-cat@champion", "weight": 1}], "mix[0].subject: this model cannot fetch registered subjects"),
    ([{"category": "cat", "weight": 1}], "mix[0].category: goes with reference_images"),
    ([{"reference_images": ["not base64!"], "category": "cat"}], "mix[0].reference_images[0]: is not valid base64"),
    ([{"reference_images": [CAT["reference_images"][0]] * 7, "category": "cat"}], "mix[0].reference_images: must be a list of 1..6"),
    ([{"weight": 1, "wieght": 1}], "mix[0].wieght: unknown field"),
    pytest.param('[{"weight": ' + "9" * 5000 + "}]", "mix: must be a list of weighted subjects, or its JSON text",
                 id="5000-digit-weight"),  # more digits than json.loads converts: a ValueError
    ([{"weight": 1e308}, {**CAT, "weight": 1e308}], "mix: the weights must add up to a positive number"),  # inf
    ([{"reference_images": ["data:image/png;base64"], "category": "cat"}], "mix[0].reference_images[0]: is empty"),
    ([{**CAT, "category": "c\ud800t"}], "mix[0].category: is not valid Unicode text"),  # a lone surrogate
    # The same as the JSON text of a table cell: its escape became the surrogate after the row's text was checked.
    pytest.param(json.dumps([{**CAT, "category": "c\ud800t"}]), "mix[0].category: is not valid Unicode text", id="surrogate-in-mix-text"),
    pytest.param([{"weight": 10**400}], "mix[0].weight: must be a finite number", id="weight-10**400"),  # past float's range
])
def test_a_bad_mix_names_the_field_and_row(mix, words):
    with pytest.raises(RequestError) as caught:
        validate_rows([ROW, {**ROW, "mix": mix}], ServeLimits(), DecodeConfig())
    assert words in str(caught.value) and "(row 1)" in str(caught.value)


@pytest.mark.parametrize("method, embeds, ti_property", [
    ("textual-inversion", torch.zeros(1, 1, 32), "object"),  # its learned word [S], not Q subject embeddings
    ("dreambooth", None, None),
])
def test_a_subject_without_subject_embeddings_cannot_be_mixed(method, embeds, ti_property):
    model = object.__new__(tracking.SubjectPyfunc)
    model.limits = ServeLimits()
    model.subject = SimpleNamespace(subject_embeds=embeds, spec=SimpleNamespace(method=method, ti_property=ti_property))
    with pytest.raises(MlflowException, match=rf"mix: a {method} subject has no subject embeddings to mix.*\(row 1\)"):
        model.predict(None, pd.DataFrame([ROW, {**ROW, "mix": [{"weight": 1}]}]))


def test_the_photos_of_all_rows_together_stay_within_max_request_pixels():
    """Counted from the headers before any photo is decoded: each 49 MP photo is within
    data.decode.max_pixels, 4 together are past serve.limits.max_request_pixels (150 MP)."""
    from tests.imagefiles import png_header_only

    photo = base64.b64encode(png_header_only(7000, 7000)).decode()
    rows = [{**ROW, "control_image": photo}, {**ROW, "mix": json.dumps([{"reference_images": [photo] * 3, "category": "cat"}])}]
    with pytest.raises(RequestError) as caught:
        validate_rows(rows, ServeLimits(), DecodeConfig())
    assert "mix[0].reference_images[2]:" in str(caught.value) and "max_request_pixels" in str(caught.value)
    assert "(row 1)" in str(caught.value)


def test_out_of_memory_is_a_503_without_a_stack_trace_and_the_next_request_is_drawn(pyfunc, monkeypatch):
    """MLflow's scoring server answers any other exception from predict as a 400 blaming the
    input, with the stack trace in the body."""
    fail_first_call(monkeypatch, pyfunc.subject.model, "_denoise", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    row = {**ROW, "height": 32, "width": 32}
    with pytest.raises(MlflowException, match="out of memory") as caught:
        pyfunc.predict(None, pd.DataFrame([row]))
    assert caught.value.get_http_status_code() == 503 and "stack_trace" not in caught.value.json_kwargs
    assert len(pyfunc.predict(None, pd.DataFrame([row]))) == 1
