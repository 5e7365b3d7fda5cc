"""The training feed's Ray Data map functions, importable without torch.

A training job's plan (pipeline.train.data.build_training_plan) is unpickled by Ray Train's
controller, its DatasetManager and the feed's SplitCoordinator, each a process of its own that
starts before the first batch. Unpickling a function imports its module, and a processor its
class's: with the stages' functions and the checkpoint's image processor in the plan, each of
those processes imported torch, transformers and diffusers first (~10 s of CPU a process),
which no one of them calls. The functions here name their stage only when a task runs them, and
the image processor travels as pickled bytes that only the task opens.
"""

from __future__ import annotations

import pickle
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa


def pack_processor(processor: Any) -> bytes:
    """The image processor as `prepare_rows` takes it: pickled, opened in the task."""
    return pickle.dumps(processor)


@lru_cache(maxsize=4)
def _open_processor(packed: bytes) -> Any:
    return pickle.loads(packed)


def prepare_rows(batch: dict[str, np.ndarray], *, processor: bytes, **kwargs: Any) -> dict[str, np.ndarray]:
    """stages.train_inputs.prepare_batch, the processor given as `pack_processor` made it."""
    from stages.train_inputs import prepare_batch

    return prepare_batch(batch, processor=_open_processor(processor), **kwargs)


def prepare_cutout_rows(batch: dict[str, np.ndarray], **kwargs: Any) -> dict[str, np.ndarray]:
    """stages.online_composite.prepare_cutout_batch."""
    from stages.online_composite import prepare_cutout_batch

    return prepare_cutout_batch(batch, **kwargs)


def decode_cutout_rows(table: pa.Table) -> pa.Table:
    """pipeline.train.data.decode_cutout_columns (the online targets' precomputed cache)."""
    from pipeline.train.data import decode_cutout_columns

    return decode_cutout_columns(table)


def tag_pass(table: pa.Table, *, index: int) -> pa.Table:
    """The rows with their pass's number in stages.online_composite.PASS_INDEX (online
    composites count a pass as an epoch)."""
    from stages.online_composite import PASS_INDEX

    return table.append_column(PASS_INDEX, pa.array(np.full(table.num_rows, index, np.int64)))
