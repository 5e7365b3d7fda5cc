"""The Ray Data plan of the prompted-context dataset: the only place that declares resources.

decode (CPU tasks) -> segment and trimap (CLIPSeg actor pool, a GPU share each when the cluster
has GPUs) -> matte -> filter -> composite -> encode (CPU tasks) -> Parquet.

Matting runs where its backend is fastest: the torch solver as an actor pool sharing the GPUs with
CLIPSeg, each actor solving up to `data.matte.batch_size` photos at once; pymatting (or torch on
a cluster without GPUs) as CPU tasks of one photo each, spread over every core. The filter and
the composites run where they are cheapest: on the matte actor's GPU when there is one, where
the alpha and the foreground already are (the actor then sends out the composite rows, and the
CPU tasks after it only encode), else in the CPU task after matting, with encoding.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, DataContext, Dataset

from pipeline.config import Config, ConfigError, MatteConfig, RayConfig, whole_gpus
from stages.composite import composite_batch
from stages.decode import decode_batch
from stages.filter import filter_batch
from stages.matte import Matter, matte_batch
from stages.records import CATEGORY, REJECT_REASON, REJECT_STAGE, SOURCE_PATH, SOURCE_SHA256, SOURCE_URI, SUBJECT_ID
from stages.segment import Segmenter
from stages.trimap import trimap_batch
from stages.write import ShardSink, encode_batch

log = logging.getLogger(__name__)

# Blocks per CPU: enough to keep every core busy while one block is slow to mat.
_BLOCKS_PER_CPU = 4

# Photos per batch of the CPU task after matting: big enough that slicing batches out of a block
# costs little (0.5 ms a photo at 4 rows, 0.1 at 16), small enough that a batch's arrays (3.7 MB
# a photo at 512 px, plus its composites) stay near the core's cache. After a matte actor that
# composites, a photo is `per_photo` rows.
_FINISH_BATCH_SIZE = 8


def ensure_ray(cfg: RayConfig) -> None:
    """Join the configured cluster (or RAY_ADDRESS), else start a local Ray; reuse if running."""
    if ray.is_initialized():
        return
    ray.init(
        address=cfg.address,
        num_cpus=cfg.num_cpus if cfg.address is None else None,
        include_dashboard=False,
        log_to_driver=True,
    )


def subject_trainer_options(config: Config) -> dict[str, Any]:
    """Ray options of a finetune-many actor (pipeline/train/many.py): the CPUs of a training
    worker and `finetune.num_gpus` of a GPU with `train.gpu` (fractions let subjects share one).
    No restarts: the pool replaces an actor that died, and the subject it held is retried."""
    gpus = config.finetune.num_gpus if config.train.gpu else 0
    return {"num_cpus": config.train.cpus_per_worker, "num_gpus": gpus, "max_restarts": 0, "max_task_retries": 0}


def gpus_per_segment_actor(
    setting: float | str, matte_gpus: float, cluster_gpus: float, num_actors: int = 1, matte_actors: int = 1
) -> float:
    """The GPU share of each CLIPSeg actor. auto: what the `matte_actors` matting actors
    (`matte_gpus` each) leave of the GPUs, shared by the `num_actors` CLIPSeg actors so that
    they pack: an actor's share sits on one GPU, so each gets what is left of a GPU divided by
    the CLIPSeg actors that GPU must hold. Two actors beside a 0.5-GPU matting actor on one GPU
    get 0.25 each; three beside three 0.2-GPU matting actors get 0.1333. Rounded down to Ray's
    1e-4 resource unit, so that the shares never add up to more than the GPU. A number is taken
    as given. Raises ConfigError when the shares of a GPU add up to more than it: Ray would
    start the actors that fit, and the plan would wait for the others until CLIPSeg finished."""
    if cluster_gpus <= 0:
        return 0.0 if setting == "auto" else float(setting)
    gpus = whole_gpus(cluster_gpus)
    matting_per_gpu = matte_gpus * math.ceil(matte_actors / gpus)
    segment_per_gpu = math.ceil(num_actors / gpus)
    if setting == "auto":
        share = math.floor((1.0 - matting_per_gpu) / segment_per_gpu * 1e4) / 1e4
    else:
        share = float(setting)
    if share < 1 and (share <= 0 or matting_per_gpu + share * segment_per_gpu > 1 + 1e-9):
        raise ConfigError(
            f"on {gpus} GPU(s), {matte_actors} matting actor(s) at {matte_gpus:g} GPU each and {num_actors} "
            f"CLIPSeg actor(s) at {share:g} ask for more than a GPU: lower data.matte.num_gpus, "
            "data.matte.num_actors, data.segment.num_actors or data.segment.num_gpus"
        )
    return share


def matte_stage(
    matte: MatteConfig, cluster_gpus: float, photo_size: int = 512, finish: dict[str, Any] | None = None
) -> dict[str, Any]:
    """map_batches arguments of the matte stage on a cluster with `cluster_gpus` GPUs.

    The backend is resolved here, not in the worker: Ray hides the GPUs from a worker that asked
    for none, so a worker would never see one to pick torch for. torch on GPUs gets the batched
    `Matter` actors (which compile their kernels on a warm-up at `photo_size`, decode's size, and
    filter and composite on their GPU when given `finish`, Matter's argument); everything else
    gets one photo per CPU task, the unit pymatting solves."""
    backend = matte.backend
    if backend == "auto":
        backend = "torch" if cluster_gpus > 0 else "pymatting"
    if backend == "torch" and cluster_gpus > 0:
        return {
            "fn": Matter,
            "batch_size": matte.batch_size,
            "compute": ActorPoolStrategy(size=matte.resolved_actors(cluster_gpus)),
            "num_gpus": matte.num_gpus,
            "num_cpus": 1,
            "fn_constructor_kwargs": {
                "batch_size": matte.batch_size,
                "tol": matte.tol,
                "photo_size": photo_size,
                "finish": finish,
            },
        }
    return {
        "fn": matte_batch,
        "batch_size": 1,
        "num_cpus": 1,
        "concurrency": matte.concurrency,
        "fn_kwargs": {"backend": backend, "tol": matte.tol},
    }


class SegmentAndTrimap(Segmenter):
    """The segment stage's actor, then the trimap stage's adapter on its output, in one Ray
    Data operator. As a task operator of its own, the trimap stage copied every photo and its
    float32 confidence map (1.8 MB at 512 px) through the object store a second time for 0.3 ms
    of thresholding (2-10 ms more where erosion is on), and took a share of the CPUs that the
    task after matting needs (BENCHMARKS.md, "CLIPSeg and trimap actor": 61 -> 125 photos/s)."""

    def __init__(self, trimap_args: dict[str, Any], **segment_args: Any):
        super().__init__(**segment_args)
        self.trimap_args = trimap_args

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return trimap_batch(super().__call__(batch), device=self.device, **self.trimap_args)


def filter_composite_encode(
    batch: dict[str, np.ndarray],
    *,
    filter_args: dict[str, Any],
    composite_args: dict[str, Any],
    encode_args: dict[str, Any],
) -> dict[str, np.ndarray]:
    """filter -> composite -> encode as one Ray Data function.

    As three map_batches, Ray fused them into one task all the same, but it turned every
    function's output batch into an Arrow block and back: the composite batch (K rows per photo,
    each with the photo's arrays) was copied into Arrow only to be encoded next. One function
    hands the arrays over as they are (BENCHMARKS.md, "The CPU task after matting")."""
    batch = filter_batch(batch, **filter_args)
    batch = composite_batch(batch, **composite_args)
    return encode_batch(batch, **encode_args)


def batch_aligned_dataset(items: list[dict[str, Any]], batch_size: int) -> Dataset:
    """`items` in blocks of exactly `batch_size` rows (the last one shorter), for the plan with
    `Matter` actors.

    Ray Data hands an actor a bundle of whole blocks holding at least `batch_size` rows. Blocks
    of ~31 photos (2,000 split over 4 blocks per CPU of 16) made bundles of 93 and batches of 64
    + 29, and the GPU solves 29 photos at well under the rate of 64. With blocks of one batch,
    every bundle is one full batch, as long as blocks stay whole up to the matte actor: Ray cuts
    a task's output once it passes 128 MiB, and 64 photos at 512 px are ~117 MB (the photo with
    its confidence map or trimap). Bigger batches get cut on the way; `Matter` then solves a
    bundle in even parts (74 + 74, not 128 + 20)."""
    chunks = [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
    return ray.data.from_arrow([pa.Table.from_pylist(chunk) for chunk in chunks])


def check_cpus_left(cluster_cpus: float, actor_cpus: float) -> None:
    """Raise ConfigError when the plan's actors (one CPU each, held for the whole plan) leave no
    CPU for its tasks: decode would never run and the build would wait forever."""
    if cluster_cpus - actor_cpus < 1:
        raise ConfigError(
            f"the data plan's {actor_cpus:g} actors (data.segment.num_actors, data.matte.num_actors) hold "
            f"{actor_cpus:g} of the cluster's {cluster_cpus:g} CPUs and leave none for decoding, trimaps "
            "and writing; use fewer actors or more CPUs (ray.num_cpus)"
        )


def _num_blocks(photos: int, photos_per_shard: int) -> int:
    """Blocks of photos for the plan. Each block ends as one Parquet shard, so blocks hold up
    to a shard's worth of photos, but there are at least a few blocks per CPU to spread over."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    wanted = max(math.ceil(photos / max(1, photos_per_shard)), _BLOCKS_PER_CPU * cpus)
    return max(1, min(photos, wanted))


def build_dataset_plan(
    photos: list[dict[str, Any]], config: Config, backgrounds: list[tuple[str, str]], dataset_version: str
) -> Dataset:
    """A lazy Dataset of encoded rows (data and rejects together) for `photos`.

    `photos` holds one dict per input with subject_id, category, source_uri, source_path and
    source_sha256. Nothing runs until the dataset is written.
    """
    data = config.data
    items = [
        {
            SUBJECT_ID: p[SUBJECT_ID],
            CATEGORY: p[CATEGORY],
            SOURCE_URI: p[SOURCE_URI],
            SOURCE_PATH: p[SOURCE_PATH],
            SOURCE_SHA256: p[SOURCE_SHA256],
            REJECT_STAGE: "",
            REJECT_REASON: "",
        }
        for p in photos
    ]
    resources = ray.cluster_resources()
    cluster_gpus = resources.get("GPU", 0)
    finish = finish_args(config, backgrounds, dataset_version)
    on_device = {name: finish[name] for name in ("filter_args", "composite_args")}
    matte = matte_stage(data.matte, cluster_gpus, photo_size=data.decode.size, finish=on_device)
    segment_actors, segment_batch = data.segment.resolved(cluster_gpus)
    matte_actors = matte["compute"].max_size if matte["fn"] is Matter else 0
    check_cpus_left(resources.get("CPU", 0), segment_actors + matte_actors)
    if matte["fn"] is Matter:
        ds = batch_aligned_dataset(items, data.matte.batch_size)
    else:
        ds = ray.data.from_items(
            items, override_num_blocks=_num_blocks(len(items), data.write.rows_per_file // data.composite.per_photo)
        )
    ds = ds.map_batches(decode_batch, batch_size=4, num_cpus=1, fn_kwargs=data.decode.model_dump())
    ds = ds.map_batches(
        SegmentAndTrimap,
        batch_size=segment_batch,
        compute=ActorPoolStrategy(size=segment_actors),
        num_gpus=gpus_per_segment_actor(
            data.segment.num_gpus, matte.get("num_gpus", 0.0), cluster_gpus, segment_actors, matte_actors
        ),
        num_cpus=1,
        fn_constructor_kwargs={
            "model_path": config.model_path("clipseg"),
            "prompt_template": data.segment.prompt_template,
            "batch_size": segment_batch,
            "normalize": data.segment.normalize,
            "trimap_args": data.trimap.model_dump(),
        },
    )
    ds = ds.map_batches(**matte)
    if matte["fn"] is Matter:  # it filtered and composited on its device
        return ds.map_batches(
            encode_batch,
            batch_size=_FINISH_BATCH_SIZE * data.composite.per_photo,
            num_cpus=1,
            fn_kwargs=finish["encode_args"],
        )
    return ds.map_batches(filter_composite_encode, batch_size=_FINISH_BATCH_SIZE, num_cpus=1, fn_kwargs=finish)


def finish_args(config: Config, backgrounds: list[tuple[str, str]], dataset_version: str) -> dict[str, Any]:
    """Keyword arguments of `filter_composite_encode` for this config; a `Matter` that finishes
    on its device takes the filter's and the composite's."""
    data = config.data
    return {
        "filter_args": data.filter.model_dump(),
        "composite_args": {"backgrounds": backgrounds, **data.composite.model_dump()},
        "encode_args": {
            "image_format": data.write.image_format,
            "jpeg_quality": data.write.jpeg_quality,
            "dataset_version": dataset_version,
        },
    }


def run_plan(ds: Dataset, staging_root: str, progress: bool = True) -> list[dict[str, Any]]:
    """Execute the plan into `staging_root`; returns each write task's stats."""
    DataContext.get_current().enable_progress_bars = progress
    sink = ShardSink(staging_root)
    ds.write_datasink(sink)
    return sink.results
