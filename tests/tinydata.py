"""A published dataset version written directly (no matting), for training tests.

Rows follow the published schema (stages.write.DATA_SCHEMA) and the version is published the
way `data build` does it (staging, manifest, atomic rename, `latest`), so the trainer reads it
exactly as it reads a built one, in a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.versions import MANIFEST, DatasetStore, write_json_atomic
from stages.write import DATA_SCHEMA, encode_image
from tests.imagefiles import photo


def _blob_alpha(size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W): an opaque ellipse in the middle of a W x H = `size` photo, the subject's matte."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    return np.where(((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 3)) ** 2 < 1, 255, 0).astype(np.uint8)


def publish_dataset(
    root: Path, subjects: dict[str, str], per_subject: int = 2, size: tuple[int, int] = (80, 64)
) -> Path:
    """OUT=`root` gets a new version with `per_subject` rows per subject ({subject_id: category}),
    photos and composites of W x H = `size`; returns the version folder. Zero rows is allowed."""
    store = DatasetStore(root)
    version = store.next_version()
    staging = store.new_staging(version)
    (staging / "data").mkdir()
    rows = []
    for s, (subject_id, category) in enumerate(sorted(subjects.items())):
        for i in range(per_subject):
            rows.append(
                {
                    "subject_id": subject_id,
                    "category": category,
                    "source_uri": f"{subject_id}/{i}.png",
                    "source_sha256": f"{s:032d}{i:032d}",
                    "image": encode_image(np.asarray(photo(10 * s + i, size))),
                    "composite": encode_image(np.asarray(photo(1000 + 10 * s + i, size))),
                    "foreground": encode_image(np.asarray(photo(10 * s + i, size))),
                    "alpha": encode_image(_blob_alpha(size)),
                    "trimap": b"",
                    "background_id": "bg",
                    "seed": i,
                    "composite_index": 0,
                    "placement": "{}",
                    "width": size[0],
                    "height": size[1],
                    "alpha_area": 0.5,
                    "dataset_version": version,
                }
            )
    if rows:
        pq.write_table(pa.Table.from_pylist(rows, schema=DATA_SCHEMA), staging / "data" / "part-00000.parquet")
    counts = {sid: {"category": cat, "rows": per_subject} for sid, cat in subjects.items()}
    write_json_atomic(staging / MANIFEST, {"version": version, "rows": len(rows), "subjects": counts})
    return store.publish(staging, version)
