"""Pretraining from Ray Data rows is repeatable on the CPU: the same settings, seed and dataset
give the same batches in the same order (pipeline/train/data.py ingest_config, the per-row
crops of stages.train_inputs.row_rngs) and so the same losses, run after run.

The feed is sharded as Ray Train shards it (the trainer's ingest_config, whose execution options
replace the dataset's), and the loop runs on one local worker (dist.local_run) rather than in a
TorchTrainer, which costs a minute to start."""

from __future__ import annotations

import functools
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from ray.data import DataContext

from pipeline.config import ASSETS_DIR, load_config
from pipeline.model import SubjectImageProcessor
from pipeline.train import dist, hooks, loop
from pipeline.train.data import build_training_plan, ingest_config, open_dataset
from pipeline.train.hooks import Hook, RunInfo
from stages.online_composite import CUTOUT_COLUMNS, prepare_cutout_batch
from stages.records import CATEGORY, COMPOSITE, IMAGE
from stages.train_inputs import PIXEL_VALUES, TARGET, prepare_batch
from tests.tinydata import publish_dataset

# Rows per data file, in the files' order: the long first file's task ends after the short
# ones', so a feed in the order tasks finish leaves the files' order.
_FILE_ROWS = [8, 2, 2, 2, 2, 2]


@pytest.fixture(scope="module")
def version(tmp_path_factory) -> Path:
    """A published version of 18 rows of 80 x 64 photos (a 64 px crop of one has 17 places) in
    data files of _FILE_ROWS rows, as a build writes several."""
    root = tmp_path_factory.mktemp("repeatable")
    subjects = {f"s{i}": ["dog", "cat", "vase"][i % 3] for i in range(6)}
    folder = publish_dataset(root / "ds", subjects, per_subject=3, size=(80, 64))
    single = folder / "data" / "part-00000.parquet"
    table = pq.read_table(single)
    single.unlink()
    start = 0
    for index, rows in enumerate(_FILE_ROWS):
        pq.write_table(table.slice(start, rows), folder / "data" / f"part-{index:05d}.parquet")
        start += rows
    assert start == table.num_rows
    return folder


@pytest.fixture
def unordered(monkeypatch):
    """The driver's Ray Data context as a fresh process has it (Ray's default: no order kept),
    put back after the test."""
    monkeypatch.setattr(DataContext.get_current().execution_options, "preserve_order", False)


def _config(version: Path, tmp_path: Path, *overrides: str):
    return load_config(
        overrides=[
            "profile=tiny",
            "tracking.enabled=false",
            f"train.data={version}",
            f"train.storage_path={tmp_path}",
            "train.composite=stored",
            "train.precompute=false",  # as the driver resolves "auto" on the CPU (speed.resolve_precompute)
            "train.resolution=64",
            "train.batch_size=2",
            *overrides,
        ]
    )


@functools.cache
def _processor() -> SubjectImageProcessor:
    return SubjectImageProcessor.from_pretrained(ASSETS_DIR / "tiny-blipdiffusion" / "image_processor")


def _shard(version: Path, config):
    """This run's feed as Ray Train's one worker gets it."""
    info = open_dataset(str(version))
    plan = build_training_plan(info, config, _processor())
    shards = ingest_config(config.train).configure({"train": plan}, world_size=1, worker_handles=None, worker_node_ids=None)
    return info, shards[0]["train"]


def _feed(shard) -> tuple[list[bytes], list[bytes]]:
    """Each row's PIXEL_VALUES and TARGET, as bytes, in the order the shard hands the rows on."""
    pixels, targets = [], []
    for batch in shard.iter_batches(batch_size=4, batch_format="numpy"):
        pixels += [row.tobytes() for row in batch[PIXEL_VALUES]]
        targets += [row.tobytes() for row in batch[TARGET]]
    return pixels, targets


def _in_file_order(version: Path, fn, columns, **kwargs) -> dict[str, list[bytes]]:
    """`fn`'s PIXEL_VALUES and TARGET of every row, file after file, row after row, as bytes: what
    a repeatable feed hands on (its seeded crops are a row's own, whatever batch it lands in)."""
    rows = {PIXEL_VALUES: [], TARGET: []}
    for file in open_dataset(str(version)).files:
        table = pq.read_table(file, columns=list(columns))
        out = fn({name: np.asarray(table.column(name).to_pylist(), dtype=object) for name in table.column_names}, **kwargs)
        for name in rows:
            rows[name] += [row.tobytes() for row in out.get(name, [])]
    return rows


def test_the_feed_keeps_the_datasets_row_order_and_crops(ray_local, version, tmp_path, unordered):
    config = _config(version, tmp_path, "train.crop=random")
    pixels, targets = _feed(_shard(version, config)[1])
    # In the files' order, each row with its own seeded crop: the same in every run.
    seed = config.train.seed
    expected = _in_file_order(version, prepare_batch, [CATEGORY, IMAGE, COMPOSITE], processor=_processor(), resolution=64, crop="random", seed=seed)
    assert pixels == expected[PIXEL_VALUES] and targets == expected[TARGET]


def test_online_composites_targets_keep_their_crops(ray_local, version, tmp_path, unordered):
    # The online plan crops its targets in stages.online_composite.prepare_cutout_batch.
    config = _config(version, tmp_path, "train.composite=online", "train.crop=random")
    targets = [row.tobytes() for batch in _shard(version, config)[1].iter_batches(batch_size=4, batch_format="numpy") for row in batch[TARGET]]
    expected = _in_file_order(version, prepare_cutout_batch, CUTOUT_COLUMNS, resolution=64, crop="random", seed=config.train.seed)
    assert len(targets) == 18 and targets == expected[TARGET]


def _losses(version: Path, tmp_path: Path, name: str, monkeypatch) -> list[float]:
    """The loop (one local worker on the Ray Data feed) for 3 steps: its losses."""
    # Weights that move (no warm-up) and subjects dropped at random: the steps after the first
    # depend on every draw of the first.
    steps = ["train.steps=3", "train.warmup_steps=0", "train.lr=1e-3", "train.drop_subject_prob=0.5"]
    config = _config(version, tmp_path, *steps)
    losses: list[float] = []

    class Losses(Hook):
        def after_loss(self, state, loss):
            losses.append(loss.item())

    monkeypatch.setattr(loop, "build_hooks", lambda *a: [*hooks.build_hooks(*a), Losses()])
    info, shard = _shard(version, config)
    folder = tmp_path / name
    run = RunInfo(name, str(folder), tracking_uri=None, mlflow_run_id=None, dataset=info.as_run_input())
    with dist.local_run(dist.LocalRun(shard=shard, run_folder=folder, device=torch.device("cpu"))):
        loop.train_loop({"config": config.model_dump(mode="json"), "run": asdict(run)})
    return losses


def test_two_runs_of_the_same_settings_log_the_same_losses(ray_local, version, tmp_path, monkeypatch, unordered):
    first = _losses(version, tmp_path, "first", monkeypatch)
    second = _losses(version, tmp_path, "second", monkeypatch)
    assert len(first) == 3 and first[0] != first[-1]
    assert second == first


def test_the_ingest_options_carry_no_deprecated_setting():
    """ingest_config builds its options without Ray Train's DataConfig.default_ingest_options,
    which sets ExecutionOptions.exclude_resources and so printed a RayDeprecationWarning in
    every pretraining job's log; the context's resource limits still carry over."""
    import warnings

    from ray.data import ExecutionResources

    context = DataContext.get_current()
    limits = context.execution_options.resource_limits
    context.execution_options.resource_limits = ExecutionResources(cpu=3)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # what DataConfig.configure gives each dataset's stream
            options = ingest_config(load_config(None).train)._resolve_execution_options("train")
    finally:
        context.execution_options.resource_limits = limits
    assert [str(w.message) for w in caught if "exclude_resources" in str(w.message)] == []
    assert options.resource_limits.cpu == 3
    assert options.preserve_order is True
