"""Write stage: encode arrays to image bytes and stream rows into Parquet shards.

`encode_batch` turns each row's arrays into PNG/JPEG bytes and keeps only the published
columns. `ShardSink` writes one data shard and one reject shard per write task, and returns
per-task counts and stage timings that the driver adds up, so the manifest's numbers come from
what was actually written.
"""

from __future__ import annotations

import io
import uuid
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from ray.data import Datasink

from stages.composite import COMPOSITE_INDEX
from stages.records import (
    ALPHA,
    ALPHA_AREA,
    BACKGROUND_ID,
    CAPTION,
    CAPTION_SOURCE,
    CATEGORY,
    COMPOSITE,
    FOREGROUND,
    HEIGHT,
    IMAGE,
    PLACEMENT,
    REJECT_REASON,
    REJECT_STAGE,
    SEED,
    SOURCE_SHA256,
    SOURCE_URI,
    SUBJECT_ID,
    TIMING_PREFIX,
    TRIMAP,
    WIDTH,
    healthy_rows,
)

DATASET_VERSION = "dataset_version"

DATA_SCHEMA = pa.schema(
    [
        (SUBJECT_ID, pa.string()),
        (CATEGORY, pa.string()),
        (SOURCE_URI, pa.string()),
        (SOURCE_SHA256, pa.string()),
        (IMAGE, pa.binary()),  # the target: the decoded, resized original photo
        (COMPOSITE, pa.binary()),  # the model input: the subject on a new background
        (ALPHA, pa.binary()),  # 8-bit PNG, the subject's matte in the target's frame
        # The subject's colours (estimate_foreground) in the target's frame, as `image` is
        # encoded: with ALPHA, the cutout that training pastes anew (train.composite online).
        (FOREGROUND, pa.binary()),
        (TRIMAP, pa.binary()),  # 8-bit PNG: 0 background, 128 unknown, 255 foreground
        (BACKGROUND_ID, pa.string()),
        (SEED, pa.int64()),
        (COMPOSITE_INDEX, pa.int32()),
        (PLACEMENT, pa.string()),  # JSON {x, y, width, height, scale} of the subject in the composite
        (WIDTH, pa.int32()),
        (HEIGHT, pa.int32()),
        (ALPHA_AREA, pa.float32()),
        (CAPTION, pa.string()),  # the training prompt's text; "" = none (train.prompt_template)
        (CAPTION_SOURCE, pa.string()),  # user (captions.csv), model (the captioner) or ""
        (DATASET_VERSION, pa.string()),  # the version that produced the row (carried rows keep theirs)
    ]
)

REJECT_SCHEMA = pa.schema(
    [
        (SOURCE_URI, pa.string()),
        (SUBJECT_ID, pa.string()),
        (CATEGORY, pa.string()),
        (SOURCE_SHA256, pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
    ]
)


def encode_image(array: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """uint8 (H, W, 3) or (H, W) -> PNG or JPEG bytes."""
    buf = io.BytesIO()
    img = Image.fromarray(array)
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    else:
        # Level 3 with zlib's run-length strategy: mattes and trimaps are long runs of 0 and 255.
        # On closed-form mattes of the sample it takes 0.78x the time of plain level 3 and gives
        # 0.82x the bytes (trimaps 0.61x), less than level 6 takes either way (BENCHMARKS.md, "The CPU task after matting").
        img.save(buf, format="PNG", compress_level=3, compress_type=zlib.Z_RLE)
    return buf.getvalue()


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """float in [0, 1] -> uint8 in [0, 255], rounded. uint8 is taken as scaled already and
    returned as is: the matte actor that composites on its device sends ALPHA and TRIMAP so."""
    if unit.dtype == np.uint8:
        return unit
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


def encode_batch(
    batch: dict[str, np.ndarray], *, image_format: str, jpeg_quality: int, dataset_version: str
) -> dict[str, np.ndarray]:
    """Ray Data adapter: arrays -> bytes; keeps the published columns plus reject and timing ones."""
    n = len(batch[SOURCE_URI])
    encoded = {name: np.full(n, b"", dtype=object) for name in (IMAGE, COMPOSITE, ALPHA, TRIMAP, FOREGROUND)}
    # A photo's K composite rows share its target, alpha, trimap and foreground: encode those
    # once per photo (the composite stage keeps a photo's rows in one batch), not K times.
    per_photo: dict[str, tuple[bytes, bytes, bytes, bytes]] = {}
    for i in healthy_rows(batch):
        uri = batch[SOURCE_URI][i]
        if uri not in per_photo:
            per_photo[uri] = (
                encode_image(batch[IMAGE][i], image_format, jpeg_quality),
                encode_image(to_uint8(batch[ALPHA][i])),
                encode_image(to_uint8(batch[TRIMAP][i])),
                encode_image(batch[FOREGROUND][i], image_format, jpeg_quality),
            )
        encoded[IMAGE][i], encoded[ALPHA][i], encoded[TRIMAP][i], encoded[FOREGROUND][i] = per_photo[uri]
        encoded[COMPOSITE][i] = encode_image(batch[COMPOSITE][i], image_format, jpeg_quality)
    keep = [name for name in DATA_SCHEMA.names if name in batch and name not in encoded]
    out = {name: batch[name] for name in keep}
    out.update(encoded)
    for name in (CAPTION, CAPTION_SOURCE):  # a plan without the caption columns wrote no captions
        out.setdefault(name, np.full(n, "", dtype=object))
    out[DATASET_VERSION] = np.full(n, dataset_version, dtype=object)
    for name in batch:
        if name.startswith(TIMING_PREFIX) or name in (REJECT_STAGE, REJECT_REASON):
            out[name] = batch[name]
    return out


def split_block(table: pa.Table) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """An encoded block -> (data rows, reject rows, stats) with the published schemas.

    stats: rows, accepted (photos with rows), rejected, and seconds per stage summed over photos.
    """
    healthy = pc.equal(table[REJECT_STAGE], "")
    data = table.filter(healthy).select(DATA_SCHEMA.names).cast(DATA_SCHEMA)
    bad = table.filter(pc.invert(healthy))
    rejects = pa.table(
        {
            SOURCE_URI: bad[SOURCE_URI],
            SUBJECT_ID: bad[SUBJECT_ID],
            CATEGORY: bad[CATEGORY],
            SOURCE_SHA256: bad[SOURCE_SHA256],
            "stage": bad[REJECT_STAGE],
            "reason": bad[REJECT_REASON],
        }
    ).cast(REJECT_SCHEMA)
    # A photo's stage timings sit on each of its rows until compositing, then on its first row.
    first_rows = table.filter(pc.equal(table[COMPOSITE_INDEX], 0))
    seconds = {
        name[len(TIMING_PREFIX) :]: float(pc.sum(pc.fill_null(first_rows[name], 0.0)).as_py() or 0.0)
        for name in table.column_names
        if name.startswith(TIMING_PREFIX)
    }
    stats = {
        "rows": data.num_rows,
        "accepted": int(pc.sum(pc.equal(data[COMPOSITE_INDEX], 0)).as_py() or 0),
        "rejected": rejects.num_rows,
        "seconds": seconds,
    }
    return data, rejects, stats


class ShardSink(Datasink):
    """Writes `root/data/part-*.parquet` and `root/rejects/part-*.parquet`, one pair per task.

    It deliberately sets no `min_rows_per_write`: Ray would then bundle blocks up to that many
    rows before the write, and since the write fuses with the map stages before it, matting
    would run in that one task. Shard size is set by the plan's block size instead.

    `results` (driver side, after the write) holds each task's stats dict.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.results: list[dict[str, Any]] = []

    def on_write_start(self, schema=None) -> None:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        (self.root / "rejects").mkdir(parents=True, exist_ok=True)

    def write(self, blocks, ctx) -> dict[str, Any]:
        name = f"part-{ctx.task_idx:05d}-{uuid.uuid4().hex[:8]}.parquet"
        totals: dict[str, Any] = {"rows": 0, "accepted": 0, "rejected": 0, "seconds": {}}
        data_writer = None
        reject_parts = []
        for block in blocks:
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block, preserve_index=False)
            if table.num_rows == 0:
                continue
            data, rejects, stats = split_block(table)
            if data.num_rows:
                if data_writer is None:
                    data_writer = pq.ParquetWriter(self.root / "data" / name, DATA_SCHEMA)
                data_writer.write_table(data, row_group_size=64)
            if rejects.num_rows:
                reject_parts.append(rejects)
            totals["rows"] += stats["rows"]
            totals["accepted"] += stats["accepted"]
            totals["rejected"] += stats["rejected"]
            for stage, secs in stats["seconds"].items():
                totals["seconds"][stage] = totals["seconds"].get(stage, 0.0) + secs
        if data_writer is not None:
            data_writer.close()
        if reject_parts:
            pq.write_table(pa.concat_tables(reject_parts), self.root / "rejects" / name)
        return totals

    def on_write_complete(self, write_result) -> None:
        self.results = list(write_result.write_returns)
