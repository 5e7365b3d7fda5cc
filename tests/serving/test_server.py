"""The replica's request handling (pipeline/serving/app.py SubjectServer._generate) without Ray:
the batch queue is replaced by a direct engine call, so the tests are cheap and need no Serve.

An out-of-memory during generation is a 503 and the next request is answered; a registry that
does not answer is a 503 naming the registry, never a 404 "unknown subject"; each answer is
counted per subject with its status, and each drawn request's queue and image times recorded;
an answer says where its time went (timings, Server-Timing) and /healthz keeps the means.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from starlette.requests import Request

from pipeline.config import load_config
from pipeline.model import BlipDiffusion
from pipeline.serving.api import image_answer
from pipeline.serving.app import SubjectServer, serve_controlnet
from pipeline.serving.batcher import BatchQueue
from pipeline.serving.engine import Engine
from pipeline.serving.metrics import BatchMeans, PhaseMeans
from pipeline.serving.subjects import SubjectLibrary
from pipeline.serving.timings import PHASES
from tests.imagefiles import png_header_only
from tests.serve_subjects import TINY, fail_first_call


class RecordedMetrics:
    """ServeMetrics' recording calls, kept in lists, and its running phase means."""

    def __init__(self) -> None:
        self.requests, self.jobs, self.phases, self.batches = [], [], PhaseMeans(), BatchMeans()

    def record_request(self, subject, status):
        self.requests.append((subject, status))

    def record_job(self, subject, timings, num_images):
        self.jobs.append((subject, timings, num_images))
        self.phases.add(timings)


@pytest.fixture(scope="module")
def model():
    return BlipDiffusion.from_pretrained(TINY)


def make_server(model, tracking_uri="sqlite:///unused.db"):
    """A SubjectServer on the tiny model whose batch queue draws each request at once."""
    server = object.__new__(SubjectServer)
    server.config = load_config(overrides=["profile=tiny"])
    server.base = TINY
    server.engine = Engine(model, max_batch_images=8, max_subjects=4, max_lora_adapters=4,
                           controlnet=serve_controlnet(server.config))
    server.library = SubjectLibrary(tracking_uri, 4, 1e9)
    server.metrics = RecordedMetrics()
    server.device, server.compile_mode, server.skip_log, server.compile_cache = torch.device("cpu"), "off", None, None

    class DrawAtOnce:  # the batch queue (batcher.py) with a batch of one
        async def submit(self, job):
            server.engine.run([job])

    server.batches = DrawAtOnce()
    return server


def post(payload: dict | bytes, content_type: str | None = "application/json") -> Request:
    body, sent = payload if isinstance(payload, bytes) else json.dumps(payload).encode(), []

    async def receive():
        if sent:
            return {"type": "http.disconnect"}
        sent.append(True)
        return {"type": "http.request", "body": body, "more_body": False}

    return request_of(receive, content_type)


def request_of(receive, content_type: str | None = "application/json") -> Request:
    """A POST /v1/generate whose body comes from ASGI `receive`."""
    headers = [] if content_type is None else [(b"content-type", content_type.encode())]
    scope = {"type": "http", "method": "POST", "path": "/v1/generate", "headers": headers, "query_string": b"",
             "scheme": "http", "server": ("127.0.0.1", 80), "root_path": ""}
    return Request(scope, receive)


def answer(server, payload, content_type="application/json"):
    response = asyncio.run(server(post(payload, content_type)))
    return response.status_code, json.loads(response.body)


def zero_shot(seed=0):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 120, 40)).save(buffer, format="PNG")
    return {"prompt": "on the beach", "steps": 2, "seed": seed, "height": 32, "width": 32,
            "reference_images": [base64.b64encode(buffer.getvalue()).decode()], "category": "dog"}


def test_out_of_memory_is_a_503_and_the_next_request_is_answered(model, monkeypatch):
    server = make_server(model)
    fail_first_call(monkeypatch, model, "_denoise", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    status, body = answer(server, zero_shot())
    assert status == 503 and "out of memory" in body["error"], body
    status, body = answer(server, zero_shot(seed=1))
    assert status == 200 and len(body["images"]) == 1, body
    assert server.metrics.requests == [("zero-shot", 503), ("zero-shot", 200)]
    [(subject, timings, num_images)] = server.metrics.jobs  # only the drawn request has times
    assert subject == "zero-shot" and timings["queue"] >= 0 and timings["denoise"] > 0 and num_images == 1


def parse_server_timing(header: str) -> dict[str, float]:
    """{name: milliseconds} of a Server-Timing header ("name;dur=12, other;dur=3.5")."""
    out = {}
    for metric in header.split(","):
        name, *params = (part.strip() for part in metric.split(";"))
        [duration] = [float(p.split("=", 1)[1]) for p in params if p.startswith("dur=")]
        out[name] = duration
    return out


def get(server, path: str):
    scope = {"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b"",
             "scheme": "http", "server": ("127.0.0.1", 80), "root_path": ""}
    response = asyncio.run(server(Request(scope)))
    return response.status_code, json.loads(response.body)


def test_an_answer_says_where_its_time_went_and_healthz_keeps_the_means(model):
    server = make_server(model)
    response = asyncio.run(server(post(zero_shot())))
    assert response.status_code == 200
    timings = json.loads(response.body)["timings"]
    assert list(timings) == [*PHASES, "total"] and min(timings.values()) >= 0, timings
    assert sum(timings[phase] for phase in PHASES) <= timings["total"], timings
    assert timings["denoise"] > 0 and timings["decode"] > 0
    assert parse_server_timing(response.headers["server-timing"]) == {k: pytest.approx(v * 1000) for k, v in timings.items()}
    answer(server, zero_shot(seed=1))
    status, health = get(server, "/healthz")
    means = health["phase_means_s"]
    assert status == 200 and means["requests"] == 2 and set(means) == {"requests", *PHASES, "total"}, health
    assert sum(means[phase] for phase in PHASES) <= means["total"] + 0.001 * len(PHASES)  # each mean rounded to the ms
    assert health["compile_mode"] == "off" and health["cudagraph_skips"] == 0 and health["cudagraph_skip_reasons"] == []


def test_a_failed_request_leaves_the_means_alone(model):
    server = make_server(model)
    assert answer(server, {"prompt": "on the beach", "steps": 0})[0] == 400
    assert get(server, "/healthz")[1]["phase_means_s"] == {"requests": 0}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_registry_that_does_not_answer_is_a_503_not_an_unknown_subject(model, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries take minutes
    server = make_server(model, f"http://127.0.0.1:{_closed_port()}")
    status, body = answer(server, {"prompt": "on the beach", "steps": 2, "subject": "models:/subjectforge-dog@champion"})
    assert (status, body["field"]) == (503, "registry"), body
    assert "not registered" not in body["error"] and "retry" in body["error"]
    assert server.metrics.requests == [("subjectforge-dog", 503)]


def test_a_subject_the_registry_does_not_hold_stays_a_404(model, tmp_path):
    server = make_server(model, f"sqlite:///{tmp_path / 'mlflow.db'}")
    status, body = answer(server, {"prompt": "on the beach", "steps": 2, "subject": "models:/subjectforge-nobody@champion"})
    assert (status, body["field"]) == (404, "subject"), body
    assert "subjectforge-nobody" in body["error"]


def test_names_the_registry_does_not_hold_share_one_metrics_series(model, tmp_path):
    # Each made-up name was a subjectforge_requests series of its own: a client could grow the
    # replica's metrics (and every Prometheus scrape) without bound, one 404 at a time.
    server = make_server(model, f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("subjectforge-nobody", "made-up-1", "made-up-2"):
        status, body = answer(server, {"prompt": "on the beach", "steps": 2, "subject": f"models:/{name}@champion"})
        assert (status, body["field"]) == (404, "subject") and name in body["error"], body
    assert server.metrics.requests == [("unregistered", 404)] * 3


def _pixels(data: str) -> list:
    """An answer's base64 PNG as nested lists of RGB values (the PNG bytes depend on zlib's level)."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")).tolist()


def _png_b64(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


EDGES = Image.new("RGB", (48, 48), (10, 10, 10))
EDGES.paste((255, 255, 255), (12, 12, 36, 36))


def test_a_control_image_steers_the_request_and_scale_zero_changes_nothing(model):
    server = make_server(model)
    _, plain = answer(server, zero_shot(seed=2))
    status, steered = answer(server, {**zero_shot(seed=2), "control_image": _png_b64(EDGES)})
    assert status == 200, steered
    status, unsteered = answer(server, {**zero_shot(seed=2), "control_image": _png_b64(EDGES), "control": "map", "control_scale": 0})
    assert status == 200, unsteered
    assert unsteered["images"] == plain["images"] and steered["images"] != plain["images"]
    # A window: 2 steps are 3 UNet calls; control_end 0.3 keeps none, control_start 0.3 the last two.
    status, unwindowed = answer(server, {**zero_shot(seed=2), "control_image": _png_b64(EDGES), "control_end": 0.3})
    assert status == 200, unwindowed
    status, late = answer(server, {**zero_shot(seed=2), "control_image": _png_b64(EDGES), "control_start": 0.3})
    assert status == 200, late
    assert unwindowed["images"] == plain["images"] and late["images"] not in (plain["images"], steered["images"])


@pytest.mark.parametrize("fields, field", [
    ({"control": "canny"}, "control"),
    ({"control_scale": 0.5}, "control_scale"),
    ({"control_end": 0.5}, "control_end"),
    ({"control_image": _png_b64(EDGES), "control_start": 0.8, "control_end": 0.2}, "control_start"),
    ({"control_image": _png_b64(EDGES), "control_end": 0}, "control_end"),
    ({"control_image": _png_b64(EDGES), "control_start": 1}, "control_start"),
    ({"control_image": _png_b64(EDGES), "control_end": 1.5}, "control_end"),
    ({"control_image": _png_b64(EDGES), "control_start": "late"}, "control_start"),
    ({"control_image": _png_b64(EDGES), "control": "depth"}, "control"),
    ({"control_image": _png_b64(EDGES), "control_scale": 5}, "control_scale"),
    ({"control_image": _png_b64(EDGES), "control_scale": "strong"}, "control_scale"),
    ({"control_image": "not base64!"}, "control_image"),
    ({"control_image": base64.b64encode(b"just some notes").decode()}, "control_image"),
])
def test_a_bad_control_is_a_400_naming_the_field(model, fields, field):
    status, body = answer(make_server(model), {**zero_shot(), **fields})
    assert (status, body["field"]) == (400, field), body


def test_a_mix_of_a_subject_with_itself_draws_the_subject_and_other_mixes_differ(model):
    server = make_server(model)
    alone = zero_shot(seed=5)
    part = {"reference_images": alone["reference_images"], "category": "dog"}
    other = {"reference_images": [_png_b64(EDGES)], "category": "cat", "weight": 0.5}
    base = {k: v for k, v in alone.items() if k not in ("reference_images", "category")}
    _, expected = answer(server, alone)
    status, same = answer(server, {**base, "mix": [{**part, "weight": 0.5}, {**part, "weight": 0.5}]})
    assert status == 200 and same["subject"] == "mix", same
    _, mixed = answer(server, {**base, "mix": [{**part, "weight": 0.5}, other]})
    assert same["images"] == expected["images"] and mixed["images"] != expected["images"]


@pytest.mark.parametrize("mix, field", [
    ([], "mix"),
    ([{"subject": "models:/subjectforge-dog@champion", "weight": 1}] * 5, "mix"),
    ([{"subject": "models:/subjectforge-dog@champion", "weight": 0.5}, {"subject": "models:/x@y", "weight": -0.5}], "mix"),
    ([{"subject": "models:/subjectforge-dog@champion", "weight": "lots"}], "mix[0].weight"),
    ([{"subject": "models:/subjectforge-dog@champion", "wieght": 1}], "mix[0].wieght"),
    ([{"weight": 1}], "mix[0]"),
    ([{"reference_images": ["not base64!"], "category": "dog"}], "mix[0].reference_images[0]"),
    ([{"subject": "dog"}], "mix[0].subject"),
    ([{"subject": "models:/subjectforge-dog@champion", "category": "cat"}], "mix[0].category"),  # was silently dropped
])
def test_a_bad_mix_is_a_400_naming_the_field(model, mix, field):
    status, body = answer(make_server(model), {"prompt": "on the beach", "steps": 2, "mix": mix})
    assert (status, body["field"]) == (400, field), body


def test_a_mix_goes_alone(model):
    status, body = answer(make_server(model), {**zero_shot(), "mix": [{"subject": "models:/subjectforge-dog@champion"}]})
    assert (status, body["field"]) == (400, "reference_images"), body


def test_replace_edits_the_image_and_an_edit_image_is_edited(model):
    server = make_server(model)
    base = {k: v for k, v in zero_shot(seed=6).items() if k != "prompt"} | {"prompt": "a dog on the grass"}
    status, edited = answer(server, {**base, "replace": "dog"})
    assert status == 200 and len(edited["images"]) == 1, edited
    _, plain = answer(server, base)
    assert edited["images"] != plain["images"]
    status, photo = answer(server, {**base, "replace": "dog", "edit_image": _png_b64(EDGES)})
    assert status == 200 and photo["size"] == [32, 32], photo
    assert edited["timings"]["denoise"] > 0 and sum(edited["timings"][p] for p in PHASES) <= edited["timings"]["total"]


@pytest.mark.parametrize("fields, field", [
    ({"replace": "cat"}, "replace"),
    ({"edit_image": _png_b64(EDGES)}, "edit_image"),
    ({"replace": "dog", "num_images": 2}, "num_images"),
    ({"replace": "dog", "control_image": _png_b64(EDGES)}, "control_image"),
])
def test_a_bad_edit_is_a_400_naming_the_field(model, fields, field):
    request = {**zero_shot(), "prompt": "a dog on the grass", **fields}
    status, body = answer(make_server(model), request)
    assert (status, body["field"]) == (400, field), body


def test_a_textual_inversion_subject_in_a_mix_is_a_422_not_a_crash(model):
    """Its embeddings are a learned word (1, V, D), not the Q subject embeddings a mix weighs."""
    from types import SimpleNamespace

    server = make_server(model)
    word = SimpleNamespace(key="subjectforge-word/1", embeds=torch.zeros(1, 1, 32),
                           spec=SimpleNamespace(method="textual-inversion", ti_property="object"))
    server._registered = lambda ref: (word, "subjectforge-word/1")
    mix = [{"subject": "models:/subjectforge-word@champion", "weight": 0.5}, {**zero_shot(), "weight": 0.5}]
    for part in mix[1:]:
        del part["prompt"], part["steps"], part["seed"], part["height"], part["width"]
    status, body = answer(server, {"prompt": "on the beach", "steps": 2, "height": 32, "width": 32, "mix": mix})
    assert (status, body["field"]) == (422, "mix[0].subject"), body
    assert "subject embeddings" in body["error"]


def _photo_part(image, category, **fields):
    return {"reference_images": [_png_b64(image)], "category": category, **fields}


DOG_PHOTO = Image.new("RGB", (64, 64), (200, 120, 40))
SLOTTED = {"steps": 2, "seed": 7, "height": 32, "width": 32, "guidance_scale": 7.5, "negative_prompt": "blurry"}


def test_a_slot_prompt_draws_each_subject_in_its_place(model):
    server = make_server(model)
    status, one = answer(server, {**SLOTTED, "prompt": "a [dog] next to a cat", **_photo_part(DOG_PHOTO, "dog")})
    assert status == 200, one
    expected = model.generate("a [dog] next to a cat", subjects={"dog": model.encode_subject(DOG_PHOTO, "dog")}, progress=False,
                              **{k: v for k, v in SLOTTED.items() if k != "seed"}, seed=SLOTTED["seed"])
    assert [_pixels(data) for data in one["images"]] == [np.asarray(expected[0]).tolist()]
    mix = [_photo_part(DOG_PHOTO, "dog"), _photo_part(EDGES, "cat")]
    status, two = answer(server, {**SLOTTED, "prompt": "a [dog] next to a [cat]", "mix": mix})
    assert status == 200 and two["subject"] == "mix", two
    assert two["images"] != one["images"]


@pytest.mark.parametrize("prompt, fields, field", [
    ("a [dog] next to a [cat]", _photo_part(DOG_PHOTO, "dog"), "prompt"),
    ("a [] on the beach", _photo_part(DOG_PHOTO, "dog"), "prompt"),
    ("a [cat] on the beach", _photo_part(DOG_PHOTO, "dog"), "category"),
    ("a [dog] on the beach", {"mix": [_photo_part(DOG_PHOTO, "dog"), _photo_part(EDGES, "cat")]}, "mix[1].category"),
    ("a [dog] and a [cat]", {"mix": [_photo_part(DOG_PHOTO, "dog"), _photo_part(EDGES, "cat"), _photo_part(EDGES, "cat", weight=-1)]}, "mix"),
    ("a [dog] on the grass", {**_photo_part(DOG_PHOTO, "dog"), "replace": "grass"}, "replace"),
])
def test_a_slot_without_a_subject_or_a_subject_without_a_slot_is_a_400_naming_the_field(model, prompt, fields, field):
    status, body = answer(make_server(model), {**SLOTTED, "prompt": prompt, **fields})
    assert (status, body["field"]) == (400, field), body


def test_a_slot_past_the_tokens_the_text_encoder_reads_is_a_400_and_the_next_request_is_answered(model):
    server = make_server(model)
    status, body = answer(server, {**SLOTTED, "prompt": "on the beach " * 30 + "a [dog]", **_photo_part(DOG_PHOTO, "dog")})
    assert (status, body["field"]) == (400, "prompt"), body
    assert "[dog]" in body["error"]
    status, body = answer(server, {**SLOTTED, "prompt": "a [dog] on the beach", **_photo_part(DOG_PHOTO, "dog")})
    assert status == 200, body


def test_a_dreambooth_subject_in_a_slot_is_a_422(model):
    from types import SimpleNamespace

    from pipeline.serving.subjects import RegisteredSubject

    server = make_server(model)
    spec = SimpleNamespace(method="dreambooth", ti_property=None, category="dog", resolution=32)
    subject = RegisteredSubject("subjectforge-sks/1", "subjectforge-sks", "1", spec, None, None, None, None)
    server._registered = lambda ref: (subject, "1")
    status, body = answer(server, {**SLOTTED, "prompt": "a [dog] on the beach", "subject": "models:/subjectforge-sks@champion"})
    assert (status, body["field"]) == (422, "subject"), body
    assert "no subject embeddings" in body["error"]


def _hostile(**fields):
    """A zero-shot request with `fields` changed: a JSON body a hostile client could send."""
    return {**zero_shot(), **fields}


_PART = {"reference_images": zero_shot()["reference_images"], "category": "dog"}
# A 49 MP photo by its header, within data.decode.max_pixels alone: 4 of them are past
# serve.limits.max_request_pixels together (a 6 MB body of such photos held 7 GB once decoded).
_49MP = base64.b64encode(png_header_only(7000, 7000)).decode()
_NO_SUBJECT = {k: v for k, v in zero_shot().items() if k not in ("reference_images", "category")}


@pytest.mark.parametrize("payload, field", [
    # An integer of more digits than Python converts (sys.get_int_max_str_digits) is a ValueError of json.loads.
    pytest.param(b'{"prompt": "on the beach", "seed": ' + b"9" * 5000 + b"}", "request", id="5000-digit-integer"),
    # A lone surrogate (json.dumps sends it as the escape \\ud800) is valid JSON but no text: the tokenizer and the answer's UTF-8 cannot take it.
    pytest.param(_hostile(prompt="on the \ud800 beach"), "prompt", id="surrogate-prompt"),
    pytest.param(_hostile(negative_prompt="\udfff"), "negative_prompt", id="surrogate-negative-prompt"),
    pytest.param(_hostile(category="d\ud800g"), "category", id="surrogate-category"),
    pytest.param(_hostile(**{"\ud800": 1}), "request", id="surrogate-field-name"),
    pytest.param({**_NO_SUBJECT, "subject": "models:/subjectforge-dog@\ud800"}, "subject", id="surrogate-alias"),
    pytest.param({**_NO_SUBJECT, "mix": [{**_PART, "category": "\ud800"}]}, "mix[0].category", id="surrogate-mix-category"),
    pytest.param(_hostile(reference_images=["data:image/png;base64"]), "reference_images[0]", id="data-url-without-comma"),
    pytest.param({**_NO_SUBJECT, "mix": [{**_PART, "reference_images": ["data:"]}]}, "mix[0].reference_images[0]", id="mix-data-url"),
    pytest.param({**_NO_SUBJECT, "subject": "models:/subjectforge-dog/" + "9" * 30}, "subject.version", id="30-digit-version"),
    pytest.param({**_NO_SUBJECT, "mix": [{**_PART, "weight": 1e308}, {**_PART, "weight": 1e308}]}, "mix", id="weights-add-up-to-inf"),
    pytest.param(_hostile(prompt="on the beach " * 40 + "a dog", replace="dog"), "replace", id="replace-past-the-tokens"),
    # Whole numbers past float's range: math.isfinite(10**400) raises OverflowError.
    pytest.param(_hostile(guidance_scale=10**400), "guidance_scale", id="guidance-10**400"),
    pytest.param(_hostile(control_image=_png_b64(EDGES), control_scale=10**400), "control_scale", id="control-scale-10**400"),
    pytest.param(_hostile(control_image=_png_b64(EDGES), control_end=10**400), "control_end", id="control-end-10**400"),
    pytest.param({**_NO_SUBJECT, "mix": [{**_PART, "weight": 10**400}]}, "mix[0].weight", id="mix-weight-10**400"),
    pytest.param(_hostile(reference_images=[_49MP] * 4), "reference_images[3]", id="4x49MP-photos"),
    pytest.param({**_NO_SUBJECT, "mix": [{**_PART, "reference_images": [_49MP]}] * 4}, "mix[3].reference_images[0]", id="mix-4x49MP"),
    pytest.param(_hostile(reference_images=[_49MP] * 3, control_image=_49MP), "reference_images[2]", id="control-and-3x49MP"),
    # 46 MB of [{}, {}, ...] parsed into 1.7 GB of Python objects: refused by its commas and brackets before parsing.
    pytest.param(b'{"prompt": "on the beach", "seed": [' + b"{}," * 20_000 + b"{}]}", "request", id="20000-objects"),
])
def test_a_hostile_body_is_a_400_naming_the_field_and_the_next_request_is_answered(model, payload, field):
    server = make_server(model)
    status, body = answer(server, payload)
    assert (status, body["field"]) == (400, field), body
    status, body = answer(server, zero_shot(seed=1))
    assert status == 200, body


@pytest.mark.parametrize("content_type, status", [
    ("text/plain", 415),  # what a form or another site's page sends without asking the browser first
    ("application/x-www-form-urlencoded", 415),  # curl -d without -H
    (None, 415),
    ("application/json; charset=utf-8", 200),
    ("Application/JSON", 200),
])
def test_a_body_that_is_not_sent_as_json_is_a_415(model, content_type, status):
    status_got, body = answer(make_server(model), zero_shot(), content_type)
    assert status_got == status, body
    if status == 415:
        assert body["field"] == "Content-Type" and "application/json" in body["error"], body


@pytest.mark.parametrize("method, path, status", [
    ("POST", "/v1/generat", 404),  # a typo was told "/v1/generat takes GET", as if the route were there
    ("PUT", "/v1/subjects/dog", 404),
    ("DELETE", "/nowhere", 404),
    ("POST", "/healthz", 405),
    ("PUT", "/", 405),
    ("GET", "/v1/generate", 405),
])
def test_a_path_that_is_no_route_is_a_404_whatever_the_method(model, method, path, status):
    scope = {"type": "http", "method": method, "path": path, "headers": [(b"content-type", b"application/json")],
             "query_string": b"", "scheme": "http", "server": ("127.0.0.1", 80), "root_path": ""}

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    response = asyncio.run(make_server(model)(Request(scope, receive)))
    body = json.loads(response.body)
    assert (response.status_code, body["field"]) == (status, "path" if status == 404 else "method"), body


def test_a_client_that_leaves_mid_body_is_answered_and_counted_not_a_stack_trace(model):
    """Starlette raises ClientDisconnect from the body's stream; a slow client that gives up
    (or a flood of them) must not log a stack trace each."""
    server, messages = make_server(model), [{"type": "http.request", "body": b'{"prompt": ', "more_body": True},
                                            {"type": "http.disconnect"}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    response = asyncio.run(server(request_of(receive)))
    assert response.status_code == 400 and json.loads(response.body)["field"] == "request"
    assert server.metrics.requests == [("invalid", 400)]


def test_out_of_memory_before_the_batch_is_a_503_and_the_next_request_is_answered(model, monkeypatch):
    """Decoding the photos (or loading a subject) can run out of memory too, before any batch."""
    import pipeline.serving.api as api

    server = make_server(model)
    fail_first_call(monkeypatch, api, "decode_reference_images", MemoryError())
    status, body = answer(server, zero_shot())
    assert status == 503 and "out of memory" in body["error"], body
    status, body = answer(server, zero_shot(seed=1))
    assert status == 200, body
    assert server.metrics.requests == [("invalid", 503), ("zero-shot", 200)]


def test_a_request_whose_encoding_fails_is_a_500_naming_it_and_its_batch_is_answered(model, monkeypatch):
    """Its PNG encoding (after its batch was finished, drawn.py) raised for one request: that
    request went to Serve as an unhandled exception, a plain-text 500 missing from the metrics.
    It is answered as a failed draw is; the rest of its batch gets its images, the next request too."""
    from pipeline.serving import app
    from pipeline.serving.batcher import BatchQueue
    from pipeline.serving.drawn import finish_jobs

    def encode(images, request, *args, **kwargs):
        if request.seed == 1:
            raise ValueError("cannot write mode RGBA as PNG")
        return image_answer(images, request, *args, **kwargs)

    monkeypatch.setattr(app, "image_answer", encode)
    server = make_server(model)
    server.batches = BatchQueue(server.engine.draw, ThreadPoolExecutor(1), 8, 0.05, finish=finish_jobs,
                                finisher=ThreadPoolExecutor(1))

    async def batch_then_next():
        batch = await asyncio.gather(*(server(post(zero_shot(seed))) for seed in range(3)))
        return batch, await server(post(zero_shot(seed=3)))

    batch, after = asyncio.run(batch_then_next())
    failed = json.loads(batch[1].body)
    assert (batch[1].status_code, failed["field"]) == (500, "request") and "ValueError" in failed["error"], failed
    assert [r.status_code for r in (batch[0], batch[2], after)] == [200, 200, 200]
    assert sorted(server.metrics.requests) == [("zero-shot", 200)] * 3 + [("zero-shot", 500)]


def test_images_are_encoded_off_the_event_loop(model, monkeypatch):
    """PNG encoding takes tens of ms an image at 512 px; on the event loop it stalls every other
    request, so it runs on a worker thread."""
    from pipeline.serving import app

    threads = []

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return image_answer(*args, **kwargs)

    async def call(server):
        loop_thread = threading.current_thread()
        response = await server(post(zero_shot()))
        return loop_thread, response

    monkeypatch.setattr(app, "image_answer", recording)
    loop_thread, response = asyncio.run(call(make_server(model)))
    assert response.status_code == 200 and len(threads) == 1 and threads[0] is not loop_thread


def test_the_body_is_parsed_off_the_event_loop(model, monkeypatch):
    """json.loads of a 48 MB body (serve.max_request_mb) takes about a second: on the event loop
    it stalls every other request's reading and answering."""
    from pipeline.serving import api, app

    threads = []

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return api.read_json(*args, **kwargs)

    async def call(server):
        return threading.current_thread(), await server(post(zero_shot()))

    monkeypatch.setattr(app, "read_json", recording)
    loop_thread, response = asyncio.run(call(make_server(model)))
    assert response.status_code == 200 and len(threads) == 1 and threads[0] is not loop_thread


def test_a_device_failure_makes_the_replica_unhealthy_so_serve_replaces_it(model, monkeypatch):
    """A CUDA error other than running out of memory (an illegal address, a launch failure)
    leaves the device unusable: every later request would fail too. The request gets its 500,
    and Ray Serve's health check (`check_health`) fails from then on, so Serve starts a new
    replica. Running out of memory is the request's alone: the replica stays healthy."""
    import torch

    server = make_server(model)
    server.check_health()  # healthy at the start
    draw = server.engine.draw
    failures = iter([torch.OutOfMemoryError("CUDA out of memory"), torch.AcceleratorError("CUDA error: an illegal memory access was encountered")])

    def failing(jobs):
        error = next(failures)
        for job in jobs:
            job.images, job.error = None, error
        return jobs

    monkeypatch.setattr(server.engine, "draw", failing)
    server.batches = BatchQueue(server.engine.draw, ThreadPoolExecutor(1), 8, 0.0)
    first = asyncio.run(server(post(zero_shot(seed=0))))
    assert first.status_code == 503
    server.check_health()  # memory: still healthy
    second = asyncio.run(server(post(zero_shot(seed=1))))
    assert second.status_code == 500
    with pytest.raises(RuntimeError, match="illegal memory access"):
        server.check_health()
    status, health = get(server, "/healthz")
    assert status == 503 and "illegal memory access" in health["status"]
    monkeypatch.setattr(server.engine, "draw", draw)
