"""A small training set held in the worker's memory: one subject's fine-tuning rows.

finetune-many's actors train without Ray Train or Ray Data (pipeline/train/many.py): a subject
has tens of rows, which a Ray Data plan would re-run as tasks every epoch (every 2-3 steps at
batch 3), and those tasks would need CPUs beside the ones the actors hold. Here the rows are
decoded once; each epoch is a new order (with `train.shuffle_buffer` > 0) and new random crops
of the target, the same per-row work as `stages.train_inputs.prepare_batch`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.train.data import DatasetInfo
from stages.records import CATEGORY, COMPOSITE, IMAGE
from stages.train_inputs import CAPTION, PATH, PIXEL_VALUES, TARGET, crop_target, decode_column, subject_pixels


class InMemoryShard:
    """The rows of `info`, decoded: photos uint8 (H, W, 3) and composites already as Q-Former
    input (N, 3, S, S) float32. `iter_torch_batches` is Ray's DataIterator's, one call per epoch."""

    def __init__(self, info: DatasetInfo, processor: Any, resolution: int, crop: str) -> None:
        columns = [CATEGORY, IMAGE, COMPOSITE] + ([CAPTION] if info.has_caption else [])
        # Each row with its data file (PATH), which a row whose image does not decode is named by.
        tables = [pq.read_table(f, columns=columns) for f in info.files]
        table = pa.concat_tables(t.append_column(PATH, pa.array([f] * t.num_rows, pa.string())) for f, t in zip(info.files, tables, strict=True))
        batch = table.to_pydict()
        self.categories = np.asarray(batch[CATEGORY], dtype=object)
        captions = batch[CAPTION] if info.has_caption else [""] * table.num_rows
        self.captions = np.asarray([c or "" for c in captions], dtype=object)
        self.photos = decode_column(batch, IMAGE)
        self.pixels = np.stack([subject_pixels(c, processor) for c in decode_column(batch, COMPOSITE)])
        self.resolution, self.crop = resolution, crop
        self._rng: np.random.Generator | None = None

    def iter_torch_batches(
        self,
        *,
        batch_size: int,
        collate_fn: Callable[[dict[str, np.ndarray]], dict[str, Any]],
        local_shuffle_buffer_size: int | None = None,
        local_shuffle_seed: int | None = None,  # unused: the order comes from the loop's torch seed
        drop_last: bool = False,
        prefetch_batches: int = 0,
    ) -> Iterator[dict[str, Any]]:
        """One epoch. Any shuffle buffer shuffles the whole epoch (it holds every row here)."""
        if self._rng is None:
            # The loop seeds torch (seed, rank, resumed step) before it draws the first batch.
            self._rng = np.random.default_rng(torch.initial_seed())
        rows = len(self.photos)
        order = self._rng.permutation(rows) if local_shuffle_buffer_size else np.arange(rows)
        end = rows - rows % batch_size if drop_last else rows
        for start in range(0, end, batch_size):
            index = order[start : start + batch_size]
            yield collate_fn({
                CATEGORY: self.categories[index],
                CAPTION: self.captions[index],
                PIXEL_VALUES: self.pixels[index],
                TARGET: np.stack([crop_target(self.photos[i], self.resolution, self.crop, self._rng) for i in index]),
            })
