"""Fine-tuning end to end on a local Ray and a real MLflow server: `finetune` registers a
subject pyfunc, `promote` moves an alias, the model loads by alias in a fresh process, through
`generate --model models:/...` and `mlflow models serve`, and `finetune-many` goes on past a
subject with no usable photo."""

import base64
import csv
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.train.data import open_dataset
from pipeline.train.finetune import finetune_subject
from tests.imagefiles import photo
from tests.processes import stop_process_group
from tests.tinydata import publish_dataset

# One Ray Train worker and its data tasks on the 2-CPU test Ray; 64 px, 2 steps.
TRAIN = ["train.resolution=64", "train.cpus_per_worker=0.5", "train.data_cpus=0.5", "tracking.system_metrics=false", "finetune.lora_rank=2",
         "finetune.validation_steps=1"]


def _sets(*keys):
    return [arg for key in keys for arg in ("--set", key)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    publish_dataset(root, {"dog": "dog", "cat": "cat"}, per_subject=2)
    return root


@pytest.fixture(scope="module")
def registered(ray_local, dataset, mlflow_server, tmp_path_factory):
    out, runs = tmp_path_factory.mktemp("subjects"), tmp_path_factory.mktemp("runs")
    argv = [
        "finetune", "--profile", "tiny", "--subject", str(dataset), "--subject-id", "dog", "--method", "lora", "--steps", "2",
        "--out", str(out), *_sets(*TRAIN, f"train.storage_path={runs}", f"tracking.uri={mlflow_server}", "tracking.experiment=test-finetune"),
    ]
    assert main(argv) == 0
    return out / "dog-lora"


def test_lora_subject_is_small_and_registered_with_tags_and_alias(registered, dataset, mlflow_server):
    from mlflow import MlflowClient

    assert {p.name for p in registered.iterdir()} == {"subject.json", "subject_embeds.safetensors", "lora.safetensors"}
    size = sum(p.stat().st_size for p in registered.iterdir())
    assert size < 2**20  # tiny model; the real one's rank-4 LoRA is a few MB
    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias("subjectforge-dog", "candidate")
    tags = version.tags
    assert tags["method"] == "lora" and tags["subject_id"] == "dog" and tags["category"] == "dog"
    assert tags["dataset_version"] == "v0001" and tags["dataset_digest"] == open_dataset(str(dataset)).digest
    assert tags["base_model"].endswith("tiny-blipdiffusion") and len(tags["git_commit"]) >= 7 and tags["step"] == "2"
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.method"] == "lora" and "loss" in run.data.metrics
    # Validated at the end (finetune.validate_every 20 > 2 steps): the version carries its scores.
    assert {f"validation/{m}" for m in ("dino", "clip_i", "clip_t")} <= set(run.data.metrics)
    assert all(-1 <= float(tags[m]) <= 1 for m in ("dino", "clip_i", "clip_t")) and run.data.tags["selected_step"] == "2"
    # Only the subject's files are in the registry, not a copy of the base.
    files = [a.path for a in client.list_artifacts(version.run_id, "subject_model/artifacts/dog-lora")]
    assert sorted(p.rsplit("/", 1)[1] for p in files) == ["lora.safetensors", "subject.json", "subject_embeds.safetensors"]


def test_promote_then_load_by_alias_in_a_fresh_process(registered, mlflow_server):
    assert main(["promote", "subjectforge-dog", "--alias", "champion", "--set", f"tracking.uri={mlflow_server}"]) == 0
    code = (
        "import json, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model('models:/subjectforge-dog@champion')\n"
        "df = pd.DataFrame([{'prompt': 'on the beach', 'num_images': 2, 'seed': 1, 'steps': 2, 'guidance_scale': 2.0}])\n"
        "print(json.dumps(model.predict(df).to_dict('records')))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["prompt_index"] for r in records] == [0, 0]
    assert Image.open(io.BytesIO(base64.b64decode(records[0]["image"]))).size == (64, 64)


def test_generate_from_the_registry_and_clear_errors(registered, mlflow_server, tmp_path, capsys):
    assert main(["promote", "subjectforge-dog", "--alias", "champion", "--set", f"tracking.uri={mlflow_server}"]) == 0
    common = ["--prompt", "on the beach", "--steps", "2", "--set", f"tracking.uri={mlflow_server}"]
    assert main(["generate", "--model", "models:/subjectforge-dog@champion", "-n", "2", "--out", str(tmp_path / "g"), *common]) == 0
    assert Image.open(tmp_path / "g" / "image_001.png").size == (64, 64)
    capsys.readouterr()
    assert main(["generate", "--model", "models:/subjectforge-dog@nope", "--out", str(tmp_path / "x"), *common]) == 2
    assert "models:/subjectforge-dog@nope not found in the registry" in capsys.readouterr().err
    assert main(["generate", "--model", "models:/subjectforge-nobody@champion", "--out", str(tmp_path / "x"), *common]) == 2
    assert "subjectforge-nobody" in capsys.readouterr().err
    assert main(["promote", "subjectforge-nobody", "--alias", "champion", "--set", f"tracking.uri={mlflow_server}"]) == 2
    assert "subjectforge-nobody" in capsys.readouterr().err
    assert main(["promote", "subjectforge-dog", "--alias", "x", "--version", "99", "--set", f"tracking.uri={mlflow_server}"]) == 2
    assert not (tmp_path / "x").exists()


def test_served_model_answers_invocations(registered, mlflow_server, tmp_path):
    assert main(["promote", "subjectforge-dog", "--alias", "champion", "--set", f"tracking.uri={mlflow_server}"]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/subjectforge-dog@champion", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        body = json.dumps({"dataframe_records": [{"prompt": "on the beach", "steps": 2, "guidance_scale": 2.0}]}).encode()
        deadline = time.monotonic() + 180
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=120) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"model server did not answer: {(tmp_path / 'serve.log').read_text()[-3000:]}")
                time.sleep(1)
    finally:
        stop_process_group(proc)
        log.close()
    [prediction] = answer["predictions"]
    assert prediction["prompt_index"] == 0
    assert Image.open(io.BytesIO(base64.b64decode(prediction["image"]))).size == (64, 64)


def test_dreambooth_from_a_photo_folder_with_class_prior_images(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        photo(i, (80, 64)).save(photos / f"{i}.jpg")
    (photos / "notes.txt").write_text("not a photo")
    runs = tmp_path / "runs"
    config = load_config(overrides=[
        "profile=tiny", *TRAIN, f"train.storage_path={runs}", "tracking.enabled=false", f"finetune.subject={photos}",
        "finetune.subject_id=toy", "finetune.category=toy", "finetune.method=dreambooth", "finetune.steps=2",
        "finetune.batch_size=2", "finetune.prior_images=2", "finetune.prior_steps=1", f"finetune.out={tmp_path / 'out'}",
        "data.decode.size=64", "data.composite.per_photo=1",
    ])
    # In process (the path of a finetune-many actor): what is checked here is the photo folder's
    # inputs, the class prior images and the artifact; Ray Train's worker for one subject is
    # the `registered` fixture's, and starting one costs more than the 2 steps.
    result = finetune_subject(config, in_process=True)
    assert result.step == 2 and result.model_version is None
    assert sorted(p.name for p in (tmp_path / "out" / "toy-dreambooth").iterdir()) == ["subject.json", "unet.safetensors"]
    [inputs] = runs.glob("finetune-toy-dreambooth-*/inputs")  # the run name ends with the fine-tune's key
    captions = pq.read_table(inputs / "data" / "part-00000.parquet").column("caption").to_pylist()
    assert captions == ["", "", "<class-prior>", "<class-prior>"]
    assert len(list((inputs / "prior").glob("*.png"))) == 2 and len(list((inputs / "references").glob("*.png"))) == 2


def test_finetune_many_finishes_the_others_and_reports_a_failed_subject(ray_local, tmp_path, capsys):
    root = tmp_path / "ds"
    version = publish_dataset(root, {"dog": "dog", "broken": "toy"}, per_subject=2)
    part = version / "data" / "part-00000.parquet"
    table = pq.read_table(part).to_pylist()
    for row in table:
        if row["subject_id"] == "broken":  # no usable photo: every image is garbage
            row["image"] = row["composite"] = b"not an image"
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(part)), part)
    out = tmp_path / "out"
    argv = [
        "finetune-many", "--profile", "tiny", "--data", str(root), "--subjects", "dog,broken", "--method", "textual-inversion",
        "--steps", "2", "--out", str(out), *_sets(*TRAIN, f"train.storage_path={tmp_path / 'runs'}", "tracking.enabled=false"),
    ]
    assert main(argv) == 1
    printed = capsys.readouterr().out
    assert "1 of 2 subjects fine-tuned; failed: broken" in printed
    rows = {r["subject_id"]: r for r in csv.DictReader((out / "finetune-many.csv").open())}
    assert rows["dog"]["status"] == "ok" and rows["dog"]["attempts"] == "1" and int(rows["dog"]["artifact_bytes"]) > 0
    assert rows["dog"]["step"] == "2" and -1 <= float(rows["dog"]["dino"]) <= 1 and rows["broken"]["dino"] == ""
    assert rows["broken"]["status"] == "failed" and rows["broken"]["attempts"] == "2"  # retried once
    assert "no usable photo" in rows["broken"]["error"]
    assert (out / "dog-textual-inversion" / "subject_embeds.safetensors").is_file()
