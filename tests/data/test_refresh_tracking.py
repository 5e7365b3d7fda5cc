"""The scheduled refresh end to end on a local Ray and a real MLflow server: each `data refresh`
is a run (nothing new: a tagged run, no version; new photos: a version logged as the run's
dataset with its digest and parent), the manifest names the affected subjects, and
`finetune-many --affected` trains only those, reusing the registered version on a rerun."""

import csv
import json
import shutil
import socket

import pytest
from mlflow import MlflowClient

from pipeline.cli import main
from pipeline.data.build import dataset_digest
from pipeline.train.data import open_dataset
from tests.imagefiles import jpeg_bytes, make_source, photo
from tests.mlflowserver import mlflow_server_at
from tests.tinydata import publish_dataset

DATA = ["profile=tiny", "data.decode.size=64", "data.composite.per_photo=1", "tracking.data_experiment=test-data"]
TRAIN = ["train.resolution=64", "train.cpus_per_worker=0.5", "train.data_cpus=0.5", "tracking.system_metrics=false",
         "finetune.batch_size=2", "finetune.validation_steps=1", "tracking.experiment=test-refresh-finetune"]


def _sets(*keys):
    return [arg for key in keys for arg in ("--set", key)]


def _data_runs(uri):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("test-data")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    with mlflow_server_at(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture(scope="module")
def refreshed(ray_local, mlflow_server, tmp_path_factory):
    """A first refresh (v0001), one that finds nothing new, and one after a new dog photo (v0002)."""
    root = tmp_path_factory.mktemp("refresh")
    source = make_source(root / "src", {"dog": "dog", "cat": "cat"}, per_subject=2)
    out = root / "sf"
    argv = ["data", "refresh", "--source", str(source), "--out", str(out), "--no-progress", *_sets(*DATA, f"tracking.uri={mlflow_server}")]
    assert main(argv) == 0
    assert main(argv) == 0  # nothing new
    (source / "dog" / "new.jpg").write_bytes(jpeg_bytes(photo(5)))
    assert main(argv) == 0
    return out


@pytest.mark.slow
def test_nothing_new_is_a_tagged_run_and_no_version(refreshed, mlflow_server):
    client, runs = _data_runs(mlflow_server)
    assert [r.data.tags["subjectforge.data.status"] for r in runs] == ["built", "unchanged", "built"]
    quiet = runs[1]
    assert quiet.info.status == "FINISHED" and quiet.data.tags["subjectforge.data.nothing_new"] == "true"
    assert quiet.data.metrics["nothing_new"] == 1.0 and quiet.inputs.dataset_inputs == []
    assert quiet.data.tags["dataset_version"] == "v0001"  # what `latest` still is
    assert sorted(p.name for p in refreshed.iterdir() if p.name.startswith("v")) == ["v0001", "v0002"]


@pytest.mark.slow
def test_new_version_is_the_run_dataset_with_digest_parent_and_counts(refreshed, mlflow_server):
    client, runs = _data_runs(mlflow_server)
    first, _, second = runs
    for run, version, parent in ((first, "v0001", ""), (second, "v0002", "v0001")):
        [dataset_input] = run.inputs.dataset_inputs
        tags = {t.key: t.value for t in dataset_input.tags}
        manifest = json.loads((refreshed / version / "manifest.json").read_text())
        assert dataset_input.dataset.digest == dataset_digest(refreshed / version) == open_dataset(str(refreshed / version)).digest
        assert dataset_input.dataset.name == f"sf@{version}"
        assert tags["dataset_version"] == version and tags["parent_version"] == parent and tags["mlflow.data.context"] == "refresh"
        assert int(tags["rows"]) == manifest["rows"] and int(tags["accepted"]) == manifest["accepted"]
        assert run.data.metrics["nothing_new"] == 0.0 and run.data.metrics["new"] == manifest["new"]
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["manifest.json"]
    assert second.data.metrics["new"] == 1 and second.data.metrics["processed"] == 1 and second.data.metrics["affected_subjects"] == 1


@pytest.mark.slow
def test_affected_subjects_are_exactly_the_changed_one(refreshed):
    first = json.loads((refreshed / "v0001" / "manifest.json").read_text())
    second = json.loads((refreshed / "v0002" / "manifest.json").read_text())
    assert sorted(first["affected_subjects"]) == ["cat", "dog"]  # a first build: everything is new
    assert second["affected_subjects"] == {"dog": {"new": 1, "changed": 0, "removed": 0, "reprocessed": 0}}


@pytest.mark.slow
def test_finetune_many_affected_trains_only_that_subject_and_a_rerun_reuses_it(refreshed, mlflow_server, tmp_path, capsys):
    out = tmp_path / "subjects"
    argv = [
        "finetune-many", "--profile", "tiny", "--data", str(refreshed / "latest"), "--affected", "--method", "textual-inversion",
        "--steps", "2", "--out", str(out), *_sets(*TRAIN, f"train.storage_path={tmp_path / 'runs'}", f"tracking.uri={mlflow_server}"),
    ]
    assert main(argv) == 0
    rows = list(csv.DictReader((out / "finetune-many.csv").open()))
    assert [(r["subject_id"], r["status"]) for r in rows] == [("dog", "ok")]
    assert sorted(p.name for p in out.iterdir()) == ["dog-textual-inversion", "finetune-many.csv"]
    client = MlflowClient(mlflow_server)
    [version] = client.search_model_versions("name = 'subjectforge-dog'")
    assert version.tags["dataset_version"] == "v0002" and version.tags["dataset_digest"] == dataset_digest(refreshed / "v0002")
    capsys.readouterr()
    # The same fine-tune again (same base, method, data, subject, settings): the registered
    # version is reused, nothing is trained and nothing new is registered.
    assert main(argv) == 0
    assert "1 of 1 subjects fine-tuned" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "finetune-many.csv").open()))
    assert [(r["subject_id"], r["status"], r["model_version"]) for r in rows] == [("dog", "reused", version.version)]
    assert len(client.search_model_versions("name = 'subjectforge-dog'")) == 1


def test_finetune_many_with_no_affected_subject_exits_0_without_ray(tmp_path, capsys):
    version = publish_dataset(tmp_path / "ds", {"dog": "dog"})
    manifest = json.loads((version / "manifest.json").read_text())
    (version / "manifest.json").write_text(json.dumps({**manifest, "affected_subjects": {}}))
    argv = ["finetune-many", "--profile", "tiny", "--data", str(tmp_path / "ds"), "--affected", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    assert "no affected subjects" in capsys.readouterr().out
    shutil.rmtree(version)


def test_unreachable_tracking_server_stops_a_refresh_before_any_work(tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = make_source(tmp_path / "src", {"dog": "dog"}, per_subject=1)
    argv = ["data", "refresh", "--source", str(source), "--out", str(tmp_path / "sf"), *_sets(*DATA, f"tracking.uri=http://127.0.0.1:{port}")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"MLflow tracking server http://127.0.0.1:{port} does not answer" in err and "tracking.enabled=false" in err
    assert not (tmp_path / "sf").exists()
