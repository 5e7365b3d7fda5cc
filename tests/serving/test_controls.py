"""Control and edit fields of requests from outside (pipeline/serving/controls.py, edits.py,
rows.py) and the subject pyfunc's columns, tiny profile: a row with a control_image is drawn
steered, scale 0 draws what the row without it draws, a row with `replace` is an edit, and bad
columns are refused naming the field and row."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from pipeline import tracking
from pipeline.config import PROFILE_CONTROLNETS, DecodeConfig, ServeLimits
from pipeline.serving.requests import RequestError
from pipeline.serving.rows import validate_rows
from tests.serve_subjects import make_subject


def _png_b64(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


EDGES = Image.new("RGB", (48, 48), (10, 10, 10))
EDGES.paste((255, 255, 255), (12, 12, 36, 36))
ROW = {"prompt": "on the beach", "steps": 2, "seed": 1}


def test_rows_split_into_requests_and_controls():
    [(plain, none, *_), (steered, control, *_)] = validate_rows([ROW, {**ROW, "control_image": _png_b64(EDGES)}],
                                                         ServeLimits(), DecodeConfig())
    assert plain == steered and none is None
    assert (control.kind, control.scale, control.image.size) == ("canny", 1.0, (48, 48))
    with pytest.raises(RequestError, match=r"control_scale: .*\(row 1\)"):
        validate_rows([ROW, {**ROW, "control_image": _png_b64(EDGES), "control_scale": -1}], ServeLimits(), DecodeConfig())
    with pytest.raises(RequestError, match="control: goes with control_image"):
        validate_rows([{**ROW, "control": "canny"}], ServeLimits(), DecodeConfig())


def test_an_unknown_column_is_refused_naming_every_column_a_row_takes():
    with pytest.raises(RequestError) as caught:
        validate_rows([ROW, {**ROW, "contol_image": _png_b64(EDGES)}], ServeLimits(), DecodeConfig())
    assert caught.value.field == "'contol_image'" and caught.value.message.endswith("(row 1)")
    for column in ("steps", "control_image", "control_end", "replace", "edit_image", "mix"):
        assert column in caught.value.message


@pytest.mark.parametrize("window, match", [
    ({"control_start": 0.6, "control_end": 0.3}, r"control_start: the window needs control_start < control_end, got 0.6 and 0.3 \(row 0\)"),
    ({"control_start": 0.5, "control_end": 0.5}, r"control_start: the window needs .* got 0.5 and 0.5"),
    ({"control_end": 0.0}, r"control_end: the window needs control_start < control_end, got 0 and 0"),
    ({"control_end": 1.5}, r"control_end: must be a number 0..1 \(a fraction of the steps\), got 1.5"),
    ({"control_start": -0.1}, r"control_start: must be a number 0..1"),
    ({"control_start": float("inf")}, r"control_start: must be a number 0..1"),
    ({"control_start": True}, r"control_start: must be a number 0..1"),
    ({"control_end": "0.5"}, r"control_end: must be a number 0..1"),
])
def test_a_bad_control_window_names_its_field(window, match):
    with pytest.raises(RequestError, match=match):
        validate_rows([{**ROW, "control_image": _png_b64(EDGES), **window}], ServeLimits(), DecodeConfig())


def test_a_control_window_is_read_and_defaults_to_every_step():
    rows = [{**ROW, "control_image": _png_b64(EDGES)}, {**ROW, "control_image": _png_b64(EDGES), "control_start": 0.25},
            {**ROW, "control_image": _png_b64(EDGES), "control_start": 0, "control_end": 0.5}]
    windows = [(row.control.start, row.control.end) for row in validate_rows(rows, ServeLimits(), DecodeConfig())]
    assert windows == [(0.0, 1.0), (0.25, 1.0), (0.0, 0.5)]
    with pytest.raises(RequestError, match="control_end: goes with control_image"):
        validate_rows([{**ROW, "control_end": 0.5}], ServeLimits(), DecodeConfig())


@pytest.fixture(scope="module")
def pyfunc(tmp_path_factory):
    folder = make_subject(tmp_path_factory.mktemp("pyfunc") / "rex", "textual-inversion", 5)
    model = tracking.SubjectPyfunc()
    model.load_context(SimpleNamespace(artifacts={tracking.SUBJECT_ARTIFACT: str(folder)},
                                       model_config={tracking.CONTROLNET_CONFIG_KEY: PROFILE_CONTROLNETS["tiny"]["canny"]}))
    return model


STEERED = {**ROW, "control_image": _png_b64(EDGES)}


@pytest.fixture(scope="module")
def control_images(pyfunc):
    """The pyfunc's images of one frame: a plain row, a steered one, one steered at scale 0 and
    two steered in a window. The pyfunc draws each row on its own, so the tests below share the
    plain and steered rows' draws."""
    frame = pd.DataFrame([ROW, STEERED, {**STEERED, "control": "map", "control_scale": 0.0},
                          {**STEERED, "control_end": 0.3}, {**STEERED, "control_end": 0.6}])
    return pyfunc.predict(None, frame)["image"].tolist()


def test_the_pyfunc_draws_rows_with_a_control_image(control_images):
    images = control_images
    assert len(images) == 5 and images[1] != images[0] and images[2] == images[0]


def test_the_pyfunc_steers_the_steps_of_a_rows_window(control_images):
    """2 steps are 3 UNet calls: control_end 0.3 keeps none of them (the plain image), 0.6 the
    first one (an image of its own). Rows without the columns steer every step."""
    plain, full, _, none, first = control_images
    assert none == plain and first not in (plain, full) and full != plain


def test_the_pyfunc_refuses_a_bad_control_column(pyfunc):
    with pytest.raises(MlflowException, match=r"control_image: is not valid base64 \(row 0\)"):
        pyfunc.predict(None, pd.DataFrame([{**ROW, "control_image": "not base64!"}]))


def test_the_pyfunc_edits_a_row_with_replace(pyfunc):
    from pipeline.config import EditConfig
    from pipeline.model.editing import edit

    row = {"prompt": "a dog on the grass", "steps": 2, "seed": 3, "replace": "dog"}
    [image] = pyfunc.predict(None, pd.DataFrame([row]))["image"].tolist()
    subject, settings = pyfunc.subject, EditConfig()
    expected = edit(subject.model, row["prompt"], "dog", subject_embeds=subject.subject_embeds, category=subject.spec.category,
                    steps=2, seed=3, height=subject.spec.resolution, width=subject.spec.resolution, progress=False,
                    cross_replace_steps=settings.cross_replace_steps, self_replace_steps=settings.self_replace_steps,
                    threshold=settings.threshold).edited
    assert image == _png_b64(expected)


@pytest.mark.parametrize("fields, words", [
    ({"replace": "cat"}, "replace: 'cat' is not a word of the prompt (row 0)"),
    ({"edit_image": _png_b64(EDGES)}, "edit_image: goes with replace"),
    ({"replace": "dog", "num_images": 2}, "num_images: an edit makes one image"),
    ({"replace": "dog", "control_image": _png_b64(EDGES)}, "control_image: cannot be combined with an edit"),
    ({"replace": "dog", "edit_image": "not base64!"}, "edit_image: is not valid base64"),
    ({"replace": "dog", "edit_image": "data:image/png;base64"}, "edit_image: is empty"),  # a data: URL without its data
])
def test_bad_edit_columns_are_refused(fields, words):
    with pytest.raises(RequestError) as caught:
        validate_rows([{"prompt": "a dog on the grass", **fields}], ServeLimits(), DecodeConfig())
    assert words in str(caught.value)


def test_the_pyfunc_refuses_a_replaced_word_past_the_tokens_the_text_encoder_reads(pyfunc):
    row = {"prompt": "on the beach " * 40 + "a dog", "steps": 2, "replace": "dog"}
    with pytest.raises(MlflowException, match=r"replace: .*too far into the prompt.*\(row 1\)") as caught:
        pyfunc.predict(None, pd.DataFrame([ROW, row]))
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
