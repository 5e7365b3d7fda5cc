"""Requests a hostile client sent `subjectforge serve` (on loopback, tiny profile) that got past
the checks of api.py, requests.py, subjects.py and stages/decode.py: a photo whose decoding costs
far more than its pixels is a 400 before PIL parses it, an unknown subject in a mix names its part,
a client that leaves mid-body logs no stack trace, and no answer carries the registry's password.

What already behaved (malformed, nested and odd JSON, every field's types and ranges, subject
URIs, photos of every format, HTTP methods, paths and bodies) is covered by test_app.py,
test_server.py and the other modules here; this file holds only what failed."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import struct
import zlib

import pytest
from PIL import Image
from starlette.requests import Request

from pipeline.config import load_config
from pipeline.serving.api import ApiError, parse_generate
from pipeline.serving.app import SubjectServer
from pipeline.serving.subjects import SubjectLibrary

CONFIG = load_config(overrides=["profile=tiny"])
SECRET = "s3cret-pw"


class Statuses:
    """ServeMetrics' request counting, kept in a list (ServeMetrics needs Ray)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, int]] = []

    def record_request(self, subject: str, status: int) -> None:
        self.requests.append((subject, status))


def registry_server(uri: str) -> SubjectServer:
    """A SubjectServer with a registry and no model: enough for requests that end before a batch."""
    server = object.__new__(SubjectServer)
    server.config, server.uri, server.metrics = CONFIG, uri, Statuses()
    server.library = SubjectLibrary(uri, 4, 1e9)
    return server


def call(server: SubjectServer, method: str, path: str, payload: dict | None = None) -> tuple[int, dict]:
    body = b"" if payload is None else json.dumps(payload).encode()
    scope = {"type": "http", "method": method, "path": path, "headers": [(b"content-type", b"application/json")],
             "query_string": b"", "scheme": "http", "server": ("127.0.0.1", 80), "root_path": ""}

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    response = asyncio.run(server(Request(scope, receive)))
    return response.status_code, json.loads(response.body)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_registry_password_never_reaches_a_client(monkeypatch):
    """tracking.uri may carry a password (http://user:password@host, postgresql://...): registry
    errors named the URI, and MLflow's message the URL it called, in the answer to anyone."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries take minutes
    server = registry_server(f"http://alice:{SECRET}@127.0.0.1:{closed_port()}")
    generate = {"prompt": "on the beach", "steps": 2, "subject": "models:/subjectforge-dog@champion"}
    for status, body in (call(server, "POST", "/v1/generate", generate), call(server, "GET", "/v1/subjects")):
        assert (status, body["field"]) == (503, "registry"), body
        assert SECRET not in json.dumps(body) and "alice:***@127.0.0.1" in body["error"], body


def test_an_unknown_subject_in_a_mix_is_a_404_naming_its_part(tmp_path, mlflow_store):
    # It named `subject`, a field a mix request must not give.
    server = registry_server(mlflow_store(tmp_path))
    mix = [{"subject": "models:/subjectforge-nobody@champion"}]
    status, body = call(server, "POST", "/v1/generate", {"prompt": "on the beach", "steps": 2, "mix": mix})
    assert (status, body["field"]) == (404, "mix[0].subject"), body
    assert "subjectforge-nobody" in body["error"]


def test_a_client_that_leaves_mid_body_under_serve_is_answered_and_counted_not_a_stack_trace():
    """Under Ray Serve a client gone mid-body reaches the replica as the proxy's cancelled
    receive (TaskCancelledError raised from the body's stream), not starlette's ClientDisconnect:
    it left the request's task with an exception nobody retrieved, a stack trace logged for each
    such client."""
    from ray.exceptions import TaskCancelledError

    server, messages = registry_server("sqlite:///unused.db"), [{"type": "http.request", "body": b'{"prompt": ', "more_body": True}]

    async def receive():
        if messages:
            return messages.pop(0)
        raise TaskCancelledError()

    scope = {"type": "http", "method": "POST", "path": "/v1/generate", "headers": [(b"content-type", b"application/json")],
             "query_string": b"", "scheme": "http", "server": ("127.0.0.1", 80), "root_path": ""}
    response = asyncio.run(server(Request(scope, receive)))
    assert response.status_code == 400 and json.loads(response.body)["field"] == "request"
    assert server.metrics.requests == [("invalid", 400)]


def progressive_jpeg(repeats: int = 0) -> bytes:
    """A 64 px progressive JPEG, its last scan repeated `repeats` more times: each repeat is a few
    bytes, and PIL decodes it over the whole image again (libjpeg only warns)."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    last_scan = data[data.rindex(b"\xff\xda"):-2]  # up to the end-of-image marker
    return data[:-2] + last_scan * repeats + data[-2:]


def png_with_chunks(empty_chunks: int = 0) -> bytes:
    """A 64 px PNG with `empty_chunks` empty private chunks before its pixels: 12 bytes each, and
    PIL parses each in Python and keeps it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pixels = zlib.compress(b"".join(b"\0" + b"\x80" * 3 * 64 for _ in range(64)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0))
            + chunk(b"abCd", b"") * empty_chunks + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def gif_with_blocks(blocks: int = 0) -> bytes:
    """A 64 px GIF whose first image follows a comment of `blocks` 1-byte blocks: 2 bytes each,
    and PIL reads each in Python."""
    buffer = io.BytesIO()
    Image.new("P", (64, 64)).save(buffer, "GIF")
    data = buffer.getvalue()
    image = data.index(b"\x2c")  # the image descriptor, after the header and colour table
    return data[:image] + b"\x21\xfe" + b"\x01A" * blocks + b"\x00" + data[image:]


def tiff_with_strips(strips: int) -> bytes:
    """A 64 px gray TIFF whose pixels are listed as `strips` strips of a row: 8 bytes each, and
    PIL decodes each strip by a Python call."""
    def entry(tag: int, kind: int, count: int, value: int) -> bytes:
        return struct.pack("<HHII", tag, kind, count, value)

    offsets = 8 + 2 + 8 * 12 + 4  # after the header and the directory of 8 entries
    pixels = offsets + 8 * strips
    directory = [entry(256, 4, 1, 64), entry(257, 4, 1, 64), entry(258, 3, 1, 8), entry(259, 3, 1, 1),
                 entry(262, 3, 1, 1), entry(273, 4, strips, offsets), entry(278, 4, 1, 1), entry(279, 4, strips, offsets + 4 * strips)]
    return (b"II*\0" + struct.pack("<IH", 8, len(directory)) + b"".join(directory) + b"\0" * 4
            + struct.pack(f"<{strips}I", *[pixels + 64 * (i % 64) for i in range(strips)]) + struct.pack(f"<{strips}I", *[64] * strips)
            + b"\x80" * 64 * 64)


def bmp(rle: bool) -> bytes:
    """A 64 px gray BMP, run-length encoded (RLE8: a row is 64 pixels of one value) or not."""
    buffer = io.BytesIO()
    Image.new("L", (64, 64), 128).save(buffer, "BMP")
    if not rle:
        return buffer.getvalue()
    header = bytearray(buffer.getvalue()[:1078])  # file and info headers, then the 256-colour palette
    pixels = b"\x40\x80\x00\x00" * 64 + b"\x00\x01"  # each row: 64 x value 128, end of line; end of bitmap
    header[30:38] = struct.pack("<II", 1, len(pixels))  # compression RLE8, size of the pixels
    return bytes(header) + pixels


def zero_shot(photo: bytes) -> dict:
    return {"prompt": "on the beach", "steps": 2, "reference_images": [base64.b64encode(photo).decode()], "category": "dog"}


@pytest.mark.parametrize("bomb, expected", [
    # 550 KB of a 7000x7000 px JPEG repeating a 26-byte scan 10,000 times took 22 s of a core to
    # decode (45 s each for 3 such requests at once); a 48 MB body, many minutes.
    pytest.param(progressive_jpeg(300), "too many JPEG scans", id="jpeg-300-scans"),
    # 7 MB of 480,000 empty chunks took 16 s a request, the event loop's GIL included; 48 MB, minutes.
    pytest.param(png_with_chunks(20_000), "too many PNG chunks", id="png-20000-chunks"),
    # 4 MB of 1-byte GIF comment blocks took 1.3 s to open, three times a photo (header, size, decode).
    pytest.param(gif_with_blocks(20_000), "too many GIF blocks", id="gif-20000-blocks"),
    # An 8 MB TIFF of 64x64 px in 1,000,000 strips took 183 s to decode.
    pytest.param(tiff_with_strips(20_000), "too many TIFF tags, strips or tiles", id="tiff-20000-strips"),
    # Decoded in Python a pixel at a time: a 125 KB RLE4 BMP of 4000x4000 px took 2 s.
    pytest.param(bmp(rle=True), "unsupported BMP compression", id="rle-bmp"),
])
def test_a_photo_of_many_scans_chunks_blocks_or_strips_is_a_400_before_it_is_decoded(bomb, expected):
    for photo in (progressive_jpeg(), png_with_chunks(100), gif_with_blocks(100), tiff_with_strips(64), bmp(rle=False)):
        assert parse_generate(zero_shot(photo), CONFIG).subject.images[0].size == (64, 64)
    with pytest.raises(ApiError) as caught:
        parse_generate(zero_shot(bomb), CONFIG)
    assert (caught.value.status, caught.value.field) == (400, "reference_images[0]")
    assert expected in caught.value.message
