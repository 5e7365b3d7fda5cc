"""Training data: the dataset version to train on, and its Ray Data plan.

read Parquet -> decode, crop the target, preprocess the composite (CPU tasks) -> [precompute:
VAE posterior and ViT features, an actor per GPU, written once to the run folder] -> the
trainer's workers, which each iterate their equal share. This module is the only place that
declares the resources of training-data stages.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy, Dataset

from pipeline.config import Config, ConfigError
from pipeline.data.versions import LATEST, MANIFEST
from stages.records import CATEGORY, COMPOSITE, SUBJECT_ID
from stages.train_inputs import CAPTION, INPUT_COLUMNS, FrozenEncoder, prepare_batch

log = logging.getLogger(__name__)

# Rows per map task batch: a 512 px batch of 16 is about 60 MB of float32 arrays.
_MAP_BATCH = 16
_PRECOMPUTE_DONE = "_PRECOMPUTE_DONE.json"  # written last: the cache counts only when it exists


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


def build_training_plan(info: DatasetInfo, config: Config, processor: Any) -> Dataset:
    """Lazy Dataset of category, caption, pixel_values (3, S, S) and target (3, R, R) rows."""
    train = config.train
    columns = list(INPUT_COLUMNS) + ([CAPTION] if info.has_caption else [])
    ds = ray.data.read_parquet(info.files, columns=columns)
    crop = "center" if train.precompute else train.crop  # a cached crop cannot be random
    return ds.map_batches(
        prepare_batch,
        fn_kwargs={"processor": processor, "resolution": train.resolution, "crop": crop},
        batch_size=_MAP_BATCH,
        num_cpus=train.data_cpus,
    )


def precompute_inputs(ds: Dataset, info: DatasetInfo, config: Config, run_folder: str) -> Dataset:
    """Encode every row once with the frozen VAE and ViT (one actor per training GPU, or one on
    the CPU) into <run_folder>/precomputed-<key>/, reused by restarts and reruns; returns the
    Dataset of category, caption, latent_params and image_features rows."""
    train = config.train
    model = config.model_path("blip_diffusion")
    key_source = json.dumps([info.digest, model, train.resolution, "center"])
    cache = f"{run_folder}/precomputed-{hashlib.sha256(key_source.encode()).hexdigest()[:12]}"
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
        encoded.write_parquet(cache)
        with fs.open_output_stream(done) as out:
            out.write(json.dumps({"rows": info.rows, "key": key_source}).encode())
    else:
        log.info("training from precomputed inputs in %s", cache)
    return ray.data.read_parquet(cache, file_extensions=["parquet"])
