"""The HTTP API of `subjectforge serve`, without the server: request bodies in, answers out.

POST /v1/generate takes a JSON object: the fields of pipeline/serving/requests.py (`prompt`,
`negative_prompt`, `num_images`, `seed`, `guidance_scale`, `steps`, `height`, `width`) plus a
subject: `subject` (a registered one) or `reference_images` (1..6 base64 photos) with
`category` (zero-shot), or `mix`, a weighted list of such subjects mixed into one, and optionally a structure control (`control_image`, `control`,
`control_scale`, `control_start`, `control_end`: pipeline/serving/controls.py) or an edit (`replace`, `edit_image`:
pipeline/serving/edits.py). Every field is checked here, before anything reaches the model, and
each violation is an ApiError with its HTTP status and the field it names; a prompt that names
its subjects in [slots] is matched to them once they are resolved (pipeline/serving/slots.py).
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config, ServeLimits
from pipeline.serving.controls import CONTROL_FIELDS, ControlRequest, validate_control
from pipeline.serving.edits import EDIT_FIELDS, EditRequest, validate_edit
from pipeline.serving.photos import count_photo_pixels
from pipeline.serving.requests import FIELDS, GenerationRequest, RequestError, check_unicode, validate_request
from pipeline.serving.subjects import (
    CATEGORY_FIELD,
    MIX_FIELD,
    REFERENCE_FIELD,
    SUBJECT_FIELD,
    MixedSubject,
    SubjectRef,
    ZeroShotSubject,
    decode_reference_images,
    parse_mix,
    parse_subject_ref,
    without_passwords,
)

GENERATE_FIELDS = (*FIELDS, SUBJECT_FIELD, REFERENCE_FIELD, CATEGORY_FIELD, MIX_FIELD, *CONTROL_FIELDS, *EDIT_FIELDS)
MIX = "mix"  # the subject name of mixed requests in answers and metrics
ZERO_SHOT = "zero-shot"  # the subject name of zero-shot requests in answers and metrics
JSON_TYPE = "application/json"


class ApiError(Exception):
    """An answer other than 200: `status` (4xx/5xx) and the `field` it is about."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message

    def body(self) -> dict[str, Any]:
        """The JSON answer; a URL's password in the message (the registry's) is not sent."""
        return {"error": without_passwords(self.message), "field": self.field, "status": self.status}


@dataclass(frozen=True)
class GenerateCall:
    """A checked POST /v1/generate: what to draw, and of which subject."""

    request: GenerationRequest
    subject: SubjectRef | ZeroShotSubject | MixedSubject
    control: ControlRequest | None = None
    edit: EditRequest | None = None


def check_content_type(header: str | None) -> None:
    """ApiError 415 unless the body is sent as JSON (`Content-Type: application/json`, with any
    parameters). A browser posts a form or text/plain to another site without asking it first,
    so without this check any page a user of the server opens could make it draw."""
    kind = (header or "").split(";", 1)[0].strip().lower()
    if kind != JSON_TYPE:
        raise ApiError(415, "Content-Type", f"must be {JSON_TYPE}, got {(header or 'none')[:60]!r}")


def read_json(body: bytes, max_bytes: int, max_items: int) -> Any:
    """The JSON value of a request body; ApiError 413 over `max_bytes`, 400 when malformed or
    when it may hold more than `max_items` values (json_items_limit)."""
    if len(body) > max_bytes:
        raise ApiError(413, "request", f"body of {len(body)} bytes; at most {max_bytes} (serve.max_request_mb)")
    # Every value of an array or object past its first follows a literal comma, and every array
    # or object opens with a literal bracket: counted in C before anything is parsed. A 46 MB
    # body of [{}, {}, ...] became 1.7 GB of Python objects, and a replica's few concurrent
    # requests of it would have been killed for memory.
    items = body.count(b",") + body.count(b"[") + body.count(b"{")
    if items > max_items:
        raise ApiError(400, "request", f"holds {items} commas and brackets; at most {max_items}: a request is a few fields, "
                       "not a large JSON document")
    try:
        return json.loads(body)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of more digits than int() converts
        raise ApiError(400, "request", f"malformed JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "request", "malformed JSON: nested too deeply") from None


# Commas and brackets a request may hold beside those of its prompt and negative_prompt: its
# other fields and their text (categories, subject names, a mix of 4 parts of 6 photos) need a
# few hundred at most.
JSON_ITEMS_BESIDE_PROMPTS = 10_000


def json_items_limit(limits: ServeLimits) -> int:
    """The most commas and brackets (read_json) a request body may hold under `limits`: its two
    prompts may be all commas."""
    return 2 * limits.max_prompt_chars + JSON_ITEMS_BESIDE_PROMPTS


def parse_generate(value: Any, config: Config) -> GenerateCall:
    """`value` (a parsed JSON body) as a GenerateCall; ApiError 400 naming the field otherwise."""
    try:
        if not isinstance(value, dict):
            raise RequestError("request", "must be a JSON object of fields")
        check_unicode(value)
        unknown = [key for key in value if key not in GENERATE_FIELDS]
        if unknown:
            raise RequestError(str(unknown[0])[:40], f"unknown field; the fields are {', '.join(GENERATE_FIELDS)}")
        request = validate_request({k: v for k, v in value.items() if k in FIELDS}, config.serve.limits, config.generate)
        count_photo_pixels(value, config.data.decode, config.serve.limits.max_request_pixels)  # before any photo is decoded
        control = validate_control(value, config.data.decode)
        edit = validate_edit(value, request, config.data.decode)
        if control is not None and edit is not None:
            raise RequestError(CONTROL_FIELDS[0], "cannot be combined with an edit (replace)")
        if value.get(MIX_FIELD) is not None:
            given = [name for name in (SUBJECT_FIELD, REFERENCE_FIELD, CATEGORY_FIELD) if value.get(name) is not None]
            if given:
                raise RequestError(given[0], f"goes inside {MIX_FIELD}'s parts, not beside {MIX_FIELD}")
            mix = parse_mix(value[MIX_FIELD], config.data.decode, config.serve.max_reference_images)
            return GenerateCall(request, mix, control, edit)
        has_subject, has_photos = value.get(SUBJECT_FIELD) is not None, value.get(REFERENCE_FIELD) is not None
        if not has_subject and not has_photos:
            raise RequestError(SUBJECT_FIELD, f"give {SUBJECT_FIELD} (a registered subject), {REFERENCE_FIELD} with {CATEGORY_FIELD}, or {MIX_FIELD}")
        if has_subject and has_photos:
            raise RequestError(SUBJECT_FIELD, f"give {SUBJECT_FIELD} (a registered subject) or {REFERENCE_FIELD} with {CATEGORY_FIELD}, not both")
        if has_subject:
            if value.get(CATEGORY_FIELD) is not None:
                raise RequestError(CATEGORY_FIELD, f"goes with {REFERENCE_FIELD}; a registered subject has its own")
            return GenerateCall(request, parse_subject_ref(value[SUBJECT_FIELD]), control, edit)
        subject = decode_reference_images(value[REFERENCE_FIELD], value.get(CATEGORY_FIELD), config.data.decode,
                                          config.serve.max_reference_images)
        return GenerateCall(request, subject, control, edit)
    except RequestError as exc:
        raise ApiError(400, exc.field, exc.message) from None


# zlib level of the answers' PNGs. Lossless at any level; level 1 takes a third of the time of
# PIL's default 6 for files about 1% larger (BENCHMARKS.md "Serving", bench_encode.py --answer),
# and the encoding is on every request's path.
PNG_COMPRESS_LEVEL = 1


def image_answer(images: list[Any], request: GenerationRequest, subject: str, version: str | None, base: str) -> dict[str, Any]:
    """The 200 answer of POST /v1/generate: base64 PNGs in order, with what made them. The
    images come from one noise generator seeded with `seed`, as `subjectforge generate -n`
    draws them: the same request gives the same images."""
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return {
        "images": encoded,
        "seed": request.seed,
        "seeds": [request.seed] * len(images),
        "subject": subject,
        "model_version": version,
        "base_model": base,
        "steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "size": [images[0].height, images[0].width] if images else None,
    }
