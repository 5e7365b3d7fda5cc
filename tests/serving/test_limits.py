"""A registered subject under a real `mlflow models serve` on loopback: requests beyond the
limits saved with the model get HTTP 400 naming the field, with no stack trace and no model
work, and a valid request right after them is answered."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image

from pipeline import tracking
from pipeline.config import PROFILE_MODELS, ServeLimits
from tests.processes import stop_process_group

MODEL_URI = "models:/subjectforge-dog@champion"
LIMITS = ServeLimits(max_steps=60)  # below the default 150: the served model must use the logged limits
START_S = 180  # the server imports torch and MLflow and loads the model before it listens
ANSWER_S = 60  # MLflow's own request timeout; a tiny 2-step request takes about a second


@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_store):
    """A tiny textual-inversion subject registered as subjectforge-dog@champion in a SQLite store."""
    from pipeline.model import BlipDiffusion
    from pipeline.model.subject import SubjectSpec, save_subject

    root = tmp_path_factory.mktemp("serve")
    uri = mlflow_store(root)
    tiny = PROFILE_MODELS["tiny"]["blip_diffusion"]
    model = BlipDiffusion.from_pretrained(tiny)
    embeds = model.encode_subject(Image.new("RGB", (64, 64), "brown"), "dog")
    save_subject(root / "dog", SubjectSpec("textual-inversion", "dog", "dog", tiny, 64), model, embeds)
    tracking.ensure_experiment(uri, "serve-limits", (root / "artifacts").as_uri())
    run_id = tracking.start_run(uri, "serve-limits", "finetune-dog")
    tracking.log_subject_model(uri, run_id, root / "dog", "subjectforge-dog", {"method": "textual-inversion"}, "champion", LIMITS)
    return root, uri


@pytest.fixture(scope="module")
def server(store):
    """`mlflow models serve` of the subject on a free loopback port; stopped at teardown."""
    root, uri = store
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = root / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", MODEL_URI, "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=root, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_S
        while not _pings(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the model server did not start: {log_path.read_text()[-3000:]}")
            time.sleep(0.5)  # polling interval while the server loads the model
        yield url
    finally:
        stop_process_group(proc)


def _pings(url):
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def invoke(url, payload, timeout=ANSWER_S):
    """(HTTP status, parsed JSON body) of POST /invocations."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def records(*rows):
    return {"dataframe_records": list(rows)}


ABUSIVE = [
    pytest.param(records({"prompt": "on the beach", "steps": 100_000}), "steps: must be 1..60", id="steps-100000"),
    pytest.param(records({"prompt": "on the beach", "steps": 61}), "steps: must be 1..60, got 61", id="steps-over-logged-limit"),
    pytest.param(records({"prompt": "on the beach", "num_images": 10_000}), "num_images: must be 1..8", id="num_images-10000"),
    pytest.param(records(*[{"prompt": "on the beach"}] * 10_000), "num_images: 10000 prompts", id="10000-rows"),
    pytest.param(records({"prompt": "x" * 2**20}), "prompt: has 1048576 characters; at most 2000", id="1MB-prompt"),
    pytest.param(records({"prompt": " ".join(["word"] * 200_000)}), "prompt: has 999999 characters", id="200000-words"),
    pytest.param(records({"prompt": None}), "prompt: must be a string, got null", id="null-prompt"),
    pytest.param(records({"prompt": 12}), "prompt: must be a string, got integer", id="number-prompt"),
    pytest.param(records({"prompt": "on the beach", "seed": "abc"}), "seed: must be a whole number", id="string-seed"),
    pytest.param(records({"prompt": "a", "seed": 1}, {"prompt": "b", "seed": True}), "seed: must be a whole number", id="bool-seed"),
    pytest.param({"dataframe_split": {"columns": ["prompt", "seed"], "data": [["a", 1.5]]}}, "seed: must be a whole number", id="float-seed"),
    pytest.param(records({"prompt": "on the beach", "stepz": 2}), "'stepz': unknown field", id="unknown-column"),
    pytest.param(records({"prompt": "a"}, {"prompt": "b", "control_image": "not base64!"}), "control_image: is not valid base64 (row 1)",
                 id="bad-control-image"),
    pytest.param(records({"prompt": "a", "control": "canny"}), "control: goes with control_image", id="control-without-image"),
]


@pytest.mark.parametrize("payload, words", ABUSIVE)
def test_a_request_beyond_the_limits_is_a_400_naming_the_field(server, payload, words):
    status, body = invoke(server, payload)
    assert status == 400, body[:2000]
    answer = json.loads(body)
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE" and words in answer["message"]
    assert "stack_trace" not in answer and "Traceback" not in answer["message"]
    assert len(body) < 10_000  # the message quotes a value or a prompt only in part


def test_malformed_json_is_a_4xx(server):
    status, _ = invoke(server, b'{"dataframe_records": [{"prompt": ')
    assert 400 <= status < 500


def test_a_valid_request_after_the_abusive_ones_is_answered(server):
    # Runs after the parametrized abusive requests above (pytest keeps the file's order).
    status, body = invoke(server, records({"prompt": "on the beach", "steps": 2, "num_images": 2, "guidance_scale": 2.0, "seed": 3}))
    assert status == 200, body[:2000]
    predictions = json.loads(body)["predictions"]
    assert [p["prompt_index"] for p in predictions] == [0, 0]
    assert Image.open(io.BytesIO(base64.b64decode(predictions[0]["image"]))).size == (64, 64)
    status, body = invoke(server, records({"prompt": "on the beach", "steps": 2, "height": 32, "width": 48, "seed": None}))
    assert status == 200, body[:2000]
    [prediction] = json.loads(body)["predictions"]
    assert Image.open(io.BytesIO(base64.b64decode(prediction["image"]))).size == (48, 32)
