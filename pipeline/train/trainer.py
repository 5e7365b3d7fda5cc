"""The driver of a training job: check, set up Ray Train, fit, register. No math here.

`run_training(config)` checks the config, the dataset and the cluster before any worker starts
(ConfigError, exit 2), opens the MLflow run, builds the Ray Data plan, and runs
`pipeline.train.loop.train_loop` on `train.workers` workers with a `TorchTrainer`:
DDP over gloo (CPU) or NCCL (one GPU per worker), `FailureConfig(max_failures)` restarts from
the newest checkpoint, `CheckpointConfig(num_to_keep)` bounds storage, and the same
`RunConfig(name, storage_path)` makes a rerun resume where the last one stopped. At the end
the final checkpoint's model is registered in MLflow.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from pipeline import tracking
from pipeline.config import Config, ConfigError
from pipeline.model import CheckpointError, SubjectImageProcessor
from pipeline.model.checkpoint import MODEL_INDEX, read_json, resolve_checkpoint
from pipeline.paths import check_output_folder
from pipeline.raycluster import ensure_ray
from pipeline.train import dist
from pipeline.train.callbacks import StopAtEarlyOutOfMemory, StopAtUndecodableRows
from pipeline.train.data import (
    DatasetInfo,
    build_training_plan,
    ingest_config,
    online_settings,
    open_dataset,
    precompute_inputs,
    precompute_ready,
    sample_subjects,
    training_passes,
    undecodable_rows_refused,
)
from pipeline.train.ema import model_folder
from pipeline.train.hooks import RunInfo
from pipeline.train.loop import PROGRESS, train_loop
from pipeline.train.memory import check_optimizer, out_of_memory_explained
from pipeline.train.methods import get_method
from pipeline.train.speed import resolve_speed_settings

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_name: str
    checkpoint: str | None  # the final checkpoint folder in storage
    step: int
    dataset: DatasetInfo
    mlflow_run_id: str | None
    model_version: str | None  # the registered version, when tracking and register_as are on
    metrics: dict  # the last metrics reported (at the final checkpoint)


def check_training(config: Config) -> tuple[DatasetInfo, SubjectImageProcessor]:
    """Everything that can be checked without the cluster: the dataset has enough rows for the
    workers, the method exists, the optimizer's package is installed and the base model loads.
    Raises ConfigError naming the key."""
    train = config.train
    get_method(train.method)
    check_optimizer(train)
    check_storage(train.storage_path)
    info = open_dataset(train.data)
    if info.rows // train.workers < train.batch_size:
        raise ConfigError(
            f"train.batch_size: dataset {info.version} has {info.rows} rows, fewer than train.workers "
            f"({train.workers}) x train.batch_size ({train.batch_size}); every worker needs a full batch"
        )
    model = config.model_path("blip_diffusion")
    try:
        root = resolve_checkpoint(model)
        index = read_json(root / MODEL_INDEX)
        processor = SubjectImageProcessor.from_pretrained(root / "image_processor", mean=index.get("mean"), std=index.get("std"))
    except CheckpointError as exc:
        raise ConfigError(f"models.blip_diffusion: {exc}") from None
    return info, processor


def check_cluster(config: Config) -> None:
    """The running cluster can place every worker and still run the data tasks; otherwise Ray
    would wait for resources forever. Raises ConfigError."""
    train = config.train
    have = ray.cluster_resources()
    if train.gpu and have.get("GPU", 0) < train.workers:
        raise ConfigError(f"train.gpu: {train.workers} workers need {train.workers} GPUs; the cluster has {have.get('GPU', 0):g}")
    need = train.workers * train.cpus_per_worker + train.data_cpus
    if have.get("CPU", 0) < need:
        raise ConfigError(
            f"train.cpus_per_worker: {train.workers} workers x {train.cpus_per_worker:g} CPUs + {train.data_cpus:g} "
            f"for data tasks (train.data_cpus) = {need:g}, but the cluster has {have.get('CPU', 0):g} CPUs "
            "(fractions are allowed)"
        )


def storage_path(setting: str) -> str:
    """`train.storage_path` as Ray Train takes it: a URI as given, a local path made absolute."""
    return setting if "://" in setting else str(Path(setting).expanduser().resolve())


def check_storage(setting: str) -> None:
    """UserError naming train.storage_path when it is a local path that cannot be a folder (a
    file, or under one): Ray Train would fail on it only once the cluster and the data are up."""
    if "://" not in setting:
        check_output_folder(storage_path(setting), "train.storage_path")


# config.json keys that record who wrote a model, not what it is.
_WRITER_KEYS = ("torch_dtype", "dtype", "architectures")


def check_resume_model(config: Config, run_folder: Path) -> None:
    """ConfigError naming train.run_name when the run's newest checkpoint holds a model of another
    architecture than models.blip_diffusion: the loop resumes from the checkpoint's own model, so
    a run of the same name with another base trained on the old model without a word."""
    newest = dist.newest_checkpoint(run_folder) if config.train.method == "pretrain" else None
    if newest is None:
        return
    saved = newest / get_method("pretrain").MODEL_FOLDER
    try:
        # Local files only: a resume loads the checkpoint's model, not the base, and must not
        # start waiting for a download (or fail offline) for this check.
        base = resolve_checkpoint(config.model_path("blip_diffusion"), local_files_only=True)
    except CheckpointError as exc:
        log.warning("resuming %s without comparing its model to models.blip_diffusion (%s)", newest, exc)
        return
    for component in sorted(p.parent.name for p in base.glob("*/config.json")):
        try:
            ours, theirs = read_json(base / component / "config.json"), read_json(saved / component / "config.json")
        except CheckpointError as exc:
            raise ConfigError(f"train.run_name: cannot resume from {newest}: {exc}") from None
        differ = sorted(
            # Keys in both only: transformers writes only settings off their defaults, so a base
            # from the Hub may list a default that its saved copy leaves out.
            k for k in set(ours) & set(theirs)
            if not k.startswith("_") and not k.endswith("_version") and k not in _WRITER_KEYS and ours.get(k) != theirs.get(k)
        )
        if differ:
            raise ConfigError(
                f"train.run_name: the newest checkpoint of run {run_folder.name}, {newest}, is of another model than "
                f"models.blip_diffusion ({component}/config.json differs in {', '.join(differ[:5])}); give this run "
                "another --run-name or train.storage_path"
            )


def fit(config: Config, run_name: str, resources: dict[str, float], datasets: dict[str, Any], run: RunInfo, **loop_config: Any) -> Result:
    """Run `train_loop` on Ray Train: `train.workers` workers of `resources` each, DDP over gloo
    (CPU) or NCCL (GPUs), FailureConfig(max_failures) restarts from the newest checkpoint (not
    for rows whose image does not decode: StopAtUndecodableRows, then a ConfigError naming the
    row; nor for a GPU out of memory at an attempt's start: StopAtEarlyOutOfMemory, then a
    ConfigError naming the batch size), CheckpointConfig(keep_checkpoints) bounds storage (a
    validating fine-tune's hook does instead), and RunConfig(run_name, storage_path) makes a
    rerun resume where the last one stopped. The one TorchTrainer of pretraining and
    fine-tuning; `loop_config` goes to the loop beside the config and `run`."""
    train = config.train
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config.model_dump(mode="json"), "run": asdict(run), **loop_config},
        torch_config=TorchConfig(backend="nccl" if train.gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=train.workers, use_gpu=train.gpu, resources_per_worker=resources),
        dataset_config=ingest_config(train),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path(train.storage_path),
            failure_config=FailureConfig(max_failures=train.max_failures),
            # A validating fine-tune keeps its best checkpoints itself (hooks.Validation); Ray Train
            # would delete them by age.
            checkpoint_config=CheckpointConfig(num_to_keep=None if run.validation else train.keep_checkpoints),
            callbacks=[StopAtUndecodableRows(), StopAtEarlyOutOfMemory()],
        ),
        datasets=datasets,
    )
    with undecodable_rows_refused(run.dataset["path"]), out_of_memory_explained():
        return trainer.fit()


def finished_checkpoint(run_folder: str, steps: int) -> Path | None:
    """The run's newest checkpoint when it is at `steps` already (a rerun of a finished run, which
    need not start Ray Train, about a minute, to train nothing), else None. Only local storage is
    looked at."""
    if "://" in run_folder or (newest := dist.newest_checkpoint(Path(run_folder))) is None:
        return None
    return newest if checkpoint_step(newest) >= steps else None


def checkpoint_step(folder: Path) -> int:
    """The step a checkpoint folder was saved at (0 when it holds no progress record)."""
    progress = Path(folder) / PROGRESS
    return json.loads(progress.read_text())["step"] if progress.is_file() else 0


def run_training(config: Config) -> TrainResult:
    """Train `config.train.method` on `config.train.data`; see the module docstring."""
    job_start = time.time()
    info, processor = check_training(config)
    marks = {"checked": time.time()}  # the driver's startup phases, for the first step's log line
    # "auto" speed settings become values here, once, so the run records what it used.
    storage = storage_path(config.train.storage_path)

    def ready(train) -> bool:  # an earlier job's precomputed inputs, for the composite auto chose
        return precompute_ready(info, config.model_copy(update={"train": train}), storage)

    config = config.model_copy(update={"train": resolve_speed_settings(config.train, info.rows, info.has_cutout, ready)})
    train = config.train
    run_name = train.run_name or f"{train.method}-{info.version}"
    run_folder = f"{storage}/{run_name}"
    if "://" not in run_folder:
        # A file where the run's folder goes failed inside Ray Train, after the cluster started.
        check_output_folder(run_folder, "train.run_name")
        check_resume_model(config, Path(run_folder))
    ensure_ray(config.ray)
    check_cluster(config)
    marks["ray"] = time.time()
    uri = tracking.resolve_tracking_uri(config.tracking.uri) if config.tracking.enabled else None
    tags = {"dataset_version": info.version, "dataset_digest": info.digest, "git_commit": tracking.git_commit(), "method": train.method}
    with tracking.open_run(config.tracking, run_name, tags) as run_id:
        done = finished_checkpoint(run_folder, train.steps)
        if done is not None:
            log.info("%s is at step %d already (%s): nothing to train", run_name, train.steps, done)
            checkpoint, metrics = Checkpoint.from_directory(str(done)), {}
        else:
            result = _train(config, info, processor, run_name, run_folder, uri, run_id, job_start, marks)
            checkpoint, metrics = result.checkpoint, dict(result.metrics or {})
        step, version = 0, None
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                step = checkpoint_step(Path(folder))
                if uri and train.register_as:
                    model = model_folder(Path(folder), get_method(train.method).MODEL_FOLDER)  # the EMA copy when kept
                    version = _register(uri, run_id, model, train.register_as, tags | {"run_name": run_name, "step": str(step)})
    return TrainResult(run_name, checkpoint.path if checkpoint is not None else None, step, info, run_id, version, metrics)


def _train(
    config: Config, info: DatasetInfo, processor: SubjectImageProcessor, run_name: str, run_folder: str, uri: str | None,
    run_id: str | None, job_start: float, marks: dict[str, float],
) -> Result:
    """Build the data plan and fit (Ray Train's result: the final checkpoint and metrics).
    `marks`: the driver's startup phases so far (time.time()); "data" and "fit" are added and
    the workers log them all with their first step (hooks.StartupTimes)."""
    train = config.train
    passes = training_passes(info, config)
    online = online_settings(info, config, passes) if train.composite == "online" else None
    if train.precompute:
        with undecodable_rows_refused(info.path):  # the plan runs here, on the driver
            dataset = precompute_inputs(build_training_plan(info, config, processor), info, config, storage_path(train.storage_path), passes)
        info.precomputed = True
    else:
        dataset = build_training_plan(info, config, processor, passes)
    marks["data"] = time.time()
    run = RunInfo(
        run_name=run_name,
        run_folder=run_folder,
        tracking_uri=uri,
        mlflow_run_id=run_id,
        dataset=info.as_run_input(),
        samples=sample_subjects(info, train.samples.subjects) if train.samples.every else [],
    )
    log.info("training %s on %s (%d rows) with %d worker(s); checkpoints in %s", train.method, info.version, info.rows, train.workers, run_folder)
    # Memory-mapped precomputed inputs are read by each worker itself (pipeline.train.arraycache).
    datasets = {} if info.array_cache else {"train": dataset}
    marks["fit"] = time.time()
    return fit(config, run_name, {"CPU": train.cpus_per_worker}, datasets, run, job_start=job_start, online=online, marks=marks)


def _register(uri: str, run_id: str, folder: Path, name: str, tags: dict[str, str]) -> str:
    """Register the model in `folder` once per (run, step): a rerun that trained nothing new
    returns the version registered before."""
    existing = tracking.find_model_version(uri, name, {"run_name": tags["run_name"], "step": tags["step"]})
    return existing or tracking.register_model(uri, run_id, folder, name, tags)
