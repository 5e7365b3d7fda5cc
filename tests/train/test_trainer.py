"""The pretraining job end to end on a local Ray: two gloo workers, a real MLflow server,
checkpoints, a killed worker and a rerun that resumes, and configs refused before any worker."""

import json
from collections import defaultdict

import pytest
import torch

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.model import BlipDiffusion
from pipeline.train.trainer import run_training
from tests.tinydata import publish_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    publish_dataset(root, {"dog": "dog", "cat": "cat"}, per_subject=2)
    return root


def settings(dataset, runs, *extra):
    """Two gloo workers on the 2-CPU test Ray (half a CPU each, one left for Ray Data), one
    fixed batch of all 4 rows per step (centre crops, no shuffle) and a high LR: the tiny
    model overfits it quickly, so the loss falls reliably."""
    return [
        "profile=tiny",
        f"train.data={dataset}",
        f"train.storage_path={runs}",
        "train.workers=2",
        "train.cpus_per_worker=0.5",
        "train.batch_size=2",
        "train.resolution=64",
        "train.crop=center",
        "train.shuffle_buffer=0",
        "train.lr=1e-3",
        "train.warmup_steps=0",
        "train.samples.steps=2",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(ray_local, dataset, mlflow_server, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    config = load_config(
        overrides=settings(
            # Twice settings' LR, and each step's loss logged: the loss falls clearly in 4 steps, and
            # on CPU each step is a Ray Data epoch of its own (about 2 s of task start-up on the
            # 2-core box). Two checkpoints, so that keep_checkpoints=1 has one to delete.
            dataset, runs, "train.steps=4", "train.lr=2e-3", "train.log_every=1", "train.checkpoint_every=2",
            "train.keep_checkpoints=1", "train.samples.every=4", f"tracking.uri={mlflow_server}", "tracking.experiment=test-pretrain",
        )
    )
    return run_training(config), runs


def test_two_workers_reduce_the_loss_and_keep_the_newest_checkpoint(trained, mlflow_server):
    from mlflow import MlflowClient

    result, runs = trained
    assert result.step == 4 and result.checkpoint.endswith("step-0000004")
    history = MlflowClient(mlflow_server).get_metric_history(result.mlflow_run_id, "loss")
    losses = {m.step: m.value for m in history}
    assert sorted(losses) == [1, 2, 3, 4]
    # Measured (seeded, each value 1 step x 4 samples): 1.19, 0.97, 0.95, 0.89 at steps 1-4, and
    # on to 0.74 at step 8.
    assert losses[4] < 0.85 * losses[1], losses
    kept = sorted(p.name for p in (runs / result.run_name).glob("step-*"))
    assert kept == ["step-0000004"]  # keep_checkpoints=1: step 2 was deleted


def test_checkpoint_loads_with_from_pretrained_and_holds_trained_weights(trained):
    result, _ = trained
    model = BlipDiffusion.from_pretrained(f"{result.checkpoint}/model")
    base = BlipDiffusion.from_pretrained(load_config(overrides=["profile=tiny"]).model_path("blip_diffusion"))
    changed = {name.split(".")[0] for name, p in model.named_parameters() if not torch.equal(p, base.get_parameter(name))}
    assert {"qformer", "text_encoder", "unet"} <= changed and "vae" not in changed
    vit = "qformer.visual_encoder.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(model.get_parameter(vit), base.get_parameter(vit))  # the ViT is frozen


def test_mlflow_run_has_params_metrics_dataset_images_and_registered_model(trained, mlflow_server, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    result, _ = trained
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.002" and run.data.params["train.workers"] == "2"
    assert run.data.params["models.blip_diffusion"] == "None" and run.data.params["profile"] == "tiny"
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "eta_s", "time_to_first_step_s", "data_wait_share"):
        assert key in run.data.metrics, key
    assert 0 < run.data.metrics["time_to_first_step_s"] < 600
    # Where the start-up went (hooks.StartupTimes): the driver's phases, then the worker's.
    startup = [run.data.metrics[f"startup_{phase}_s"] for phase in ("checked", "ray", "data", "fit", "worker", "model", "batch")]
    assert startup == sorted(startup) and startup[-1] < run.data.metrics["time_to_first_step_s"]
    assert run.data.tags["dataset_version"] == "v0001"

    [inp] = run.inputs.dataset_inputs
    assert inp.dataset.digest == result.dataset.digest and inp.dataset.name.endswith("@v0001")
    assert json.loads(inp.dataset.source)["uri"].endswith("/v0001")
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"

    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert any("samples" in p for p in images), images

    version = client.get_model_version("subjectforge-base", result.model_version)
    assert version.run_id == run.info.run_id
    assert version.tags["dataset_version"] == "v0001" and version.tags["dataset_digest"] == result.dataset.digest
    assert version.tags["step"] == "4" and len(version.tags["git_commit"]) >= 7
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    folder = mlflow.artifacts.download_artifacts(f"models:/subjectforge-base/{result.model_version}")
    BlipDiffusion.from_pretrained(folder)


def _attempts(step_log):
    """rank -> [(pid, start_step, [steps...]), ...] in the order the attempts ran."""
    out = {}
    for path in sorted(step_log.glob("rank-*.jsonl")):
        attempts = defaultdict(list)
        starts = {}
        for line in path.read_text().splitlines():
            row = json.loads(line)
            attempts[row["pid"]].append(row["step"])
            starts[row["pid"]] = row["start_step"]
        out[path.stem] = [(pid, starts[pid], steps) for pid, steps in attempts.items()]
    return out


# Fault injection, three Ray Train starts: in the slow set (README "Run the tests"), so the
# default suite keeps within CI's 20 minutes.
@pytest.mark.slow
def test_a_killed_worker_resumes_from_the_newest_checkpoint_and_a_rerun_continues(ray_local, dataset, tmp_path):
    runs, step_log = tmp_path / "runs", tmp_path / "steps"
    # Also covers precomputed inputs, and gradient accumulation (2 micro-batches of 1 per step,
    # some with every subject dropped, so DDP must allow unused Q-Former parameters: at
    # drop_subject_prob 0.5, the chance that none of the 24 micro-batches below is one is 2^-24).
    # The fewest steps that still tell the cases apart: a checkpoint (step 2), a step after it
    # that the kill loses (3), one more the restart trains (4) and one the rerun adds (5).
    common = settings(
        dataset, runs, "train.checkpoint_every=2", "train.log_every=4", "train.precompute=true", "train.max_failures=1",
        "train.batch_size=1", "train.grad_accum=2", "train.drop_subject_prob=0.5", f"train.step_log={step_log}",
        "train.run_name=resume", "train.samples.every=0", "tracking.enabled=false",
    )
    result = run_training(load_config(overrides=[*common, "train.steps=4", "train.fail_at_step=3"]))
    assert result.step == 4 and result.checkpoint.endswith("step-0000004")
    assert (runs / "resume" / "fault-injected-at-step-3").is_file()
    # Beside the runs, so other run names over the same data and model reuse it.
    assert list(runs.glob("precomputed-*/_PRECOMPUTE_DONE.json"))
    assert list(runs.glob("precomputed-*/parts-*/arrays/index.json"))  # each worker memory-maps them

    for rank, attempts in _attempts(step_log).items():
        (_, start1, first), (_, start2, second) = attempts
        assert start1 == 0 and first == [1, 2, 3], rank  # killed after step 3 (the last rank)
        # The restart begins right after the newest checkpoint (step 2): steps 1-2 are never
        # trained twice, 3 is redone because no checkpoint held it.
        assert start2 == 2 and second == [3, 4], rank

    # The same command with the same run name (and more steps) resumes at step 4.
    rerun = run_training(load_config(overrides=[*common, "train.steps=5"]))
    assert rerun.step == 5
    for rank, attempts in _attempts(step_log).items():
        _, start3, third = attempts[-1]
        assert (start3, third) == (4, [5]), rank


@pytest.mark.slow
def test_online_composites_train_from_precomputed_targets(ray_local, dataset, tmp_path):
    # The targets' VAE posteriors made once; the composite pasted and through the ViT each step.
    runs = tmp_path / "runs"
    config = load_config(
        overrides=settings(
            dataset, runs, "train.composite=online", "train.precompute=true", "train.steps=2", "train.checkpoint_every=2",
            "train.log_every=1", "train.samples.every=0", "tracking.enabled=false",
        )
    )
    result = run_training(config)
    assert result.step == 2 and result.checkpoint.endswith("step-0000002")
    assert (result.dataset.precomputed, result.dataset.precompute, result.dataset.array_cache) == (True, "made", None)
    assert list(runs.glob("precomputed-*/_PRECOMPUTE_DONE.json")) and not list(runs.glob("precomputed-*/parts-*/arrays"))
    assert torch.isfinite(torch.tensor(result.metrics["loss"]))


def test_bad_config_is_refused_before_any_worker_starts(dataset, tmp_path, monkeypatch, capsys):
    import pipeline.train.trainer as trainer

    def no_workers(*args, **kwargs):
        raise AssertionError("a TorchTrainer was built")

    monkeypatch.setattr(trainer, "TorchTrainer", no_workers)
    empty = tmp_path / "empty"
    publish_dataset(empty, {"dog": "dog"}, per_subject=0)
    runs = tmp_path / "runs"
    base = ["pretrain", "--profile", "tiny", "--set", f"train.storage_path={runs}", "--set", "tracking.enabled=false"]
    cases = [
        (["--data", str(dataset), "--workers", "0"], "train.workers"),
        (["--data", str(tmp_path / "nowhere")], "dataset not found"),
        (["--data", str(empty / "latest")], "has no rows"),
        (["--data", str(dataset), "--workers", "2", "--set", "train.batch_size=4"], "fewer than train.workers"),
        (["--data", str(dataset), "--set", f"train.storage_path={dataset / 'latest' / 'manifest.json'}"], "is not a folder"),
    ]
    for flags, message in cases:
        assert main(base + flags) == 2, flags
        assert message in capsys.readouterr().err, flags
    assert not runs.exists()


def test_a_finished_run_is_found_before_ray_train_starts(tmp_path):
    from pipeline.train.loop import PROGRESS
    from pipeline.train.trainer import finished_checkpoint

    run = tmp_path / "run"
    for step in (8, 10):
        (run / f"step-{step:07d}").mkdir(parents=True)
        (run / f"step-{step:07d}" / PROGRESS).write_text(json.dumps({"step": step}))
    assert finished_checkpoint(str(run), 10) == run / "step-0000010"
    assert finished_checkpoint(str(run), 11) is None  # more steps to train: Ray Train resumes
    assert finished_checkpoint(str(tmp_path / "new"), 10) is None
    assert finished_checkpoint("s3://bucket/run", 10) is None  # remote storage: Ray Train decides
