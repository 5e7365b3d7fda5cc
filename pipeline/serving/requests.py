"""Generation requests from outside, checked against `serve.limits` before any model work.

The one place for every front end that takes a request from someone else: the registered
subject pyfunc (`mlflow models serve`), `subjectforge generate` and the serving app. A request
is a mapping of JSON values; it becomes a GenerationRequest within the limits, or a
RequestError that names the field. No MLflow, Ray or torch here.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config import GenerateConfig, ServeLimits, is_utf8

# The fields of a request; any other key is an error (a misspelt "step" must not silently
# fall back to the default).
FIELDS = ("prompt", "negative_prompt", "num_images", "seed", "guidance_scale", "steps", "height", "width")
SIZE_MULTIPLE = 8  # the VAE's downsampling factor: sizes are whole latent pixels
_SHOWN_CHARS = 40  # of a value or an unknown key quoted back in a message


class RequestError(ValueError):
    """A request the server refuses: `field` is the offending field (or `request` for the whole);
    `limit` the ServeLimits key it went past, if any."""

    def __init__(self, field: str, message: str, limit: str | None = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.limit = field, message, limit


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt's images, every value within the limits; its fields are SubjectModel.generate's
    arguments (`generate(**asdict(request))`)."""

    prompt: str
    num_images: int
    seed: int
    steps: int
    guidance_scale: float
    negative_prompt: str | None  # None: the model's default negative prompt
    height: int | None  # None: the model's own size (a subject's training resolution)
    width: int | None


def validate_request(
    row: Mapping[str, Any], limits: ServeLimits, defaults: GenerateConfig | None = None, *, fields: Sequence[str] = FIELDS
) -> GenerationRequest:
    """`row` ({"prompt": "on the beach", "steps": 30, ...}) as a GenerationRequest.

    A missing or null field takes its default from `defaults` (the `generate:` section);
    `prompt` is required. Whole-number fields take JSON integers only (not "5", 5.0 or true).
    Raises RequestError naming the first field that is unknown, of the wrong type or out of range.
    `fields` are the columns the caller takes (a model server's rows take more, rows.py); only
    FIELDS are read here.
    """
    if not isinstance(row, Mapping):
        raise RequestError("request", f"must be an object of fields, got {_kind(row)}")
    unknown = [key for key in row if key not in fields]
    if unknown:
        raise RequestError(_names(unknown), f"unknown field{'s' if len(unknown) > 1 else ''}; the fields are {', '.join(fields)}")
    defaults = defaults or GenerateConfig()
    return GenerationRequest(
        prompt=_text(row, "prompt", limits.max_prompt_chars, required=True),
        num_images=_whole(row, "num_images", 1, limits.max_num_images, default=1, limit="max_num_images"),
        seed=_whole(row, "seed", 0, limits.max_seed, default=defaults.seed, limit="max_seed"),
        steps=_whole(row, "steps", 1, limits.max_steps, default=defaults.steps, limit="max_steps"),
        guidance_scale=_number(row, "guidance_scale", 0.0, limits.max_guidance_scale, default=defaults.guidance_scale),
        negative_prompt=_text(row, "negative_prompt", limits.max_prompt_chars, default=defaults.negative_prompt),
        height=_size(row, "height", limits.max_size),
        width=_size(row, "width", limits.max_size),
    )


def validate_requests(
    rows: Sequence[Mapping[str, Any]], limits: ServeLimits, defaults: GenerateConfig | None = None, *, fields: Sequence[str] = FIELDS
) -> list[GenerationRequest]:
    """Every row of a request that holds several prompts; their images together stay within
    `limits.max_num_images`. The RequestError of a bad row says which row (from 0)."""
    if not rows:
        raise RequestError("request", "holds no prompts")
    if len(rows) > limits.max_num_images:  # each row makes at least one image
        raise RequestError("num_images", f"{len(rows)} prompts make more than {limits.max_num_images} images", "max_num_images")
    requests = []
    for index, row in enumerate(rows):
        try:
            requests.append(validate_request(row, limits, defaults, fields=fields))
        except RequestError as exc:
            raise RequestError(exc.field, f"{exc.message} (row {index})", exc.limit) from None
    total = sum(r.num_images for r in requests)
    if total > limits.max_num_images:
        raise RequestError("num_images", f"{total} images in all; at most {limits.max_num_images} a request", "max_num_images")
    return requests


def check_unicode(value: Any, field: str = "request") -> None:
    """RequestError naming the first string of JSON `value` (a field name too) that is not text:
    a lone surrogate such as "\\ud800", which a JSON escape can write but neither the tokenizer
    nor a UTF-8 answer can take. `value` is the request (its fields are named by their keys,
    "prompt") or the field `field`; below, fields are "field.key" and list items "field[i]"."""
    # A loop over one iterator per open container, not recursion (json.loads nests as deep as
    # the stack allows, leaving no room to recurse); the field is named only once found, and
    # numbers are passed over first: naming each item as it was queued held 2 GB and 17 s of a
    # replica for a 30 MB body of `"seed": [0, 0, ...]` (now 2 s and nothing per item).
    levels: list[tuple[Iterator[tuple[Any, Any]], bool]] = [(iter(((None, value),)), False)]  # (items, is a list)
    keys: list[Any] = []  # keys[j]: the key, within level j, of the container that level j + 1 walks
    while levels:
        entry = next(levels[-1][0], _END)
        if entry is _END:
            levels.pop()
            if keys:
                keys.pop()
            continue
        key, item = entry
        kind = type(item)
        if kind in _SCALARS:
            continue
        if isinstance(item, str):
            if not (item.isascii() or is_utf8(item)):  # isascii: a base64 photo is passed over without a copy
                raise RequestError(_place(field, levels, [*keys, key]), "is not valid Unicode text (a lone surrogate such as \\ud800)")
        elif kind is dict or isinstance(item, Mapping):
            if any(isinstance(name, str) and not is_utf8(name) for name in item):
                raise RequestError(_place(field, levels, [*keys, key]),
                                   "has a field name that is not valid Unicode text (a lone surrogate such as \\ud800)")
            levels.append((iter(item.items()), False))
            keys.append(key)
        elif kind is list or isinstance(item, list | tuple):
            levels.append((iter(enumerate(item)), True))
            keys.append(key)


_END = object()  # check_unicode: a level's items are all walked
_SCALARS = frozenset({int, float, bool, type(None)})  # JSON values without text


def _place(field: str, levels: list[tuple[Any, bool]], path: list[Any]) -> str:
    """The field name of the item check_unicode reached by `path` (path[j]: its key within
    levels[j]; path[0] is the root's own)."""
    where = field
    for (_, is_list), key in zip(levels[1:], path[1:], strict=True):
        where = f"{where}[{key}]" if is_list else str(key) if where == "request" else f"{where}.{key}"
    return where


def records_from_frame(frame: Any) -> list[Any]:
    """The rows of a model server's input as plain Python values, for validate_requests.

    `frame`: a pandas DataFrame (what `mlflow models serve` makes of `dataframe_records` or
    `dataframe_split`), a list of mappings, or one mapping. NaN and None become None (the
    field is absent). pandas turns a column of integers with a missing value into floats
    (5 -> 5.0 beside a NaN): there, and only there, whole floats are integers again.
    """
    if isinstance(frame, Mapping):
        return [dict(frame)]
    if isinstance(frame, Sequence) and not isinstance(frame, str | bytes):
        return list(frame)
    if not hasattr(frame, "to_dict") or not hasattr(frame, "columns"):
        raise RequestError("request", f"must be a table of prompts, got {type(frame).__name__}")
    upcast = {
        column for column in frame.columns
        if getattr(frame[column].dtype, "kind", "") == "f" and bool(frame[column].isna().any())
    }
    records = []
    for record in frame.to_dict("records"):
        row = {}
        for key, value in record.items():
            if isinstance(value, float) and math.isnan(value):
                value = None
            elif key in upcast and isinstance(value, float) and value.is_integer():
                value = int(value)
            elif value is not None and not isinstance(value, str | bool | int | float | list | dict) and _is_missing(value):
                value = None
            row[key] = value
        records.append(row)
    return records


def _text(row: Mapping[str, Any], name: str, max_chars: int, required: bool = False, default: str | None = None) -> str | None:
    value = row.get(name)
    if value is None:
        if required:
            raise RequestError(name, "is required (a string)" if name not in row else "must be a string, got null")
        return default
    if not isinstance(value, str):
        raise RequestError(name, f"must be a string, got {_kind(value)}")
    if len(value) > max_chars:
        raise RequestError(name, f"has {len(value)} characters; at most {max_chars}", "max_prompt_chars")
    if required and not value.strip():
        raise RequestError(name, "must not be empty")
    return value


def _whole(row: Mapping[str, Any], name: str, low: int, high: int, default: int, limit: str) -> int:
    value = row.get(name)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(name, f"must be a whole number {low}..{high}, got {_kind(value)} {_shown(value)}")
    if not low <= value <= high:
        raise RequestError(name, f"must be {low}..{high}, got {_shown(value)}{_default_note(row, name)}", limit)
    return value


def _number(row: Mapping[str, Any], name: str, low: float, high: float, default: float) -> float:
    value = row.get(name)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(name, f"must be a number {low:g}..{high:g}, got {_kind(value)} {_shown(value)}")
    number = finite_number(value)
    if number is None or not low <= number <= high:
        raise RequestError(name, f"must be {low:g}..{high:g}, got {_shown(value)}{_default_note(row, name)}", "max_guidance_scale")
    return number


def finite_number(value: Any) -> float | None:
    """`value` as a float when it is a finite JSON number, else None: a boolean, a string, NaN, inf
    or a whole number past float's range (JSON's 10**400, on which math.isfinite overflows)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _size(row: Mapping[str, Any], name: str, max_size: int) -> int | None:
    if row.get(name) is None:
        return None
    value = _whole(row, name, SIZE_MULTIPLE, max_size, default=0, limit="max_size")
    if value % SIZE_MULTIPLE:
        raise RequestError(name, f"must be a multiple of {SIZE_MULTIPLE}, got {value}")
    return value


def _default_note(row: Mapping[str, Any], name: str) -> str:
    return " (the configured default)" if row.get(name) is None else ""


def _kind(value: Any) -> str:
    """The JSON name of `value`'s type, as the sender wrote it."""
    for kind, name in ((type(None), "null"), (bool, "boolean"), (int, "integer"), (float, "number"), (str, "string")):
        if isinstance(value, kind):
            return name
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, Sequence):
        return "array"
    return type(value).__name__


def _shown(value: Any) -> str:
    if isinstance(value, list | dict):  # the first few items: a whole repr of [0, 0, ...] of 30 MB took a second to cut
        text = _REPR.repr(value)
        return text if len(text) <= _SHOWN_CHARS else f"{text[:_SHOWN_CHARS]}... ({len(value)} items)"
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else f"{text[:_SHOWN_CHARS]}... ({len(text)} characters)"


_REPR = reprlib.Repr()  # of a list or object in a message: a few items, a few levels deep
_REPR.maxlist = _REPR.maxdict = 8
_REPR.maxlevel = 3


def _names(keys: list[Any]) -> str:
    shown = ", ".join(_shown(str(k)) for k in keys[:5])
    return shown if len(keys) <= 5 else f"{shown} and {len(keys) - 5} more"


def _is_missing(value: Any) -> bool:
    """pandas' other missing markers (pd.NA, NaT); False for anything that is not a scalar."""
    import pandas as pd

    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False
