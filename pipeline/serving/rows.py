"""A model server's input rows (the subject pyfunc's columns): each row's request fields
(requests.py), its control columns (controls.py), its edit columns (edits.py) and its subject
mix (subjects.py parse_mix, with the model's own subject as a part), all checked before any
image is made."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from pipeline.config import DecodeConfig, ServeConfig, ServeLimits
from pipeline.serving.controls import CONTROL_FIELDS, ControlRequest, validate_control
from pipeline.serving.edits import EDIT_FIELDS, EditRequest, validate_edit
from pipeline.serving.photos import count_photo_pixels
from pipeline.serving.requests import FIELDS, GenerationRequest, RequestError, check_unicode, validate_requests
from pipeline.serving.subjects import MIX_FIELD, MixedSubject, parse_mix


class Row(NamedTuple):
    """One checked row: its request, and its control, edit and mix when it has them."""

    request: GenerationRequest
    control: ControlRequest | None
    edit: EditRequest | None
    mix: MixedSubject | None


def validate_rows(rows: list[Any], limits: ServeLimits, decode: DecodeConfig, max_reference_images: int | None = None) -> list[Row]:
    """Each row as a Row. The RequestError of a bad control, edit or mix says which row (from
    0); a row may not have both a control and an edit, and the photos of all rows together stay
    within `limits.max_request_pixels` (photos.py). `max_reference_images` bounds the photos
    of each mix part (default: serve.max_reference_images' default)."""
    if max_reference_images is None:
        max_reference_images = ServeConfig().max_reference_images
    # A row that is not an object, or has a column none of these read, is refused here.
    requests = validate_requests(rows, limits, fields=(*FIELDS, *CONTROL_FIELDS, *EDIT_FIELDS, MIX_FIELD))
    parsed, pixels = [], 0
    for index, row in enumerate(rows):  # every row's photos are counted before any is decoded
        try:
            row = {**row, MIX_FIELD: None if row.get(MIX_FIELD) is None else _json_list(row[MIX_FIELD])}
            check_unicode(row)  # after the mix's JSON text is read: its escapes may write a lone surrogate
            pixels = count_photo_pixels(row, decode, limits.max_request_pixels, pixels)
        except RequestError as exc:
            raise _in_row(exc, index) from None
        parsed.append(row)
    checked = []
    for index, (row, request) in enumerate(zip(parsed, requests, strict=True)):
        try:
            control, edit = validate_control(row, decode), validate_edit(row, request, decode)
            if control is not None and edit is not None:
                raise RequestError(CONTROL_FIELDS[0], "cannot be combined with an edit (replace)")
            mix = None if row[MIX_FIELD] is None else parse_mix(row[MIX_FIELD], decode, max_reference_images, own=True)
        except RequestError as exc:
            raise _in_row(exc, index) from None
        checked.append(Row(request, control, edit, mix))
    return checked


def _in_row(exc: RequestError, index: int) -> RequestError:
    return RequestError(exc.field, f"{exc.message} (row {index})", exc.limit)


def _json_list(value: Any) -> Any:
    """A mix column's value: a list as JSON gives it, or its JSON text (a table cell of a
    CSV or a DataFrame built from strings)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError):  # JSONDecodeError, or an integer of more digits than int() converts
        raise RequestError(MIX_FIELD, "must be a list of weighted subjects, or its JSON text; got text that is not JSON") from None
