"""The photos of one request from outside, together: reference photos (of the request and of
each mix part), the control image and the photo to edit. Each alone is within the dataset's
decode limits (subjects.decode_photo); together their pixels, read from the headers before any
is decoded, stay within serve.limits.max_request_pixels, because a decoded photo holds 3 bytes
a pixel and more while it is decoded: 24 solid-colour photos of 60 MP each are a 6 MB request
body that made a replica hold 7 GB."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.config import DecodeConfig
from pipeline.serving.controls import IMAGE_FIELD
from pipeline.serving.edits import EDIT_IMAGE_FIELD
from pipeline.serving.requests import RequestError
from pipeline.serving.subjects import MIX_FIELD, REFERENCE_FIELD, header_pixels, photo_bytes


def count_photo_pixels(row: Mapping[str, Any], decode: DecodeConfig, limit: int, counted: int = 0) -> int:
    """`counted` plus the pixels of request `row`'s photos (its mix a list, as parsed). RequestError
    naming the photo that takes the count past `limit` (serve.limits.max_request_pixels), or a
    photo that is not base64."""
    for field, value in _photos(row):
        counted += header_pixels(photo_bytes(value, field, decode))
        if counted > limit:
            raise RequestError(field, f"the request's photos claim {counted / 1e6:.0f} MP together up to here; at most "
                               f"{limit / 1e6:.0f} MP (serve.limits.max_request_pixels)", "max_request_pixels")
    return counted


def _photos(row: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(field, value) of each photo `row` names, in the order they are checked; values of the
    wrong shape are left to the field's own check."""
    photos = [(IMAGE_FIELD, row.get(IMAGE_FIELD)), (EDIT_IMAGE_FIELD, row.get(EDIT_IMAGE_FIELD))]
    photos += _listed(row.get(REFERENCE_FIELD), REFERENCE_FIELD)
    mix = row.get(MIX_FIELD)
    for i, part in enumerate(mix if isinstance(mix, list) else []):
        if isinstance(part, Mapping):
            photos += _listed(part.get(REFERENCE_FIELD), f"{MIX_FIELD}[{i}].{REFERENCE_FIELD}")
    return [(field, value) for field, value in photos if value is not None]


def _listed(values: Any, field: str) -> list[tuple[str, Any]]:
    return [(f"{field}[{i}]", value) for i, value in enumerate(values)] if isinstance(values, list) else []
