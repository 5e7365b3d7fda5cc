"""The data build's stage chain, declared once (`data_stages`), and its Ray Data plan.

decode (CPU tasks) -> segment and trimap (CLIPSeg actor pool, a GPU share each when the cluster
has GPUs) -> caption (captioner actor pool, likewise) -> matte -> filter -> composite -> encode
(CPU tasks) -> Parquet.

`data_stages` is the one place that declares the data build's stages and resources (actor
pools, GPU shares, batch sizes): `build_dataset_plan` folds the list over Ray Data's
`map_batches`, and `pipeline.data.build.process_photos` folds the same list over one batch in its own
process. Training and evaluation declare their own Ray resources, beside their plans
(pipeline/train/data.py, pipeline/train/trainer.py, pipeline/train/finetune.py,
pipeline/train/many.py, pipeline/evaluation/plan.py).

Matting runs where its backend is fastest: the torch solver as an actor pool sharing the GPUs with
CLIPSeg, each actor solving up to `data.matte.batch_size` photos at once; pymatting (or torch on
a cluster without GPUs) as CPU tasks of one photo each, spread over every core. The filter and
the composites run where they are cheapest: on the matte actor's GPU when there is one, where
the alpha and the foreground already are (the actor then sends out the composite rows, and the
CPU tasks after it only encode), else in the CPU task after matting, with encoding.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, DataContext, Dataset

from pipeline.config import CaptionConfig, Config, ConfigError, MatteConfig, whole_gpus
from stages.caption import Captioner
from stages.composite import composite_batch
from stages.decode import decode_batch
from stages.filter import filter_batch
from stages.matte import matte_batch
from stages.matte_composite import MatteFilterComposite
from stages.records import (
    CAPTION,
    CAPTION_SOURCE,
    CAPTION_USER,
    CATEGORY,
    REJECT_REASON,
    REJECT_STAGE,
    SOURCE_PATH,
    SOURCE_SHA256,
    SOURCE_URI,
    SUBJECT_ID,
)
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


@dataclass(frozen=True)
class Cluster:
    """What the stages are laid out on: a cluster's CPUs and GPUs, or, with `pools` False, this
    process, where every stage maps the one batch in turn and no actor pool is started."""

    cpus: float
    gpus: float
    pools: bool = True


@dataclass(frozen=True)
class StageSpec:
    """One stage of the data build: a function that maps a batch, or an actor class whose
    instances do, with its arguments and what Ray gives it."""

    name: str
    fn: Callable[..., dict[str, np.ndarray]] | type
    args: dict[str, Any]  # the function's keyword arguments, or the actor's constructor's
    batch_size: int
    num_cpus: float = 1
    num_gpus: float = 0.0  # per actor; tasks take none
    actors: int = 0  # the actor pool's size; 0 for a function, run as tasks
    concurrency: int | None = None  # tasks at once; None: as many as the CPUs allow

    def map_batches(self, ds: Dataset) -> Dataset:
        """`ds` mapped by this stage on the Ray cluster."""
        if self.actors:
            return ds.map_batches(
                self.fn,
                batch_size=self.batch_size,
                compute=ActorPoolStrategy(size=self.actors),
                num_gpus=self.num_gpus,
                num_cpus=self.num_cpus,
                fn_constructor_kwargs=self.args,
            )
        return ds.map_batches(
            self.fn,
            batch_size=self.batch_size,
            num_cpus=self.num_cpus,
            concurrency=self.concurrency,
            fn_kwargs=self.args,
        )

    def in_process(self) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        """The stage as a function of one batch in this process (an actor is made here)."""
        return self.fn(**self.args) if isinstance(self.fn, type) else functools.partial(self.fn, **self.args)


def gpus_per_segment_actor(
    setting: float | str,
    matte_gpus: float,
    cluster_gpus: float,
    num_actors: int = 1,
    matte_actors: int = 1,
    caption_gpus: float = 0.0,
    caption_actors: int = 0,
) -> float:
    """The GPU share of each CLIPSeg actor. auto: what the `matte_actors` matting actors
    (`matte_gpus` each) and the `caption_actors` captioner actors (`caption_gpus` each) leave of
    the GPUs, shared by the `num_actors` CLIPSeg actors so that they pack: an actor's share sits
    on one GPU, so each gets what is left of a GPU divided by the CLIPSeg actors that GPU must
    hold. Two actors beside a 0.5-GPU matting actor on one GPU get 0.25 each; three beside three
    0.2-GPU matting actors get 0.1333. Rounded down to Ray's 1e-4 resource unit, so that the
    shares never add up to more than the GPU. A number is taken as given. Raises ConfigError
    when the shares of a GPU add up to more than it: Ray would start the actors that fit, and
    the plan would wait for the others until CLIPSeg finished."""
    if cluster_gpus <= 0:
        return 0.0 if setting == "auto" else float(setting)
    gpus = whole_gpus(cluster_gpus)
    matting_per_gpu = matte_gpus * math.ceil(matte_actors / gpus) + caption_gpus * math.ceil(caption_actors / gpus)
    segment_per_gpu = math.ceil(num_actors / gpus)
    if setting == "auto":
        share = math.floor((1.0 - matting_per_gpu) / segment_per_gpu * 1e4) / 1e4
    else:
        share = float(setting)
    if share < 1 and (share <= 0 or matting_per_gpu + share * segment_per_gpu > 1 + 1e-9):
        raise ConfigError(
            f"on {gpus} GPU(s), {matte_actors} matting actor(s) at {matte_gpus:g} GPU each, {caption_actors} "
            f"captioner actor(s) at {caption_gpus:g} and {num_actors} CLIPSeg actor(s) at {share:g} ask for more "
            "than a GPU: lower data.matte.num_gpus, data.matte.num_actors, data.caption.num_gpus, "
            "data.caption.num_actors, data.segment.num_actors or data.segment.num_gpus"
        )
    return share


def matte_backend(setting: str, cluster_gpus: float) -> str:
    """data.matte.backend with "auto" resolved, once for the whole plan: torch where the stages
    are laid out with GPUs, else pymatting. Resolved here, not in the worker: Ray hides the GPUs
    from a worker that asked for none, so a worker would never see one to pick torch for."""
    if setting != "auto":
        return setting
    return "torch" if cluster_gpus > 0 else "pymatting"


def matte_stage(
    matte: MatteConfig, cluster: Cluster, photo_size: int = 512, finish: dict[str, Any] | None = None
) -> StageSpec:
    """The matte stage on `cluster`. torch on a cluster with GPUs gets the batched
    `MatteFilterComposite` actors, which build their kernels on a warm-up at `photo_size`
    (decode's size) and filter and composite on their GPU with `finish` ({"filter_args",
    "composite_args"}); everything else, and every backend in one process, gets one photo per
    CPU task, the unit pymatting solves, and leaves the filter and composites to the task after."""
    backend = matte_backend(matte.backend, cluster.gpus)
    if backend == "torch" and cluster.gpus > 0 and cluster.pools:
        return StageSpec(
            "matte",
            MatteFilterComposite,
            {"batch_size": matte.batch_size, "tol": matte.tol, "photo_size": photo_size, **(finish or {})},
            batch_size=matte.batch_size,
            num_gpus=matte.num_gpus,
            actors=matte.resolved_actors(cluster.gpus),
        )
    return StageSpec(
        "matte", matte_batch, {"backend": backend, "tol": matte.tol}, batch_size=1, concurrency=matte.concurrency
    )


def captioner_family(model_path: str) -> str | None:
    """The captioner's model_type ("blip", "blip-2", ...) from the config.json of a local model
    folder; None for a hub id or a folder whose config cannot be read (the caption actors then
    load it and report what is wrong). Only a regular file of at most 1 MiB is read: a FIFO
    there would block the plan."""
    config = Path(model_path) / "config.json"
    try:
        if not config.is_file() or config.stat().st_size > 2**20:
            return None
        family = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return family if isinstance(family, str) else None


def caption_stage(caption: CaptionConfig, model_path: str, cluster: Cluster, photo_size: int) -> StageSpec:
    """The captioner's actor pool on `cluster`. It runs after CLIPSeg, so that photos the filter's
    exclude_prompts reject there are never captioned, and before matting, on photos alone: after
    it, rows carry each photo's composites too."""
    actors, batch_size, gpus = caption.resolved(cluster.gpus, captioner_family(model_path))
    args = {"prompt": caption.prompt, "max_new_tokens": caption.max_new_tokens, "num_beams": caption.num_beams, "attention": caption.attention}
    return StageSpec(
        "caption",
        Captioner,
        {"model_path": model_path, "batch_size": batch_size, "photo_size": photo_size, **args},
        batch_size=batch_size,
        # Without GPUs it holds no CPU of its own and shares the tasks' cores: on 2 (CI, the
        # demo on a laptop), CLIPSeg's actor and the tasks take one each and would leave none.
        num_cpus=1 if cluster.gpus > 0 else 0,
        num_gpus=gpus,
        actors=actors,
    )


def data_stages(
    config: Config, cluster: Cluster, backgrounds: list[tuple[str, str]], dataset_version: str
) -> list[StageSpec]:
    """The data build's stages, in order, laid out on `cluster`: decode, CLIPSeg and trimap,
    caption (with data.caption.enabled), matte, then what is left of filter, composite and
    encode. Raises ConfigError when the actors' GPU shares add up to more than a GPU."""
    data = config.data
    finish = finish_args(config, backgrounds, dataset_version)
    on_device = {name: finish[name] for name in ("filter_args", "composite_args")}
    matte = matte_stage(data.matte, cluster, photo_size=data.decode.size, finish=on_device)
    caption = [caption_stage(data.caption, config.model_path("captioner"), cluster, data.decode.size)] if data.caption.enabled else []
    segment_actors, segment_batch = data.segment.resolved(cluster.gpus)
    segment = StageSpec(
        "segment",
        SegmentAndTrimap,
        {
            "model_path": config.model_path("clipseg"),
            "prompt_template": data.segment.prompt_template,
            "batch_size": segment_batch,
            "normalize": data.segment.normalize,
            "exclude_prompts": data.filter.exclude_prompts,
            "exclude_area": data.filter.exclude_area,
            "trimap_args": data.trimap.model_dump(),
        },
        batch_size=segment_batch,
        num_gpus=gpus_per_segment_actor(
            data.segment.num_gpus, matte.num_gpus, cluster.gpus, segment_actors, matte.actors,
            sum(c.num_gpus for c in caption), sum(c.actors for c in caption),
        ),  # fmt: skip
        actors=segment_actors,
    )
    if matte.actors:  # they filtered and composited on their device
        rest = StageSpec(
            "encode", encode_batch, finish["encode_args"], batch_size=_FINISH_BATCH_SIZE * data.composite.per_photo
        )
    else:
        rest = StageSpec("filter_composite_encode", filter_composite_encode, finish, batch_size=_FINISH_BATCH_SIZE)
    decode = StageSpec("decode", decode_batch, data.decode.model_dump(), batch_size=4)
    return [decode, segment, *caption, matte, rest]


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
    `MatteFilterComposite` actors.

    Ray Data hands an actor a bundle of whole blocks holding at least `batch_size` rows. Blocks
    of ~31 photos (2,000 split over 4 blocks per CPU of 16) made bundles of 93 and batches of 64
    + 29, and the GPU solves 29 photos at well under the rate of 64. With blocks of one batch,
    every bundle is one full batch, as long as blocks stay whole up to the matte actor: Ray cuts
    a task's output once it passes 128 MiB, and 64 photos at 512 px are ~117 MB (the photo with
    its confidence map or trimap). Bigger batches get cut on the way; the actor then solves a
    bundle in even parts (74 + 74, not 128 + 20)."""
    chunks = [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
    return ray.data.from_arrow([pa.Table.from_pylist(chunk) for chunk in chunks])


def check_cpus_left(cluster_cpus: float, actor_cpus: float) -> None:
    """Raise ConfigError when the plan's actors (`actor_cpus` CPUs in all, held for the whole
    plan) leave no CPU for its tasks: decode would never run and the build would wait forever."""
    if cluster_cpus - actor_cpus < 1:
        raise ConfigError(
            f"the data plan's actors (data.segment.num_actors, data.caption.num_actors, data.matte.num_actors) hold "
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

    `photos` holds one dict per input with subject_id, category, source_uri, source_path,
    source_sha256, and caption when the photo has one of its own. Nothing runs until the dataset
    is written.
    """
    data = config.data
    items = [
        {
            SUBJECT_ID: p[SUBJECT_ID],
            CATEGORY: p[CATEGORY],
            SOURCE_URI: p[SOURCE_URI],
            SOURCE_PATH: p[SOURCE_PATH],
            SOURCE_SHA256: p[SOURCE_SHA256],
            CAPTION: p.get(CAPTION, ""),
            CAPTION_SOURCE: CAPTION_USER if p.get(CAPTION) else "",
            REJECT_STAGE: "",
            REJECT_REASON: "",
        }
        for p in photos
    ]
    resources = ray.cluster_resources()
    cluster = Cluster(cpus=resources.get("CPU", 0), gpus=resources.get("GPU", 0))
    stages = data_stages(config, cluster, backgrounds, dataset_version)
    check_cpus_left(cluster.cpus, sum(stage.actors * stage.num_cpus for stage in stages))
    if any(stage.actors for stage in stages if stage.name == "matte"):
        ds = batch_aligned_dataset(items, data.matte.batch_size)
    else:
        ds = ray.data.from_items(
            items, override_num_blocks=_num_blocks(len(items), data.write.rows_per_file // data.composite.per_photo)
        )
    for stage in stages:
        ds = stage.map_batches(ds)
    return ds


def finish_args(config: Config, backgrounds: list[tuple[str, str]], dataset_version: str) -> dict[str, Any]:
    """Keyword arguments of `filter_composite_encode` for this config; a `MatteFilterComposite`
    actor takes the filter's and the composite's."""
    data = config.data
    return {
        "filter_args": data.filter.model_dump(include={"min_area", "max_area"}),  # exclude_*: the segment actor's
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
