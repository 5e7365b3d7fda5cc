"""The worker's view of Ray Train, in one place: rank, device, data shard, DDP, checkpoints.

The loop and the hooks call these instead of Ray or torch.distributed, so rank checks go through
`is_main_process()` and one worker (no process group of size > 1) needs no special case. Only
valid inside a Ray Train worker (`TorchTrainer`), except `unwrap`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
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

TRAIN_DATASET = "train"


def rank() -> int:
    return ray.train.get_context().get_world_rank()


def world_size() -> int:
    return ray.train.get_context().get_world_size()


def is_main_process() -> bool:
    """True on the worker that logs, samples and writes checkpoints (global rank 0)."""
    return rank() == 0


def device() -> torch.device:
    """This worker's device: its GPU under `use_gpu`, else the CPU."""
    return ray.train.torch.get_device()


def prepare(module: nn.Module, find_unused_parameters: bool) -> nn.Module:
    """Move `module` to this worker's device and wrap it in DDP when there are several workers
    (NCCL on GPUs, gloo on CPUs: Ray Train's TorchConfig picks the backend).

    find_unused_parameters: set when a step may leave trainable parameters out of the graph
    (a micro-batch whose subjects are all dropped never reaches the Q-Former).
    """
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

    def __init__(self, batch_size: int, shuffle_buffer: int, prefetch: int = 2) -> None:
        self.wait_s = 0.0
        self._batches = self._epochs(batch_size, shuffle_buffer, prefetch)

    @staticmethod
    def _epochs(batch_size: int, shuffle_buffer: int, prefetch: int) -> Iterator[dict[str, Any]]:
        shard = ray.train.get_dataset_shard(TRAIN_DATASET)
        while True:
            yield from shard.iter_torch_batches(
                batch_size=batch_size,
                collate_fn=_Collate(),
                local_shuffle_buffer_size=shuffle_buffer or None,
                drop_last=True,
                prefetch_batches=prefetch,
            )

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, Any]:
        start = time.perf_counter()
        batch = next(self._batches)
        self.wait_s += time.perf_counter() - start
        return batch


@contextlib.contextmanager
def resume_folder() -> Iterator[Path | None]:
    """The newest checkpoint of this run as a local folder (a restart after a failure, or a rerun
    with the same run name and storage path), or None for a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        yield Path(folder)


def report(metrics: dict[str, float], folder: Path | None, name: str | None = None) -> None:
    """Report metrics, and the checkpoint in `folder` (rank 0 passes it, the others None), stored
    as <storage_path>/<run_name>/<name>. Every rank calls it at the same step."""
    checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder is not None else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
