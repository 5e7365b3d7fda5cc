"""The worker's view of Ray Train, in one place: rank, device, data shard, DDP, checkpoints.

The loop and the hooks call these instead of Ray or torch.distributed, so rank checks go through
`is_main_process()` and one worker (no process group of size > 1) needs no special case. Valid
inside a Ray Train worker (`TorchTrainer`), or inside `local_run(...)`: one worker without Ray
Train (finetune-many's actors, which train subject after subject in one process), where the
checkpoints go to the run folder in the layout Ray Train's storage uses (<run_folder>/<name>/),
so resuming works across both.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed
from ray.data.collate_fn import NumpyBatchCollateFn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.paths import remove_tree

log = logging.getLogger(__name__)

TRAIN_DATASET = "train"
_PARTIAL = ".partial-"  # prefix of a checkpoint folder being written (never resumed from)
# {"step": N, "files": {relative path: bytes}}, written last into a checkpoint: small, so the
# driver need not load the optimizer state, and the record that every other file is whole.
PROGRESS = "progress.json"


@dataclass
class LocalRun:
    """One worker, rank 0 of 1, without Ray Train.

    shard: this worker's data, with Ray's DataIterator.iter_torch_batches (one call per epoch);
    run_folder: where checkpoints go (<storage_path>/<run_name>); keep: newest checkpoints kept
    (None: all, where a hook bounds them: a validating fine-tune keeps its best).
    """

    shard: Any
    run_folder: Path
    device: torch.device
    keep: int | None = 1


_local: LocalRun | None = None


@contextlib.contextmanager
def local_run(run: LocalRun) -> Iterator[None]:
    """Inside: the functions of this module serve `run` instead of Ray Train."""
    global _local
    if _local is not None:
        raise RuntimeError("a local run is already active in this process")
    _local = run
    try:
        yield
    finally:
        _local = None


def rank() -> int:
    return 0 if _local is not None else ray.train.get_context().get_world_rank()


def world_size() -> int:
    return 1 if _local is not None else ray.train.get_context().get_world_size()


def is_main_process() -> bool:
    """True on the worker that logs, samples and writes checkpoints (global rank 0)."""
    return rank() == 0


def device() -> torch.device:
    """This worker's device: its GPU under `use_gpu`, else the CPU."""
    return _local.device if _local is not None else ray.train.torch.get_device()


def prepare(module: nn.Module, find_unused_parameters: bool) -> nn.Module:
    """Move `module` to this worker's device and wrap it in DDP when there are several workers
    (NCCL on GPUs, gloo on CPUs: Ray Train's TorchConfig picks the backend).

    find_unused_parameters: set when a step may leave trainable parameters out of the graph
    (a micro-batch whose subjects are all dropped never reaches the Q-Former).
    """
    if _local is not None:
        return module.to(_local.device)
    return ray.train.torch.prepare_model(
        module, parallel_strategy_kwargs={"find_unused_parameters": find_unused_parameters}
    )


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def sync_gradients(module: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Context for one micro-batch's forward and backward: DDP all-reduces gradients only when
    `sync` (the last micro-batch of an accumulation), so accumulation costs one all-reduce."""
    if sync or not isinstance(module, DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


def mean_over_workers(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of a small float tensor over all workers (a collective: every rank calls it)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1:
        values = values.clone()
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
        values /= world_size()
    return values


class _Collate(NumpyBatchCollateFn):
    """Numeric columns -> tensors (on the CPU; the loop moves them), string columns -> lists."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return {
            # A copy where Ray hands out a read-only view (torch wants writable memory).
            name: column.tolist() if column.dtype == object else torch.from_numpy(np.require(column, requirements=["C", "W"]))
            for name, column in batch.items()
        }


class BatchStream:
    """This worker's share of the training dataset, epoch after epoch, in full batches.

    Ray Train splits the dataset equally, so every worker sees the same number of batches per
    epoch and the DDP collectives stay in step. `wait_s` adds up the seconds `next()` waited for
    a batch (the data pipeline's share of the wall time when it cannot keep up).
    """

    def __init__(
        self, batch_size: int, shuffle_buffer: int, collate_fn: Any = None, prefetch: int = 2, seed: int | None = None,
        first_epoch: int = 0,
    ) -> None:  # fmt: skip
        """collate_fn: rows -> batch (default `_Collate`; one with `at_epoch(epoch)` is asked for
        each epoch's); prefetch: batches made ahead in Ray Data's threads; seed: the local
        shuffle's, plus the epoch (None: a new order each run); first_epoch: the epoch the stream
        starts in (a resumed run's, pipeline.train.data.epoch_at_step).

        The first batch is asked for at once, in a thread: Ray Data starts executing the plan
        only at the first request, so the loop's setup (the model's load) and the plan's start
        overlap instead of following each other."""
        self.wait_s = 0.0
        self.first_batch_at: float | None = None  # time.time() when the loop received its first batch
        self._batches = self._epochs(batch_size, shuffle_buffer, collate_fn or _Collate(), prefetch, seed, first_epoch)
        self._first: queue.Queue | None = queue.Queue(maxsize=1)  # the first batch, or the exception making it raised
        threading.Thread(target=self._fetch_first, daemon=True, name="batch-stream-first").start()

    def _fetch_first(self) -> None:
        try:
            self._first.put(next(self._batches))
        except BaseException as exc:  # handed to the loop, which raises it
            self._first.put(exc)

    @staticmethod
    def _epochs(
        batch_size: int, shuffle_buffer: int, collate_fn: Any, prefetch: int, seed: int | None, first_epoch: int
    ) -> Iterator[dict[str, Any]]:
        shard = _local.shard if _local is not None else ray.train.get_dataset_shard(TRAIN_DATASET)
        epoch = first_epoch
        while True:
            yield from shard.iter_torch_batches(
                batch_size=batch_size,
                collate_fn=collate_fn.at_epoch(epoch) if hasattr(collate_fn, "at_epoch") else collate_fn,
                local_shuffle_buffer_size=shuffle_buffer or None,
                local_shuffle_seed=None if seed is None or not shuffle_buffer else seed + epoch,
                drop_last=True,
                prefetch_batches=prefetch,
            )
            epoch += 1

    def close(self) -> None:
        """Nothing to stop: Ray Data's prefetch threads end with its iterator."""

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, Any]:
        start = time.perf_counter()
        if self._first is not None:  # the thread's; the generator is this thread's from then on
            batch, self._first = self._first.get(), None
            if isinstance(batch, BaseException):
                raise batch
        else:
            batch = next(self._batches)
        self.wait_s += time.perf_counter() - start
        if self.first_batch_at is None:
            self.first_batch_at = time.time()
        return batch


@contextlib.contextmanager
def resume_folder(run_folder: str | None = None) -> Iterator[Path | None]:
    """The newest checkpoint of this run as a local folder (a restart after a failure, or a rerun
    with the same run name and storage path), or None for a fresh start. run_folder:
    <storage_path>/<run_name>, looked in when Ray Train hands no checkpoint."""
    if _local is not None:
        yield newest_checkpoint(_local.run_folder)
        return
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        # Ray Train hands a worker group restarted after a failure no checkpoint when its
        # dataset is a union of passes (`training_passes` > 1; tests/train/test_trainer.py's kill
        # test), though the run folder holds the ones it reported. On local or mounted storage
        # the folder is the record; a URI (cloud storage) is left to Ray.
        local = run_folder is not None and "://" not in run_folder
        yield newest_checkpoint(Path(run_folder)) if local else None
        return
    with checkpoint.as_directory() as folder:
        yield Path(folder)


def report(metrics: dict[str, float], folder: Path | None, name: str | None = None) -> None:
    """Report metrics, and the checkpoint in `folder` (rank 0 passes it, the others None), stored
    as <storage_path>/<run_name>/<name>. Every rank calls it at the same step."""
    if _local is not None:
        if folder is not None:
            _store_checkpoint(folder, _local.run_folder, name or f"checkpoint-{time.time_ns()}", _local.keep)
        return
    checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder is not None else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


def newest_checkpoint(run_folder: Path) -> Path | None:
    """The newest complete checkpoint folder (step-NNNNNNN) of a run, or None. Ray Train copies a
    reported checkpoint straight into its final folder, so one whose copy was killed has files
    missing or short: it is skipped, with a warning, for the one before."""
    for folder in sorted((p for p in Path(run_folder).glob("step-*") if p.is_dir()), reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        log.warning("skipping %s: incomplete checkpoint (%s; a save or upload killed midway?)", folder, problem)
    return None


def write_progress(folder: Path, step: int) -> None:
    """Record `step` and the size of every file under `folder`, last, so that
    `checkpoint_problem` can tell a whole checkpoint from a partly copied one."""
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / PROGRESS).write_text(json.dumps({"step": step, "files": files}) + "\n")


def checkpoint_problem(folder: Path) -> str | None:
    """What is missing or short in a checkpoint folder, or None when it is whole. A progress
    record without a file list (older releases) is taken as whole."""
    try:
        record = json.loads((folder / PROGRESS).read_text())
    except FileNotFoundError:
        return f"no {PROGRESS}"
    except (OSError, ValueError, RecursionError) as exc:
        return f"unreadable {PROGRESS}: {exc}"
    # The driver reads the step (trainer.checkpoint_step) and the sizes below: a record of
    # another shape was a TypeError or KeyError stack trace there.
    files = record.get("files", {}) if isinstance(record, dict) else None
    step = record.get("step") if isinstance(record, dict) else None
    if type(step) is not int or not isinstance(files, dict) or not all(type(n) is int for n in files.values()):
        return f"{PROGRESS} is not a {{step, files}} record"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} of {size} bytes"
    return None


def _store_checkpoint(folder: Path, run_folder: Path, name: str, keep: int | None) -> None:
    """Move the files of `folder` (the loop's temporary folder) to <run_folder>/<name>, under a
    partial name first so a killed move is never resumed from; then delete all but the newest
    `keep` checkpoints (None: none deleted)."""
    run_folder.mkdir(parents=True, exist_ok=True)
    partial, final = run_folder / f"{_PARTIAL}{name}", run_folder / name
    remove_tree(partial, run_folder)
    partial.mkdir()
    for child in Path(folder).iterdir():
        shutil.move(child, partial / child.name)
    remove_tree(final, run_folder)
    partial.rename(final)
    if keep is None:
        return
    # Only whole ones count: a half-copied newer one (a killed Ray Train upload) must not push the
    # last one a restart can resume from out of the newest `keep`.
    whole = [p for p in sorted(run_folder.glob("step-*")) if p.is_dir() and checkpoint_problem(p) is None]
    for old in whole[:-keep]:
        remove_tree(old, run_folder)
