"""A model server's input rows (the subject pyfunc's columns): each row's request fields
(requests.py), its control columns (controls.py) and its edit columns (edits.py), all checked
before any image is made."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.config import DecodeConfig, ServeLimits
from pipeline.serving.controls import CONTROL_FIELDS, ControlRequest, validate_control
from pipeline.serving.edits import EDIT_FIELDS, EditRequest, validate_edit
from pipeline.serving.requests import GenerationRequest, RequestError, validate_requests

Row = tuple[GenerationRequest, ControlRequest | None, EditRequest | None]


def validate_rows(rows: list[Any], limits: ServeLimits, decode: DecodeConfig) -> list[Row]:
    """Each row as (request, control or None, edit or None). The RequestError of a bad control
    or edit says which row (from 0); a row may not have both."""
    extra = (*CONTROL_FIELDS, *EDIT_FIELDS)
    plain = [{k: v for k, v in row.items() if k not in extra} if isinstance(row, Mapping) else row for row in rows]
    requests = validate_requests(plain, limits)  # a row that is not an object is refused here
    checked = []
    for index, (row, request) in enumerate(zip(rows, requests, strict=True)):
        try:
            control, edit = validate_control(row, decode), validate_edit(row, request, decode)
            if control is not None and edit is not None:
                raise RequestError(CONTROL_FIELDS[0], "cannot be combined with an edit (replace)")
        except RequestError as exc:
            raise RequestError(exc.field, f"{exc.message} (row {index})", exc.limit) from None
        checked.append((request, control, edit))
    return checked
