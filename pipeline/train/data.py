"""Training data: the dataset version to train on, its Ray Data plan, and the feed's layout.

read Parquet -> decode, crop the target, preprocess the composite (CPU tasks) -> [precompute:
VAE posterior and ViT features, an actor per GPU, written once beside the runs] -> the
trainer's workers, which each iterate their equal share through `FeedCollate`. With online
composites the precompute encodes the targets alone (the ViT's input is new each epoch) and
keeps the cutouts' bytes, which are decoded as the cache is read. This module is the only place
that declares the resources of training-data stages.

The feed's layout (BENCHMARKS.md, "Pretraining job"): the precomputed cache stores each tensor
column as fixed-size binary (one C-order row per value, no dictionary), not as Ray's tensor
columns, which Parquet stores as nested lists whose reader decodes a level per element (~60
rows/s per core at 512 px, against ~1,100 as binary). `FeedCollate` stacks a batch's rows
straight into one (page-locked, on GPU workers) tensor per column, so the loop's copy to the
device is asynchronous.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
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
from ray.data.extensions import ArrowTensorArray

from pipeline.config import Config, ConfigError
from pipeline.data.backgrounds import backgrounds_digest, list_backgrounds
from pipeline.data.verify import manifest_shape_problem
from pipeline.data.versions import LATEST, MANIFEST
from pipeline.train.arraycache import array_cache
from pipeline.train.feed_tasks import decode_cutout_rows, pack_processor, prepare_cutout_rows, prepare_rows, tag_pass
from stages.composite import COMPOSITE_INDEX
from stages.online_composite import (
    CUTOUT_COLUMNS,
    PASS_INDEX,
    ROW_KEY,
    OnlineCompositor,
    decode_cutouts,
)
from stages.records import ALPHA, CATEGORY, COMPOSITE, FOREGROUND, IMAGE, SOURCE_SHA256, SUBJECT_ID
from stages.train_inputs import (
    CAPTION,
    INPUT_COLUMNS,
    PIXEL_VALUES,
    FrozenEncoder,
    UndecodableImage,
    subject_pixels,
)

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
    has_cutout: bool = False  # rows carry FOREGROUND and ALPHA (train.composite online can paste them)
    precomputed: bool = False
    tensor_layout: dict[str, Any] = field(default_factory=dict)  # of the precomputed cache (TensorLayout)
    array_cache: str | None = None  # the precomputed cache as memory-mapped arrays (pipeline.train.arraycache)
    precompute: str | None = None  # what this job did for the precomputed inputs: "made" them or "reused" a cache

    def as_run_input(self) -> dict[str, Any]:
        return asdict(self) | {"files": len(self.files), "subjects": len(self.subjects)}


def open_dataset(location: str | None, key: str = "train.data") -> DatasetInfo:
    """Resolve `location` (a dataset root, its `latest`, or a version folder) to a version with
    rows. Raises ConfigError naming `key`, the setting that gave `location`, when it is missing,
    unpublished, empty or damaged (`_damage`)."""
    path = _version_folder(location, key)
    manifest_bytes, manifest = _read_manifest(path, key)
    files, listed_rows, problems = _data_files(path, manifest)
    schemas, rows = {}, 0
    for file in (f for f in files if f not in problems):
        try:
            footer = pq.read_metadata(file)  # each file's footer read once: rows and columns
        except (OSError, pa.ArrowException) as exc:
            problems[file] = f"not a readable Parquet file (truncated?): {exc}"
            continue
        schemas[file], rows = footer.schema.to_arrow_schema(), rows + footer.num_rows
        expected = listed_rows.get(file, footer.num_rows)
        problem = _schema_problem(schemas[file]) or (
            f"{footer.num_rows} rows, the manifest says {expected}" if footer.num_rows != expected else None
        )
        if problem:
            problems[file] = problem
    if problems:
        raise ConfigError(_damage(path, problems, key))
    if rows == 0:
        raise ConfigError(f"{key}: dataset {manifest.get('version', path.name)} at {path} has no rows to train on")
    names = set.intersection(*(set(schema.names) for schema in schemas.values()))
    subjects = sorted(s for s, entry in manifest.get("subjects", {}).items() if entry.get("rows", 0) > 0)
    return DatasetInfo(
        name=path.parent.name,
        version=manifest.get("version", path.name),
        path=str(path),
        digest=hashlib.sha256(manifest_bytes).hexdigest()[:16],
        rows=rows,
        files=files,
        subjects=subjects,
        has_caption=CAPTION in names,
        has_cutout=set(_CUTOUT_TYPES) <= names,
    )


# Columns training reads and their published types (stages.write.DATA_SCHEMA): every row's
# category, target and composite; the subject (sample images), the caption and the online
# cutout where present (a fine-tune's own inputs version, finetune.write_inputs, has no subject).
_REQUIRED_TYPES = {CATEGORY: pa.string(), IMAGE: pa.binary(), COMPOSITE: pa.binary()}
_CUTOUT_TYPES = {FOREGROUND: pa.binary(), ALPHA: pa.binary(), SOURCE_SHA256: pa.string(), COMPOSITE_INDEX: pa.int32()}
_OPTIONAL_TYPES = {SUBJECT_ID: pa.string(), CAPTION: pa.string(), **_CUTOUT_TYPES}


def _version_folder(location: str | None, key: str) -> Path:
    if not location:
        raise ConfigError(f"{key}: no dataset given (pass --data OUT/latest)")
    path = Path(location).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}: dataset not found: {path}")
    latest = path / LATEST
    if not (path / MANIFEST).is_file() and latest.is_symlink() and not latest.exists():
        # A link to a version that is gone, or to itself: name it, not "not a dataset version".
        raise ConfigError(f"{key}: {latest} points at {os.readlink(latest)}, which is not there (a missing version or a link loop)")
    if not (path / MANIFEST).is_file() and latest.exists():
        path = latest
    path = path.resolve()
    if not (path / MANIFEST).is_file():
        raise ConfigError(f"{key}: {path} is not a dataset version (no {MANIFEST}; build one with `subjectforge data build`)")
    return path


def _read_manifest(path: Path, key: str) -> tuple[bytes, dict[str, Any]]:
    """The manifest's bytes (its digest names what was trained on) and JSON. A manifest cut short,
    not a JSON object or with a `subjects` that is not a map of {rows} is damage, not a
    JSONDecodeError or AttributeError stack trace."""
    data = (path / MANIFEST).read_bytes()
    try:
        manifest = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(_damage(path, {MANIFEST: f"not readable JSON (truncated?): {str(exc)[:200]}"}, key)) from None
    subjects = manifest.get("subjects", {}) if isinstance(manifest, dict) else None
    if not isinstance(subjects, dict) or not all(isinstance(e, dict) and type(e.get("rows", 0)) is int for e in subjects.values()):
        raise ConfigError(_damage(path, {MANIFEST: "not a manifest: a JSON object whose subjects map each id to {rows}"}, key))
    if "files" in manifest and (shape := manifest_shape_problem(manifest)):
        raise ConfigError(_damage(path, {MANIFEST: shape}, key))
    return data, manifest


def _data_files(path: Path, manifest: dict[str, Any]) -> tuple[list[str], dict[str, int], dict[str, str]]:
    """The version's data files, the rows the manifest lists for each, and what is wrong with
    them here: those the manifest lists (a version older than that list: those in data/, with no
    rows listed) are present, and no data file is there that the manifest does not list (a shard
    added or deleted trained on rows that are not the version's, with exit 0). open_dataset
    compares the rows with each file's footer."""
    present = sorted(str(p) for p in (path / "data").glob("*.parquet"))
    if "files" not in manifest:
        return present, {}, {}
    listed = {str(path / f["path"]): f["rows"] for f in manifest["files"]}
    problems = {f: "a data file the manifest does not list" for f in present if f not in listed}
    problems.update({f: "missing" for f in listed if not Path(f).is_file()})
    return sorted(listed), listed, problems


def _schema_problem(schema: pa.Schema) -> str | None:
    """What in a data file's columns training cannot read: a column it needs missing, or one of
    another type than the published schema's (a Parquet file of another schema trained on, or
    failed in a Ray task with a stack trace)."""
    missing = [name for name in _REQUIRED_TYPES if name not in schema.names]
    if missing:
        return f"lacks the column(s) {', '.join(missing)}"
    wrong = [
        f"{name} is {schema.field(name).type}, not {kind}"
        for name, kind in (_REQUIRED_TYPES | _OPTIONAL_TYPES).items()
        if name in schema.names and not schema.field(name).type.equals(kind)
    ]
    return "; ".join(wrong) or None


def _damage(path: Path, problems: dict[str, str], key: str) -> str:
    lines = [f"{key}: dataset version {path} is damaged:"]
    lines += [f"  {Path(f).relative_to(path) if Path(f).is_relative_to(path) else f}: {p}" for f, p in sorted(problems.items())]
    lines.append("`subjectforge data verify` checks it; `subjectforge data build` makes a new version from the photos")
    return "\n".join(lines)


@contextmanager
def undecodable_rows_refused(location: str) -> Iterator[None]:
    """Turns an error whose cause is an UndecodableImage (a Ray Data task's, a Ray Train worker's,
    however deep Ray wrapped it) into the ConfigError of a damaged version (exit 2) that names
    the data file, the row and its subject, in place of a stack trace. `location`: the version
    trained on (DatasetInfo.path). Other errors pass through."""
    try:
        yield
    except Exception as exc:
        bad = find_undecodable(exc)
        if bad is None:
            raise
        raise ConfigError(_undecodable_damage(open_dataset(location), bad)) from None


def find_undecodable(error: object) -> UndecodableImage | None:
    """The UndecodableImage in `error`, however deep Ray wrapped it (callbacks.find_error)."""
    from pipeline.train.callbacks import find_error

    return find_error(error, UndecodableImage)


def _undecodable_damage(info: DatasetInfo, bad: UndecodableImage) -> str:
    """The damage message of `bad`, with the row found by its bytes' SHA-256 in the file it came
    from (or, for bytes read back from a precomputed cache, in any of the version's files).
    Only pretraining (train.data) reads rows in Ray tasks, so the message names that key."""
    for file in [bad.file] if bad.file else info.files:
        found = _find_row(file, bad)
        if found is not None:
            index, subject = found
            row = f"row {index}" + (f" (subject {subject})" if subject else "")
            return _damage(Path(info.path), {file: f"{row}: {bad.column} does not decode: {bad.reason}"}, "train.data")
    where = bad.file or "a precomputed cache (train.storage_path)"
    return _damage(Path(info.path), {where: f"a row whose {bad.column} does not decode: {bad.reason} (bytes sha256 {bad.sha256[:16]})"}, "train.data")


def _find_row(file: str, bad: UndecodableImage) -> tuple[int, str | None] | None:
    """(row index, subject id when the file has the column) of the row whose `bad.column` bytes
    hash to `bad.sha256`; None when no row of `file` does."""
    names = pq.read_schema(file).names
    if bad.column not in names:
        return None
    table = pq.read_table(file, columns=[bad.column, *([SUBJECT_ID] if SUBJECT_ID in names else [])])
    for index, data in enumerate(table.column(bad.column).to_pylist()):
        if hashlib.sha256(data or b"").hexdigest() == bad.sha256:
            return index, table.column(SUBJECT_ID)[index].as_py() if SUBJECT_ID in names else None
    return None


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
    runs, which are repeatable instead (build_training_plan): their crops are seeded per row, so
    a second pass would repeat the first, and the same settings on one node and on two train
    on the same batches (tests/test_multinode.py); a GPU run, whose kernels are not
    bit-reproducible across layouts anyway, takes the throughput."""
    train = config.train
    if not train.gpu:
        return 1
    planned = train.steps * train.batch_size * train.grad_accum * train.workers / max(info.rows, 1)
    return max(1, min(MAX_PASSES, math.ceil(planned)))


def build_training_plan(info: DatasetInfo, config: Config, processor: Any, passes: int = 1) -> Dataset:
    """Lazy Dataset of category, caption, pixel_values (3, S, S) and target (3, R, R) rows,
    `passes` times over the rows (each pass with new random crops). With `train.composite`
    online, rows carry the cutout (FOREGROUND, ALPHA), ROW_KEY and PASS_INDEX instead of
    pixel_values: FeedCollate composites them, knowing the epoch. With online and
    `train.precompute` it is the one pass `precompute_inputs` encodes: the cutouts stay as
    stored bytes and no PASS_INDEX (added where the cache is read back). On the CPU the feed is
    repeatable: each row gets its own seeded crop here, and Ray Train hands the rows on in the
    dataset's order (`ingest_config`)."""
    train = config.train
    online = train.composite == "online"
    columns = list(CUTOUT_COLUMNS if online else INPUT_COLUMNS) + ([CAPTION] if info.has_caption else [])
    # With each row's data file (PATH), which a row whose image does not decode is named by.
    ds = read_parquet(info.files, columns=columns, include_paths=True)
    crop = "center" if train.precompute else train.crop  # a cached crop cannot be random
    # A CPU run's random crops are seeded per row (stages.train_inputs.row_rngs): the same in
    # every run, and so the same each epoch (a CPU run makes one pass per epoch). A GPU run
    # draws new ones each pass and epoch: its order is not repeatable anyway.
    seed = None if train.gpu else train.seed
    # feed_tasks' functions: Ray Train's coordinating processes unpickle this plan without torch.
    if online:
        fn, kwargs = prepare_cutout_rows, {"resolution": train.resolution, "crop": crop, "decode": not train.precompute, "seed": seed}
    else:
        fn, kwargs = prepare_rows, {"processor": pack_processor(processor), "resolution": train.resolution, "crop": crop, "seed": seed}
    ds = ds.map_batches(fn, fn_kwargs=kwargs, batch_size=_MAP_BATCH, num_cpus=train.data_cpus)
    return repeat_passes(ds, passes, tag=online and not train.precompute)


def ingest_config(train: Any) -> Any:
    """Ray Train's DataConfig for the training feed (`train`: a TrainConfig). On the CPU it keeps
    the dataset's row order (Ray Data's preserve_order): without it a plan's blocks come out in
    the order their tasks finish, so two runs of the same settings trained on different batches
    and logged different losses (the local shuffle is seeded, its input order was not); with it
    the split deals the rows out by that order too. Given to the TorchTrainer, not set on the
    Dataset, whose execution options Ray Train replaces with these; nor on the process's
    DataContext, which later Ray Data work in the same process would inherit. Not on GPUs: one
    slow task would hold back every row behind it, and their kernels are not bit-reproducible
    across layouts anyway."""
    from ray.data import DataContext, ExecutionOptions
    from ray.train import DataConfig  # ray.train takes seconds to import: only where a run starts

    # DataConfig.default_ingest_options, less the deprecated exclude_resources it copies (a
    # RayDeprecationWarning in every job's log); zero, its default, is what the feed had anyway.
    current = DataContext.get_current().execution_options
    options = ExecutionOptions(resource_limits=current.resource_limits, verbose_progress=current.verbose_progress)
    options.preserve_order = not train.gpu
    return DataConfig(execution_options=options)


def read_parquet(files: list[str], **kwargs: Any) -> Dataset:
    """ray.data.read_parquet of training data, whose map functions' errors are raised as they are
    (DataContext.raise_original_map_exception, for this Dataset and those made from it): an
    UndecodableImage then reaches the driver and Ray Train's controller as itself, where Ray
    Data's UserCodeException would carry it as text only.

    Without Ray Data's progress bars: the feed's coordinator redraws them for every epoch's
    stream, over a thousand lines of a short CPU run's log, and the job logs its own progress
    (samples/s, data wait, pipeline.train.hooks)."""
    ds = ray.data.read_parquet(files, **kwargs)
    ds.context.raise_original_map_exception = True
    ds.context.enable_progress_bars = False
    return ds


def repeat_passes(ds: Dataset, passes: int, tag: bool = False) -> Dataset:
    """`ds` `passes` times over, as one Dataset (each pass runs the plan again: new crops).
    With `tag`, each row gets its pass's number in PASS_INDEX (online composites count a pass
    as an epoch)."""
    copies = [ds.map_batches(tag_pass, fn_kwargs={"index": p}, batch_format="pyarrow") if tag else ds for p in range(passes)]
    return copies[0].union(*copies[1:]) if passes > 1 else copies[0]


def online_settings(info: DatasetInfo, config: Config, passes: int) -> dict[str, Any]:
    """What a worker needs to composite online (OnlineFeed.build): the pool the dataset was built
    with (`data.backgrounds.folder` when set, else the manifest's), its composites' scale range,
    the run's seed, and the layout of an epoch (rows, passes) to find where a resumed run is.
    ConfigError when the dataset has no cutouts or the pool cannot be listed."""
    if not info.has_cutout:
        raise ConfigError(
            f"train.composite online: dataset {info.version} has no cutout columns ({FOREGROUND}, {ALPHA}); "
            "rebuild it with `subjectforge data build`, or set train.composite stored"
        )
    manifest = json.loads((Path(info.path) / MANIFEST).read_text())
    recorded = manifest.get("backgrounds", {})
    folder = config.data.backgrounds.folder or recorded.get("folder")
    backgrounds = list_backgrounds(folder)
    if recorded.get("digest") and backgrounds_digest(backgrounds) != recorded["digest"]:
        log.warning("train.composite online: the backgrounds in %s differ from those %s was built with", folder, info.version)
    composite = manifest.get("config", {}).get("data", {}).get("composite", {})
    defaults = config.data.composite
    return {
        "backgrounds": backgrounds,
        "seed": config.train.seed,
        "scale_min": composite.get("scale_min", defaults.scale_min),
        "scale_max": composite.get("scale_max", defaults.scale_max),
        "rows": info.rows,
        "passes": passes,
    }


def epoch_at_step(step: int, *, rows: int, passes: int, workers: int, batch_size: int, grad_accum: int) -> int:
    """The Ray Data epoch that optimizer step `step` falls in: a worker's equal share of an epoch
    (rows x passes / workers rows) makes share // batch_size batches, grad_accum a step."""
    batches = max(1, (rows * passes // workers) // batch_size)
    return step * grad_accum // batches


def precompute_cache(info: DatasetInfo, config: Config, storage: str) -> tuple[str, str]:
    """(<storage>/precomputed-<key>, the key's source): one cache per dataset, model, resolution
    and layout. Online composites' caches (targets only, with the cutouts) have a key of their
    own, so they never mix with the full precompute's."""
    train = config.train
    parts = [info.digest, config.model_path("blip_diffusion"), train.resolution, "center", "binary-v1"]
    if train.composite == "online":
        parts.append("online-targets-v1")
    key_source = json.dumps(parts)
    return f"{storage}/precomputed-{hashlib.sha256(key_source.encode()).hexdigest()[:12]}", key_source


def precompute_ready(info: DatasetInfo, config: Config, storage: str) -> bool:
    """Whether the precomputed inputs `precompute_inputs` would make are complete in `storage`
    already (their completion record exists), so reusing them costs nothing."""
    cache, _ = precompute_cache(info, config, storage)
    fs, root = pyarrow.fs.FileSystem.from_uri(cache)
    return fs.get_file_info(f"{root}/{_PRECOMPUTE_DONE}").type != pyarrow.fs.FileType.NotFound


def precompute_inputs(ds: Dataset, info: DatasetInfo, config: Config, storage: str, passes: int = 1) -> Dataset:
    """Encode every row once with the frozen VAE and ViT (one actor per training GPU, or one on
    the CPU) into <storage>/precomputed-<key>/parts-<id>/ (the one its _PRECOMPUTE_DONE.json
    names), which every run of the same dataset, model and resolution reuses (restarts, reruns,
    other run names); returns the Dataset of category, caption, latent_params and
    image_features rows (`passes` times over them), and sets `info.tensor_layout`. `ds` is the
    plan of one pass. ConfigError for a cache whose rows are not the dataset's.

    With `train.composite` online only the targets are encoded (VAE): the rows keep the
    cutout's stored bytes and ROW_KEY, and come back with the cutout decoded and PASS_INDEX, as
    the online plan's rows (FeedCollate composites them), with latent_params in place of target."""
    train = config.train
    online = train.composite == "online"
    cache, key_source = precompute_cache(info, config, storage)
    fs, root = pyarrow.fs.FileSystem.from_uri(cache)
    done = f"{root}/{_PRECOMPUTE_DONE}"
    if not precompute_ready(info, config, storage):
        # Each attempt writes its own parts folder, which the completion record names: Ray Data
        # appends to a folder, so the parts of a killed attempt (or of a job writing the same
        # cache at once) would otherwise be read as rows beside the complete set.
        parts = f"parts-{uuid.uuid4().hex[:12]}"
        what = "VAE latents of the targets" if online else "VAE latents and ViT features"
        log.info("precomputing %s of %d rows into %s", what, info.rows, cache)
        bf16 = train.gpu and train.mixed_precision != "no"
        encoded = ds.map_batches(
            FrozenEncoder,
            fn_constructor_kwargs={"model_path": config.model_path("blip_diffusion"), "use_gpu": train.gpu, "bf16": bf16, "vit": not online},
            compute=ActorPoolStrategy(size=train.workers if train.gpu else 1),
            num_gpus=1 if train.gpu else 0,
            num_cpus=train.data_cpus,
            batch_size=train.batch_size,
        )
        # Dictionary pages only for the strings: random-looking floats never repeat, and a
        # dictionary-encoded binary column reads ~7x slower.
        packed = encoded.map_batches(pack_tensor_columns, batch_format="numpy", zero_copy_batch=True)
        try:
            packed.write_parquet(f"{cache}/{parts}", use_dictionary=[CATEGORY, CAPTION])
        except BaseException:  # rows that do not decode, an interrupt: this attempt's parts are never read
            _remove_attempt(fs, root, parts)
            raise
        with fs.open_output_stream(f"{done}.{parts}") as out:  # then renamed: a half-written record is never read
            out.write(json.dumps({"rows": info.rows, "key": key_source, "parts": parts}).encode())
        fs.move(f"{done}.{parts}", done)
        info.precompute = "made"
    else:
        log.info("training from precomputed %s in %s", "targets" if online else "inputs", cache)
        info.precompute = "reused"
    with fs.open_input_stream(done) as record:
        parts = json.loads(record.read()).get("parts", "")  # "": older releases wrote into the cache itself
    selector = pyarrow.fs.FileSelector(f"{root}/{parts}".rstrip("/"), recursive=False)
    files = sorted(f.path for f in fs.get_file_info(selector) if f.path.endswith(".parquet"))
    rows = sum(pq.ParquetFile(f, filesystem=fs).metadata.num_rows for f in files)
    if rows != info.rows:
        raise ConfigError(
            f"train.storage_path: the precomputed inputs in {cache} hold {rows} rows, not the dataset's {info.rows} "
            "(an older release's precompute killed midway leaves its rows beside the rerun's): delete that folder and rerun"
        )
    info.tensor_layout = read_tensor_layout(pq.read_schema(files[0], filesystem=fs))
    if online:  # the Ray Data feed reads it: the cutouts are decoded in its tasks
        rows_back = read_parquet(files, filesystem=fs).map_batches(
            decode_cutout_rows, batch_format="pyarrow", batch_size=_MAP_BATCH, num_cpus=train.data_cpus
        )
        return repeat_passes(rows_back, passes, tag=True)
    arrays = array_cache(f"{cache}/{parts}".rstrip("/"), info.tensor_layout)
    info.array_cache = str(arrays) if arrays is not None else None
    return repeat_passes(ray.data.read_parquet(files, filesystem=fs), passes)  # no map function here


def _remove_attempt(fs: pyarrow.fs.FileSystem, root: str, parts: str) -> None:
    """Delete a failed precompute's own parts folder, then the cache folder if that left it
    empty (local storage: os.rmdir leaves one that another job writes into at once)."""
    with suppress(OSError):
        fs.delete_dir(f"{root}/{parts}")
    if fs.type_name == "local":
        with suppress(OSError):
            os.rmdir(root)


def decode_cutout_columns(table: pa.Table) -> pa.Table:
    """Ray Data adapter (pyarrow batches) of the online targets' cache: the cutout's stored
    bytes -> FOREGROUND and ALPHA as prepare_cutout_batch decodes them (ragged uint8 tensors);
    the other columns as they are (latent_params stays fixed-size binary for FeedCollate)."""
    foregrounds, alphas = decode_cutouts({FOREGROUND: table.column(FOREGROUND).to_pylist(), ALPHA: table.column(ALPHA).to_pylist()})
    table = table.set_column(table.schema.get_field_index(FOREGROUND), FOREGROUND, ArrowTensorArray.from_numpy(foregrounds))
    return table.set_column(table.schema.get_field_index(ALPHA), ALPHA, ArrowTensorArray.from_numpy(alphas))


def pack_tensor_columns(batch: dict[str, np.ndarray]) -> pa.Table:
    """Ray Data adapter: numeric (N, ...) columns -> fixed-size binary columns of one C-order row
    each (dtype and shape in the field's metadata, `read_tensor_layout`); strings stay strings,
    bytes binary, and one number a row (N,) a plain column (ROW_KEY)."""
    fields, arrays = [], []
    for name, column in batch.items():
        if column.dtype == object:
            kind = pa.binary() if len(column) and isinstance(column[0], bytes) else pa.string()
            fields.append(pa.field(name, kind))
            arrays.append(pa.array(list(column) if kind == pa.binary() else [str(v) for v in column], type=kind))
            continue
        if column.ndim == 1:
            fields.append(pa.field(name, pa.from_numpy_dtype(column.dtype)))
            arrays.append(pa.array(column))
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


@dataclass
class OnlineFeed:
    """The worker's side of online composites: the compositor, the model's image processor,
    and passes per Ray Data epoch (a row's composite epoch is epoch x passes + its pass)."""

    compositor: OnlineCompositor
    processor: Any
    passes: int = 1

    @classmethod
    def build(cls, settings: dict[str, Any] | None, processor: Any, device: torch.device) -> OnlineFeed | None:
        """From `online_settings` (None: stored composites, no feed)."""
        if settings is None:
            return None
        compositor = OnlineCompositor(
            settings["backgrounds"], settings["seed"], settings["scale_min"], settings["scale_max"], device
        )
        return cls(compositor, processor, settings["passes"])

    def pixel_values(self, table: pa.Table, epoch: int) -> np.ndarray:
        """float32 (B, 3, S, S): each row's composite for its epoch, through the processor."""
        rows = table.num_rows
        passes = table.column(PASS_INDEX).to_numpy() if PASS_INDEX in table.column_names else np.zeros(rows, np.int64)
        composites = self.compositor.composites(
            _ragged(table.column(FOREGROUND)), _ragged(table.column(ALPHA)), table.column(ROW_KEY).to_numpy(),
            epoch * self.passes + passes,
        )  # fmt: skip
        return np.stack([subject_pixels(c, self.processor) for c in composites])


def _ragged(column: pa.ChunkedArray) -> list[np.ndarray]:
    """A (variable-shaped) tensor column as one array per row."""
    return [row for chunk in column.chunks for row in chunk.to_numpy(zero_copy_only=False)]


class FeedCollate(ArrowBatchCollateFn):
    """Rows -> the loop's batch: numeric columns as one (B, ...) CPU tensor each, page-locked when
    `pin` (so the loop's `.to(device, non_blocking=True)` does not wait for the GPU), strings as
    lists. Takes Ray's Arrow batches (fixed-size binary columns per `layout`, Ray's tensor
    columns, plain numbers) and in-memory shards' dicts of numpy arrays. Runs in Ray Data's
    prefetch threads, not the loop's."""

    def __init__(self, layout: TensorLayout | None = None, pin: bool = False, online: OnlineFeed | None = None) -> None:
        super().__init__()
        self.layout = {name: (np.dtype(dtype), tuple(shape)) for name, (dtype, shape) in (layout or {}).items()}
        self.pin = pin
        self.online = online
        self.epoch = 0

    def at_epoch(self, epoch: int) -> FeedCollate:
        """This collate for Ray Data epoch `epoch` (BatchStream asks before each epoch)."""
        feed = copy.copy(self)
        feed.epoch = epoch
        return feed

    def __call__(self, batch: pa.Table | dict[str, np.ndarray]) -> dict[str, Any]:
        if isinstance(batch, dict):
            return {name: column.tolist() if column.dtype == object else self._stack([column]) for name, column in batch.items()}
        out: dict[str, Any] = {}
        if self.online is not None and FOREGROUND in batch.column_names:
            out[PIXEL_VALUES] = self._stack([self.online.pixel_values(batch, self.epoch)])
            batch = batch.drop_columns([c for c in (FOREGROUND, ALPHA, ROW_KEY, PASS_INDEX) if c in batch.column_names])
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
