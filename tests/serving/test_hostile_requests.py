"""Requests a hostile client sent `subjectforge serve` (on loopback, tiny profile) that the
checks of api.py, requests.py and subjects.py let through: each now gets its 4xx at once, and no
answer carries a secret of the server's configuration.

What already behaved (malformed, nested and odd JSON, every field's types and ranges, subject
URIs, photos of every format, HTTP methods, paths and bodies) is covered by test_app.py,
test_server.py and the other modules here; this file holds only what failed."""

from __future__ import annotations

import asyncio
import json
import socket

from starlette.requests import Request

from pipeline.config import load_config
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
