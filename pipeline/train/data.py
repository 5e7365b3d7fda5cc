"""Training data: the dataset version to train on, its Ray Data plan, and the feed's layout.

read Parquet -> decode, crop the target, preprocess the composite (CPU tasks) -> [precompute:
VAE posterior and ViT features, an actor per GPU, written once beside the runs] -> the
trainer's workers, which each iterate their equal share through `FeedCollate`. This module is
the only place that declares the resources of training-data stages.

The feed's layout (BENCHMARKS.md, "Pretraining job"): the precomputed cache stores each tensor
column as fixed-size binary (one C-order row per value, no dictionary), not as Ray's tensor
columns, which Parquet stores as nested lists whose reader decodes a level per element (~60
rows/s per core at 512 px, against ~1,100 as binary). `FeedCollate` stacks a batch's rows
straight into one (page-locked, on GPU workers) tensor per column, so the loop's copy to the
device is asynchronous.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import ray
import torch
from ray.data import ActorPoolStrategy, Dataset
from ray.data.collate_fn import ArrowBatchCollateFn

from pipeline.config import Config, ConfigError
from pipeline.data.versions import LATEST, MANIFEST
from stages.records import CATEGORY, COMPOSITE, SUBJECT_ID
from stages.train_inputs import CAPTION, INPUT_COLUMNS, FrozenEncoder, prepare_batch

log = logging.getLogger(__name__)

# Rows per map task batch: a 512 px batch of 16 is about 60 MB of float32 arrays.
_MAP_BATCH = 16
# Most passes over the rows in one Ray Data epoch (see `training_passes`).
MAX_PASSES = 8
_PRECOMPUTE_DONE = "_PRECOMPUTE_DONE.json"  # written last: the cache counts only when it exists
# Field metadata of a fixed-size binary tensor column: the row's numpy dtype and shape.
_DTYPE, _SHAPE = b"subjectforge.dtype", b"subjectforge.shape"

# column -> (numpy dtype name, row shape) of the fixed-size binary tensor columns
TensorLayout = dict[str, tuple[str, tuple[int, ...]]]


@dataclass
class DatasetInfo:
    """One published dataset version, as the trainer and MLflow see it."""

    name: str  # the dataset root's folder name
    version: str  # e.g. v0003
    path: str  # the version folder, absolute
    digest: str  # sha256 of its manifest.json (first 16 hex digits): what exactly was trained on
    rows: int
    files: list[str]
    subjects: list[str]  # subject ids with rows, sorted
    has_caption: bool
    precomputed: bool = False
    tensor_layout: dict[str, Any] = field(default_factory=dict)  # of the precomputed cache (TensorLayout)

    def as_run_input(self) -> dict[str, Any]:
        return asdict(self) | {"files": len(self.files), "subjects": len(self.subjects)}


def open_dataset(location: str | None) -> DatasetInfo:
    """Resolve `location` (a dataset root, its `latest`, or a version folder) to a version with
    rows. Raises ConfigError naming `train.data` when it is missing, unpublished or empty."""
    if not location:
        raise ConfigError("train.data: no dataset given (pass --data OUT/latest)")
    path = Path(location).expanduser()
    if not path.exists():
        raise ConfigError(f"train.data: dataset not found: {path}")
    if not (path / MANIFEST).is_file() and (path / LATEST).exists():
        path = path / LATEST
    path = path.resolve()
    if not (path / MANIFEST).is_file():
        raise ConfigError(f"train.data: {path} is not a dataset version (no {MANIFEST}; build one with `subjectforge data build`)")
    manifest_bytes = (path / MANIFEST).read_bytes()
    manifest = json.loads(manifest_bytes)
    files = sorted(str(p) for p in (path / "data").glob("*.parquet"))
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if rows == 0:
        raise ConfigError(f"train.data: dataset {manifest.get('version', path.name)} at {path} has no rows to train on")
    schema = pq.read_schema(files[0])
    subjects = sorted(s for s, entry in manifest.get("subjects", {}).items() if entry.get("rows", 0) > 0)
    return DatasetInfo(
        name=path.parent.name,
        version=manifest.get("version", path.name),
        path=str(path),
        digest=hashlib.sha256(manifest_bytes).hexdigest()[:16],
        rows=rows,
        files=files,
        subjects=subjects,
        has_caption=CAPTION in schema.names,
    )


def sample_subjects(info: DatasetInfo, count: int) -> list[dict[str, Any]]:
    """The first `count` subjects (in subject_id order) with one composite each: the fixed
    subjects of the sample images. Reads row groups until each is found, not the whole dataset."""
    wanted = set(info.subjects[:count])
    found: dict[str, dict[str, Any]] = {}
    for file in info.files:
        parquet = pq.ParquetFile(file)
        for group in range(parquet.num_row_groups):
            ids = parquet.read_row_group(group, columns=[SUBJECT_ID]).column(SUBJECT_ID).to_pylist()
            if not (wanted - found.keys()) & set(ids):
                continue
            rows = parquet.read_row_group(group, columns=[SUBJECT_ID, CATEGORY, COMPOSITE]).to_pylist()
            for row in rows:
                if row[SUBJECT_ID] in wanted and row[SUBJECT_ID] not in found:
                    found[row[SUBJECT_ID]] = row
            if len(found) == len(wanted):
                return [found[s] for s in sorted(found)]
    return [found[s] for s in sorted(found)]


def training_passes(info: DatasetInfo, config: Config) -> int:
    """How many passes over the rows one Ray Data epoch makes: the run's planned epochs, at most
    MAX_PASSES. Each Ray Data epoch starts its execution anew, and the workers wait for its first
    batch (seconds: ~30% of the job's time on one H100 at 1,024 rows, whose epoch lasted 32 steps);
    a union of several passes in one epoch pays that once per MAX_PASSES passes. (Not a
    repeated file list: Ray Data reads a file once however often it is listed.) One pass on CPU
    runs: a union's row order follows which node's tasks finish first, so the same settings on
    one node and on two trained on different batches (tests/test_multinode.py); a GPU run, whose
    kernels are not bit-reproducible across layouts anyway, takes the throughput."""
    train = config.train
    if not train.gpu:
        return 1
    planned = train.steps * train.batch_size * train.grad_accum * train.workers / max(info.rows, 1)
    return max(1, min(MAX_PASSES, math.ceil(planned)))


def build_training_plan(info: DatasetInfo, config: Config, processor: Any, passes: int = 1) -> Dataset:
    """Lazy Dataset of category, caption, pixel_values (3, S, S) and target (3, R, R) rows,
    `passes` times over the rows (each pass with new random crops)."""
    train = config.train
    columns = list(INPUT_COLUMNS) + ([CAPTION] if info.has_caption else [])
    ds = ray.data.read_parquet(info.files, columns=columns)
    crop = "center" if train.precompute else train.crop  # a cached crop cannot be random
    return repeat_passes(
        ds.map_batches(
            prepare_batch,
            fn_kwargs={"processor": processor, "resolution": train.resolution, "crop": crop},
            batch_size=_MAP_BATCH,
            num_cpus=train.data_cpus,
        ),
        passes,
    )


def repeat_passes(ds: Dataset, passes: int) -> Dataset:
    """`ds` `passes` times over, as one Dataset (each pass runs the plan again: new crops)."""
    return ds.union(*[ds] * (passes - 1)) if passes > 1 else ds


def precompute_inputs(ds: Dataset, info: DatasetInfo, config: Config, storage: str, passes: int = 1) -> Dataset:
    """Encode every row once with the frozen VAE and ViT (one actor per training GPU, or one on
    the CPU) into <storage>/precomputed-<key>/, which every run of the same dataset, model and
    resolution reuses (restarts, reruns, other run names); returns the Dataset of category,
    caption, latent_params and image_features rows (`passes` times over them), and sets
    `info.tensor_layout`. `ds` is the plan of one pass."""
    train = config.train
    model = config.model_path("blip_diffusion")
    key_source = json.dumps([info.digest, model, train.resolution, "center", "binary-v1"])
    cache = f"{storage}/precomputed-{hashlib.sha256(key_source.encode()).hexdigest()[:12]}"
    fs, root = pyarrow.fs.FileSystem.from_uri(cache)
    done = f"{root}/{_PRECOMPUTE_DONE}"
    if fs.get_file_info(done).type == pyarrow.fs.FileType.NotFound:
        log.info("precomputing VAE latents and ViT features of %d rows into %s", info.rows, cache)
        bf16 = train.gpu and train.mixed_precision != "no"
        encoded = ds.map_batches(
            FrozenEncoder,
            fn_constructor_kwargs={"model_path": model, "use_gpu": train.gpu, "bf16": bf16},
            compute=ActorPoolStrategy(size=train.workers if train.gpu else 1),
            num_gpus=1 if train.gpu else 0,
            num_cpus=train.data_cpus,
            batch_size=train.batch_size,
        )
        # Dictionary pages only for the strings: random-looking floats never repeat, and a
        # dictionary-encoded binary column reads ~7x slower.
        packed = encoded.map_batches(pack_tensor_columns, batch_format="numpy", zero_copy_batch=True)
        packed.write_parquet(cache, use_dictionary=[CATEGORY, CAPTION])
        with fs.open_output_stream(done) as out:
            out.write(json.dumps({"rows": info.rows, "key": key_source}).encode())
    else:
        log.info("training from precomputed inputs in %s", cache)
    selector = pyarrow.fs.FileSelector(root, recursive=False)
    files = sorted(f.path for f in fs.get_file_info(selector) if f.path.endswith(".parquet"))
    info.tensor_layout = read_tensor_layout(pq.read_schema(files[0], filesystem=fs))
    return repeat_passes(ray.data.read_parquet(files, filesystem=fs), passes)


def pack_tensor_columns(batch: dict[str, np.ndarray]) -> pa.Table:
    """Ray Data adapter: numeric (N, ...) columns -> fixed-size binary columns of one C-order row
    each (dtype and shape in the field's metadata, `read_tensor_layout`); strings stay strings."""
    fields, arrays = [], []
    for name, column in batch.items():
        if column.dtype == object:
            fields.append(pa.field(name, pa.string()))
            arrays.append(pa.array([str(v) for v in column], type=pa.string()))
            continue
        rows = np.ascontiguousarray(column)
        width = rows.dtype.itemsize * int(np.prod(rows.shape[1:]))
        meta = {_DTYPE: rows.dtype.name.encode(), _SHAPE: json.dumps(rows.shape[1:]).encode()}
        fields.append(pa.field(name, pa.binary(width), metadata=meta))
        arrays.append(pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(rows), [None, pa.py_buffer(rows)]))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def read_tensor_layout(schema: pa.Schema) -> TensorLayout:
    """The fixed-size binary tensor columns of `schema` (written by `pack_tensor_columns`)."""
    return {
        f.name: (f.metadata[_DTYPE].decode(), tuple(json.loads(f.metadata[_SHAPE])))
        for f in schema
        if f.metadata and _DTYPE in f.metadata
    }


class FeedCollate(ArrowBatchCollateFn):
    """Rows -> the loop's batch: numeric columns as one (B, ...) CPU tensor each, page-locked when
    `pin` (so the loop's `.to(device, non_blocking=True)` does not wait for the GPU), strings as
    lists. Takes Ray's Arrow batches (fixed-size binary columns per `layout`, Ray's tensor
    columns, plain numbers) and in-memory shards' dicts of numpy arrays. Runs in Ray Data's
    prefetch threads, not the loop's."""

    def __init__(self, layout: TensorLayout | None = None, pin: bool = False) -> None:
        super().__init__()
        self.layout = {name: (np.dtype(dtype), tuple(shape)) for name, (dtype, shape) in (layout or {}).items()}
        self.pin = pin

    def __call__(self, batch: pa.Table | dict[str, np.ndarray]) -> dict[str, Any]:
        if isinstance(batch, dict):
            return {name: column.tolist() if column.dtype == object else self._stack([column]) for name, column in batch.items()}
        out: dict[str, Any] = {}
        for name in batch.column_names:
            column = batch.column(name)
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                out[name] = column.to_pylist()
            elif name in self.layout:
                dtype, shape = self.layout[name]
                out[name] = self._stack([_binary_rows(chunk, dtype, shape) for chunk in column.chunks])
            else:  # Ray's tensor columns (the map's outputs) and plain numbers
                out[name] = self._stack([chunk.to_numpy(zero_copy_only=False) for chunk in column.chunks])
        return out

    def _stack(self, parts: list[np.ndarray]) -> torch.Tensor:
        """One copy of the rows into a new tensor (writable, contiguous, pinned when asked)."""
        rows = sum(len(p) for p in parts)
        dest = torch.empty((rows, *parts[0].shape[1:]), dtype=torch.from_numpy(np.empty(0, parts[0].dtype)).dtype, pin_memory=self.pin)
        view, start = dest.numpy(), 0
        for part in parts:
            view[start : start + len(part)] = part
            start += len(part)
        return dest


def _binary_rows(chunk: pa.FixedSizeBinaryArray, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A fixed-size binary chunk (no nulls) as a read-only (N, *shape) view of its buffer."""
    width = chunk.type.byte_width
    data = chunk.buffers()[1]
    return np.frombuffer(data, dtype=dtype, count=len(chunk) * width // dtype.itemsize, offset=chunk.offset * width).reshape(-1, *shape)
