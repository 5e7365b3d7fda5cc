"""The precomputed inputs as flat arrays that each training worker reads itself.

Ray Data feeds raw rows, but once every row is encoded (`pipeline.train.data.precompute_inputs`)
a batch is only a gather of fixed-size rows. Streaming those through Ray Data's read tasks,
streaming split and object store costs a fifth of a GPU's time (BENCHMARKS.md, "Pretraining
job"), so the cache's Parquet parts are copied once into one raw file per tensor column
(`<cache>/arrays/<column>.npy`) that workers memory-map. A worker's batches are then
an index_select into page-locked memory in a background thread, which releases the GIL.

Order: epoch e visits every row once in the permutation seeded by (train.seed, e); worker r of
N takes the r-th of N equal slices of it, in batches (the last partial batch is dropped, as Ray
Data's drop_last does). The order depends on the seed and N only, not on which node finishes
first, and a resumed run continues at the very batch it stopped before.

Local and mounted storage only: a URI (`s3://...`) cannot be memory-mapped, and such runs keep
the Ray Data feed.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import ConfigError
from pipeline.paths import remove_tree

log = logging.getLogger(__name__)

ARRAYS = "arrays"
_INDEX = "index.json"  # written last: the arrays count only when it exists
_STRINGS = "strings.parquet"


def array_cache(cache: str, layout: dict[str, tuple[str, tuple[int, ...]]]) -> Path | None:
    """`<cache>/arrays`, made from the cache's Parquet parts the first time (`layout`: the tensor
    columns' numpy dtype and row shape, pipeline.train.data.read_tensor_layout). None when
    `cache` is a URI rather than a local or mounted folder."""
    if "://" in cache and not cache.startswith("file://"):
        log.info("precomputed inputs in %s are read through Ray Data: a URI cannot be memory-mapped", cache)
        return None
    root = Path(cache.removeprefix("file://"))
    folder = root / ARRAYS
    if (folder / _INDEX).is_file():
        return folder
    start = time.perf_counter()
    # A name no other job takes: drivers on two nodes (containers) can have the same pid.
    staging = root / f"{ARRAYS}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    _write_arrays(sorted(root.glob("*.parquet")), staging, layout)
    try:
        staging.rename(folder)
    except OSError:  # another job made them first: theirs are the same bytes
        remove_tree(staging, root)
    log.info("precomputed inputs copied into %s in %.0f s", folder, time.perf_counter() - start)
    return folder


def _write_arrays(files: list[Path], folder: Path, layout: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    arrays = {
        name: np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.dtype(dtype), shape=(rows, *shape))
        for name, (dtype, shape) in layout.items()
    }
    strings: dict[str, list[str]] = {}
    start = 0
    for file in files:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=256):
            count = batch.num_rows
            for name in batch.schema.names:
                column = batch.column(name)
                if name in arrays:
                    dtype, shape = arrays[name].dtype, arrays[name].shape[1:]
                    width = column.type.byte_width
                    data = np.frombuffer(column.buffers()[1], dtype, count=count * width // dtype.itemsize, offset=column.offset * width)
                    arrays[name][start : start + count] = data.reshape(count, *shape)
                elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                    strings.setdefault(name, []).extend(column.to_pylist())
            start += count
    for array in arrays.values():
        array.flush()
    pq.write_table(pa.table({name: pa.array(values, pa.string()) for name, values in strings.items()}), folder / _STRINGS)
    index = {"rows": rows, "columns": {name: [a.dtype.name, list(a.shape[1:])] for name, a in arrays.items()}}
    (folder / _INDEX).write_text(json.dumps(index))


def epoch_order(rows: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of row indices that epoch `epoch` visits."""
    return np.random.default_rng([seed, epoch]).permutation(rows)


class ArrayStream:
    """This worker's batches from `<cache>/arrays`, epoch after epoch, made ahead in a thread.

    Drop-in for pipeline.train.dist.BatchStream: iterating gives the loop's batch dicts (tensor
    columns as (B, ...) CPU tensors, page-locked when `pin`; string columns as lists), and
    `wait_s` adds up the seconds `next()` waited. consumed: batches this worker took before (a
    resumed run's step x grad_accum)."""

    def __init__(
        self, folder: Path | str, batch_size: int, *, rank: int, world_size: int, seed: int, consumed: int = 0,
        pin: bool = False, prefetch: int = 4,
    ) -> None:  # fmt: skip
        folder = Path(folder)
        if not (folder / _INDEX).is_file():  # made on the driver's node: storage must be shared
            raise ConfigError(f"train.storage_path: {folder} is not on this worker's node; use storage every node mounts")
        index = json.loads((folder / _INDEX).read_text())
        self.rows = index["rows"]
        share = self.rows // world_size
        self.batches_per_epoch = share // batch_size
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"train.batch_size: {batch_size} is more than each of {world_size} worker(s)' share of the {self.rows} rows"
            )
        # np.load with mmap_mode: the pages come from the file as rows are gathered, never all at once.
        self._tensors = {name: torch.from_numpy(np.load(folder / f"{name}.npy", mmap_mode="c")) for name in index["columns"]}
        strings = pq.read_table(folder / _STRINGS)
        self._strings = {name: strings.column(name).to_pylist() for name in strings.column_names}
        self.wait_s = 0.0
        self.first_batch_at: float | None = None  # time.time() when the loop received its first batch
        self._slice = (rank * share, rank * share + self.batches_per_epoch * batch_size)
        self._batch_size, self._seed, self._pin = batch_size, seed, pin
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(consumed,), daemon=True, name="array-stream")
        self._thread.start()

    def batch_indices(self, consumed: int) -> Iterator[np.ndarray]:
        """Row indices of each batch from the `consumed`-th on (sorted within a batch, so that
        the gather reads the file forwards)."""
        epoch, offset = divmod(consumed, self.batches_per_epoch)
        while True:
            mine = epoch_order(self.rows, self._seed, epoch)[self._slice[0] : self._slice[1]]
            for b in range(offset, self.batches_per_epoch):
                yield np.sort(mine[b * self._batch_size : (b + 1) * self._batch_size])
            epoch, offset = epoch + 1, 0

    def _gather(self, indices: np.ndarray) -> dict[str, Any]:
        index = torch.from_numpy(indices)
        batch: dict[str, Any] = {}
        for name, source in self._tensors.items():
            out = torch.empty((len(indices), *source.shape[1:]), dtype=source.dtype, pin_memory=self._pin)
            torch.index_select(source, 0, index, out=out)
            batch[name] = out
        for name, values in self._strings.items():
            batch[name] = [values[i] for i in indices]
        return batch

    def _produce(self, consumed: int) -> None:
        try:
            for indices in self.batch_indices(consumed):
                item = self._gather(indices)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as exc:  # handed to the loop, which raises it
            self._queue.put(exc)

    def close(self) -> None:
        self._stop.set()

    def __iter__(self) -> ArrayStream:
        return self

    def __next__(self) -> dict[str, Any]:
        start = time.perf_counter()
        item = self._queue.get()
        self.wait_s += time.perf_counter() - start
        if isinstance(item, BaseException):
            raise item
        if self.first_batch_at is None:
            self.first_batch_at = time.time()
        return item
