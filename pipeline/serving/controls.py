"""Structure control in a request from outside: `control_image`, `control`, `control_scale` and
the guidance window `control_start`, `control_end`.

The fields are optional in every front end that takes requests (the serving app's
/v1/generate, the subject pyfunc's columns); `control_image` turns control on. The photo is
decoded within the dataset's decode limits, like reference photos. Only the kinds that need no
detector model are served: `canny` (edges made in process from the photo) and `map` (the photo
is already the map). How a ControlNet then steers generation is pipeline/model/control.py's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import PIL.Image

from pipeline.config import DecodeConfig
from pipeline.serving.requests import RequestError, finite_number
from pipeline.serving.subjects import decode_photo

IMAGE_FIELD, KIND_FIELD, SCALE_FIELD = "control_image", "control", "control_scale"
START_FIELD, END_FIELD = "control_start", "control_end"  # fractions of the steps, as generate.control.start/end
CONTROL_FIELDS = (IMAGE_FIELD, KIND_FIELD, SCALE_FIELD, START_FIELD, END_FIELD)
SERVED_KINDS = ("canny", "map")
DEFAULT_KIND = "canny"
# ControlNet's conditioning scale: 1 is the reference's; far above, the map drowns the prompt.
MAX_SCALE = 2.0


@dataclass(frozen=True)
class ControlRequest:
    """A checked control: the photo (or map) as decoded RGB, its kind, the ControlNet scale and
    its window, the fractions of the steps it steers (0 <= start < end <= 1; all by default)."""

    image: PIL.Image.Image
    kind: str
    scale: float
    start: float = 0.0
    end: float = 1.0


def validate_control(row: Mapping[str, Any], decode: DecodeConfig) -> ControlRequest | None:
    """The control of request `row`, or None when it has no `control_image`. RequestError names
    the field: a kind, scale or window without an image, an unknown kind, a scale out of
    0..MAX_SCALE, a window not 0 <= control_start < control_end <= 1, or a photo that is not one."""
    image, kind, scale, start, end = (row.get(name) for name in CONTROL_FIELDS)
    if image is None:
        given = [name for name in CONTROL_FIELDS[1:] if row.get(name) is not None]
        if given:
            raise RequestError(given[0], f"goes with {IMAGE_FIELD} (the photo whose structure is drawn)")
        return None
    kind = DEFAULT_KIND if kind is None else kind
    if kind not in SERVED_KINDS:
        raise RequestError(KIND_FIELD, f"must be one of {', '.join(SERVED_KINDS)}, got {str(kind)[:40]!r}")
    number = 1.0 if scale is None else finite_number(scale)
    if number is None or not 0 <= number <= MAX_SCALE:
        raise RequestError(SCALE_FIELD, f"must be a number 0..{MAX_SCALE:g}, got {str(scale)[:40]}")
    first, last = _fraction(start, START_FIELD, 0.0), _fraction(end, END_FIELD, 1.0)
    if first >= last:  # named: the bound the request gave (control_start when it gave both)
        field = START_FIELD if start is not None else END_FIELD
        raise RequestError(field, f"the window needs {START_FIELD} < {END_FIELD}, got {first:g} and {last:g}")
    return ControlRequest(decode_photo(image, IMAGE_FIELD, decode), kind, number, first, last)


def _fraction(value: Any, field: str, default: float) -> float:
    """A window bound of the request as a float in 0..1 (`default` when absent); RequestError
    naming `field` for anything else (a string, NaN, 1.5)."""
    number = default if value is None else finite_number(value)
    if number is None or not 0 <= number <= 1:
        raise RequestError(field, f"must be a number 0..1 (a fraction of the steps), got {str(value)[:40]}")
    return number


def control_tensor(control: ControlRequest, processor: Any, height: int, width: int) -> Any:
    """The control map at the output size as the model takes it: (1, 3, height, width) float32
    in [0, 1] (pipeline/model/control.py: make_control_map, prepare_control_image)."""
    from pipeline.model.control import make_control_map, prepare_control_image

    control_map = make_control_map(control.kind, control.image, height, width)
    return prepare_control_image(control_map, processor, height, width)
