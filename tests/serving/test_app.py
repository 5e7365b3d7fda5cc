"""`subjectforge serve` on loopback: one Serve app of the tiny profile for the whole module,
with 3 LoRA subjects and a textual-inversion subject registered in a SQLite store.

Bad requests get a 4xx naming the field and the next valid request is answered; concurrent
clients mixing zero-shot and registered subjects each get their subject's images for their
seed (those `subjectforge generate` draws); the page makes an image in headless Chromium; a
replica killed mid-request gives its client a 5xx, not a hang. The replica-killing test runs
last (pytest keeps the file's order): it restarts the replica.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from tests.imagefiles import photo, png_header_only
from tests.serve_subjects import make_subject, register_subject

LORAS = ("subjectforge-rex", "subjectforge-fido", "subjectforge-bolt")
TI = "subjectforge-tea"
STEPS = 2
ANSWER_S = 60  # a tiny 2-step request takes well under a second; a batch of the load test a few
START_S = 180  # Serve's controller and proxy, then the replica loads the model


@pytest.fixture(scope="module")
def registry(tmp_path_factory, mlflow_store):
    """(tracking URI, folder): the LoRA and textual-inversion subjects registered @champion."""
    root = tmp_path_factory.mktemp("serve-app")
    uri = mlflow_store(root)
    for seed, name in enumerate(LORAS, start=1):
        register_subject(uri, make_subject(root / name, "lora", seed), name)
    register_subject(uri, make_subject(root / TI, "textual-inversion", 9, category="teapot"), TI)
    return uri, root


@pytest.fixture(scope="module")
def server(ray_local, registry):
    """The Serve app on a free loopback port: its URL. Serve is shut down at teardown."""
    from ray import serve

    from pipeline.config import load_config
    from pipeline.serving.app import APP_NAME, build_app

    uri, _ = registry
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = load_config(overrides=["profile=tiny", f"tracking.uri={uri}", "serve.max_batch_size=4",
                                    "serve.batch_wait_timeout_s=0.05", "serve.max_request_mb=8", f"serve.port={port}"])
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": ANSWER_S})
    try:
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_S
        while call(url, "/healthz", timeout=5)[0] != 200:
            assert time.monotonic() < deadline, "the app did not answer /healthz"
            time.sleep(0.5)  # polling interval while the replica starts
        yield url
    finally:
        serve.shutdown()


def call(url, path, payload=None, timeout=ANSWER_S):
    """(HTTP status, parsed JSON or text) of GET `path`, or POST of `payload` (bytes or JSON)."""
    data = None if payload is None else payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except OSError:  # not listening yet, or the connection was cut
        return 0, None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def png_b64(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decoded(answer):
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(b))), dtype=np.int16) for b in answer["images"]])


def valid(seed=0, **fields):
    return {"prompt": "on the beach", "steps": STEPS, "seed": seed, "subject": f"models:/{LORAS[0]}@champion", **fields}


REFERENCE = photo(3, (96, 80))


def zero_shot(seed=0, **fields):
    return {"prompt": "on the beach", "steps": STEPS, "seed": seed, "height": 64, "width": 64,
            "reference_images": [png_b64(REFERENCE)], "category": "dog", **fields}


BAD = [
    pytest.param({"steps": 2, "subject": f"models:/{LORAS[0]}@champion"}, 400, "prompt", id="missing-prompt"),
    pytest.param(valid(num_images=0), 400, "num_images", id="num_images-0"),
    pytest.param(valid(num_images=-1), 400, "num_images", id="num_images--1"),
    pytest.param(valid(num_images=10_000), 400, "num_images", id="num_images-10000"),
    pytest.param(valid(steps=0), 400, "steps", id="steps-0"),
    pytest.param(valid(steps=100_000), 400, "steps", id="steps-100000"),
    pytest.param(valid(seed="abc"), 400, "seed", id="string-seed"),
    pytest.param(valid(prompt="x" * 100_000), 400, "prompt", id="100KB-prompt"),
    pytest.param(valid(height=60), 400, "height", id="size-not-multiple-of-8"),
    pytest.param(b'{"prompt": "on the beach", ', 400, "request", id="malformed-json"),
    pytest.param(b"[1, 2]", 400, "request", id="not-an-object"),
    pytest.param(valid(stepz=3), 400, "stepz", id="unknown-field"),
    # JSON's NaN: the pyfunc behind `mlflow models serve` cannot tell it from a missing value; this app refuses it.
    pytest.param(json.dumps(valid(guidance_scale=float("nan"))).encode(), 400, "guidance_scale", id="nan-guidance"),
    pytest.param(zero_shot(reference_images=["A" * (50 * 2**20)]), 413, "request", id="50MB-image"),
    pytest.param(zero_shot(reference_images=[base64.b64encode(png_header_only(30000, 30000)).decode()]), 400,
                 "reference_images[0]", id="image-bomb-header"),
    pytest.param(zero_shot(reference_images=["not base64!"]), 400, "reference_images[0]", id="bad-base64"),
    pytest.param(zero_shot(reference_images=[png_b64(REFERENCE)] * 7), 400, "reference_images", id="7-photos"),
    pytest.param(zero_shot(category=None), 400, "category", id="photos-without-category"),
    pytest.param(valid(reference_images=[png_b64(REFERENCE)], category="dog"), 400, "subject", id="subject-and-photos"),
    pytest.param(valid(subject="models:/subjectforge-nobody@champion"), 404, "subject", id="unknown-subject"),
    pytest.param(valid(subject=f"models:/{LORAS[0]}@nosuchalias"), 404, "subject", id="unknown-alias"),
    pytest.param(valid(subject={"name": LORAS[0], "version": 99}), 404, "subject", id="unknown-version"),
    pytest.param(valid(subject="models:/../etc@x"), 400, "subject.name", id="path-in-name"),
]


@pytest.mark.parametrize("payload, status, field", BAD)
def test_a_bad_request_is_a_4xx_naming_the_field_and_the_next_one_is_served(server, payload, status, field):
    got, answer = call(server, "/v1/generate", payload)
    assert (got, answer["field"]) == (status, field), answer
    assert "Traceback" not in answer["error"] and len(answer["error"]) < 2000
    got, answer = call(server, "/v1/generate", valid(seed=1, height=32, width=32))
    assert got == 200, answer
    assert decoded(answer).shape == (1, 32, 32, 3)


def test_routes_page_health_and_subjects(server):
    status, health = call(server, "/healthz")
    assert status == 200 and health["status"] == "ok" and health["device"] == "cpu"
    assert health["compiled_graphs"] == 0 and health["compile_mode"] == "off" and health["cudagraph_skips"] == 0  # serve.compile is off
    assert "total" in health["phase_means_s"] or health["phase_means_s"] == {"requests": 0}
    status, page = call(server, "/")
    assert status == 200 and '<form id="form">' in page and "app.js" in page
    assert call(server, "/app.js")[0] == 200
    status, listing = call(server, "/v1/subjects")
    assert status == 200
    assert {m["name"]: m["aliases"] for m in listing["subjects"]} == {name: {"champion": "1"} for name in (*LORAS, TI)}
    assert call(server, "/nowhere")[0] == 404
    assert call(server, "/v1/generate")[0] == 405  # GET


def expected_images(registry, tmp_path, subject, seed, num_images):
    """What `subjectforge generate` draws for the same subject, seed and settings."""
    uri, _ = registry
    out = tmp_path / f"{subject.replace('/', '_')}-{seed}-{num_images}"
    common = ["--prompt", "on the beach", "--steps", str(STEPS), "--seed", str(seed), "-n", str(num_images), "--out", str(out),
              "--profile", "tiny", "--set", f"tracking.uri={uri}", "--height", "64", "--width", "64"]
    if subject == "zero-shot":
        REFERENCE.save(tmp_path / "reference.png")
        args = ["generate", "--subject-image", str(tmp_path / "reference.png"), "--category", "dog", *common]
    else:
        args = ["generate", "--model", f"models:/{subject}@champion", *common]
    assert main(args) == 0
    return np.stack([np.asarray(Image.open(out / f"image_{i:03d}.png"), dtype=np.int16) for i in range(num_images)])


def test_concurrent_clients_each_get_their_subjects_images(server, registry, tmp_path):
    subjects = [*LORAS, TI, "zero-shot"]
    # (subject, seed, images): each subject at its own seed, one also at a second seed; 20 requests in all.
    keys = [(subject, 100 + i, 1 + i % 2) for i, subject in enumerate(subjects)] + [(LORAS[0], 200, 1)]
    plan = [keys[i % len(keys)] for i in range(20)]
    expected = {key: expected_images(registry, tmp_path, *key) for key in set(plan)}

    def ask(key):
        subject, seed, num_images = key
        if subject == "zero-shot":
            return call(server, "/v1/generate", zero_shot(seed, num_images=num_images))
        return call(server, "/v1/generate", valid(seed, num_images=num_images, subject=f"models:/{subject}@champion",
                                                  height=64, width=64))

    with ThreadPoolExecutor(len(subjects)) as pool:  # a warm-up round loads every subject once
        assert all(status == 200 for status, _ in pool.map(ask, [(s, 0, 1) for s in subjects]))
    rss_before = call(server, "/healthz")[1]["rss_bytes"]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, plan))
    rss_after = call(server, "/healthz")[1]["rss_bytes"]
    for key, (status, answer) in zip(plan, answers, strict=True):
        assert status == 200, (key, answer)
        assert (answer["subject"], answer["seed"]) == (key[0] if key[0] == "zero-shot" else key[0], key[1])
        assert answer["model_version"] == (None if key[0] == "zero-shot" else "1")
        # The same images up to float rounding of a batch shared with other requests (one level of 255).
        assert np.abs(decoded(answer) - expected[key]).max() <= 1, key
    assert rss_after - rss_before < 150 * 2**20, (rss_before, rss_after)  # flat after warm-up


def test_lora_subjects_alone_and_interleaved_draw_the_same(server):
    a, b = (valid(seed=7, subject=f"models:/{name}@champion", height=64, width=64) for name in LORAS[:2])
    status, alone = call(server, "/v1/generate", a)
    assert status == 200
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda p: call(server, "/v1/generate", p), [b, a, b, a]))
    assert all(status == 200 for status, _ in answers)
    for _, answer in answers[1::2]:
        assert np.abs(decoded(answer) - decoded(alone)).max() <= 1
    assert np.abs(decoded(answers[0][1]) - decoded(alone)).max() > 20


def test_a_registered_subject_mixed_with_itself_draws_the_subject(server):
    alone = valid(seed=4, subject=f"models:/{TI}@champion", height=64, width=64)
    status, expected = call(server, "/v1/generate", alone)
    assert status == 200, expected
    part = {"subject": f"models:/{TI}@champion", "weight": 0.5}
    mix = {k: v for k, v in alone.items() if k != "subject"} | {"mix": [part, {**part, "subject": {"name": TI, "version": "1"}}]}
    status, mixed = call(server, "/v1/generate", mix)
    assert status == 200 and (mixed["subject"], mixed["model_version"]) == ("mix", f"{TI}/1,{TI}/1"), mixed
    assert np.abs(decoded(mixed) - decoded(expected)).max() <= 1


METRICS_S = 60  # Ray's metrics agent exports what replicas recorded every few seconds


def test_the_apps_metrics_are_exported_in_prometheus_text(server, ray_local):
    """Per-subject request counts, queue time, batch size and image latency reach the node's
    Prometheus endpoint (Ray prefixes ray_; counters end in _total, histograms in _bucket)."""
    assert call(server, "/v1/generate", valid(seed=3, height=32, width=32))[0] == 200
    assert call(server, "/v1/generate", valid(subject="models:/subjectforge-nobody@champion"))[0] == 404
    port = ray_local._private.worker._global_node.metrics_export_port
    wanted = [f'subject="{LORAS[0]}"', "ray_subjectforge_requests_total", "ray_subjectforge_queue_seconds_bucket",
              "ray_subjectforge_batch_images_bucket", "ray_subjectforge_image_seconds_bucket", 'status="404"']
    deadline = time.monotonic() + METRICS_S
    while True:
        status, text = call(f"http://127.0.0.1:{port}", "/metrics", timeout=10)
        found = [line for line in (text if isinstance(text, str) else "").splitlines() if "subjectforge_" in line]
        if all(any(w in line for line in found) for w in wanted):
            break
        assert time.monotonic() < deadline, (status, [w for w in wanted if not any(w in line for line in found)])
        time.sleep(1.0)  # polling interval of the export
    [requests] = [line for line in found if line.startswith("ray_subjectforge_requests_total")
                  and f'subject="{LORAS[0]}"' in line and 'status="200"' in line]
    assert float(requests.rsplit(" ", 1)[1]) >= 1
    assert any(line.startswith("ray_subjectforge_requests_total") and 'status="404"' in line for line in found)


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="needs Debian's chromium and chromium-driver packages")
def test_the_page_makes_an_image_in_headless_chromium(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    REFERENCE.save(tmp_path / "dog.png")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.set_page_load_timeout(ANSWER_S)
        driver.get(server + "/")
        driver.find_element(By.ID, "photos").send_keys(str(tmp_path / "dog.png"))
        WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#previews img"))
        for field, value in (("category", "dog"), ("prompt", "on the beach")):
            driver.find_element(By.ID, field).send_keys(value)
        for field, value in (("steps", "2"), ("size", "64")):
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, ANSWER_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#images img"))
        image = driver.find_element(By.CSS_SELECTOR, "#images img")
        assert image.get_attribute("src").startswith("data:image/png;base64,")
        assert driver.execute_script("return arguments[0].naturalWidth", image) == 64
        assert "zero-shot" in driver.find_element(By.ID, "status").text
    finally:
        driver.quit()


def test_a_batch_whose_client_left_stops_and_the_next_request_is_drawn_at_once(server):
    """A client that leaves a long batch (8 images x 150 steps) used to leave the replica drawing
    it to the end, so the next request waited for it; now the batch stops after its step."""
    host, port = server.removeprefix("http://").split(":")
    started = time.monotonic()
    assert call(server, "/v1/generate", zero_shot(steps=30, num_images=8, height=256, width=256))[0] == 200
    thirty_steps = time.monotonic() - started
    body = json.dumps(zero_shot(steps=150, num_images=8, height=256, width=256)).encode()
    with socket.create_connection((host, int(port))) as client:
        client.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(1.0)  # the batch is drawing: 120 or more of its steps are left
    started = time.monotonic()
    status, answer = call(server, "/v1/generate", valid(seed=2, height=32, width=32))
    assert status == 200, answer
    assert time.monotonic() - started < thirty_steps  # not queued behind the abandoned batch


def test_a_replica_killed_mid_request_gives_a_5xx_not_a_hang(server):
    pid = call(server, "/healthz")[1]["pid"]
    slow = zero_shot(steps=150, num_images=8, height=256, width=256)  # many seconds on the tiny model
    result = {}
    client = threading.Thread(target=lambda: result.update(answer=call(server, "/v1/generate", slow)))
    started = time.monotonic()
    client.start()
    time.sleep(1.0)  # let the request reach the replica and start denoising
    os.kill(pid, signal.SIGKILL)
    client.join(ANSWER_S + 10)
    assert not client.is_alive(), "the client hung"
    status, _ = result["answer"]
    assert status == 0 or status >= 500, result  # a cut connection or a 5xx
    assert time.monotonic() - started < ANSWER_S + 10
    deadline = time.monotonic() + START_S
    while True:  # Serve starts a new replica; until then requests may fail
        status, answer = call(server, "/v1/generate", valid(seed=1, height=32, width=32), timeout=30)
        if status == 200:
            break
        assert time.monotonic() < deadline, (status, answer)
        time.sleep(1.0)  # polling interval while the replica restarts
    assert call(server, "/healthz")[1]["pid"] != pid
