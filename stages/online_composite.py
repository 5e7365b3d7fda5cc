"""Fresh composites every epoch (train.composite online): a row's cutout pasted onto a random
background of the pool, at a random place, seeded by (run seed, epoch, row).

The draws are the composite stage's (stages/composite.py draw_composite) and so are the pixels:
paste_subject with PIL on the CPU, composite_subjects_torch on a GPU. Only the seed differs
from the build's, so the same (seed, epoch, row) gives the same composite in any process, order
or resumed run, and another epoch gives another composite.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from stages.composite import COMPOSITE_INDEX, covered_background, draw_composite, paste_subject, subject_bbox
from stages.composite_torch import PasteJob, composite_subjects_torch
from stages.records import ALPHA, CATEGORY, FOREGROUND, IMAGE, SOURCE_SHA256
from stages.train_inputs import CAPTION, TARGET, crop_target, decode_column, row_rngs

ROW_KEY = "row_key"  # int64: the row's identity for its draws (row_key of its photo and composite index)
PASS_INDEX = "pass_index"  # int64: which pass of a Ray Data epoch's union the row is in (training_passes)


def row_key(sha256_hex: str, composite_index: int) -> int:
    """A 63-bit identity of a dataset row: its photo's content hash and its composite index."""
    digest = hashlib.sha256(f"{sha256_hex}:{composite_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def epoch_seed(seed: int, epoch: int, key: int) -> int:
    """A 63-bit seed unique to (run seed, epoch, row key)."""
    digest = hashlib.sha256(f"online:{seed}:{epoch}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def to_unit(alpha: np.ndarray) -> np.ndarray:
    """A stored alpha, uint8 (H, W) 0-255, as float32 in [0, 1]."""
    return alpha.astype(np.float32) / np.float32(255.0) if alpha.dtype == np.uint8 else alpha.astype(np.float32)


# Columns `prepare_cutout_batch` reads from the dataset (CAPTION too when the dataset has it).
CUTOUT_COLUMNS = (CATEGORY, IMAGE, FOREGROUND, ALPHA, SOURCE_SHA256, COMPOSITE_INDEX)


def prepare_cutout_batch(
    batch: dict[str, np.ndarray], *, resolution: int, crop: str, decode: bool = True, seed: int | None = None
) -> dict[str, np.ndarray]:
    """Ray Data adapter for online composites: encoded rows -> category, caption, TARGET (as
    stages.train_inputs.prepare_batch makes it), the cutout decoded (FOREGROUND uint8 (H, W, 3),
    ALPHA uint8 (H, W); photos differ in size, so these are ragged) and ROW_KEY. The composite is
    made later, where the epoch is known (pipeline/train/data.py FeedCollate). With `decode`
    False the cutout stays as the dataset stores it (PNG/JPEG bytes, ~10x smaller): the
    precompute of the targets caches it so, and `decode_cutouts` decodes it when it is read.
    Random crops of the targets as prepare_batch's: with `seed`, each row's own (row_rngs)."""
    n = len(batch[CATEGORY])
    captions = batch[CAPTION] if CAPTION in batch else np.full(n, "", dtype=object)
    if decode:
        foregrounds, alphas = decode_cutouts(batch)
    else:
        foregrounds, alphas = np.asarray(batch[FOREGROUND], dtype=object), np.asarray(batch[ALPHA], dtype=object)
    photos = decode_column(batch, IMAGE)
    return {
        CATEGORY: np.asarray(batch[CATEGORY], dtype=object),
        CAPTION: np.asarray([c or "" for c in captions], dtype=object),
        TARGET: np.stack([crop_target(p, resolution, crop, rng) for p, rng in zip(photos, row_rngs(batch[IMAGE], seed), strict=True)]),
        FOREGROUND: foregrounds,
        ALPHA: alphas,
        ROW_KEY: np.asarray([row_key(str(h), int(k)) for h, k in zip(batch[SOURCE_SHA256], batch[COMPOSITE_INDEX], strict=True)], np.int64),
    }


def decode_cutouts(batch: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """A batch's stored cutout bytes (FOREGROUND, ALPHA) -> object arrays of FOREGROUND uint8
    (H, W, 3) and ALPHA uint8 (H, W), one array per row (ragged: photos differ in size).
    UndecodableImage for bytes that are not an image (stages.train_inputs.decode_column)."""
    out_fg, out_alpha = np.empty(len(batch[FOREGROUND]), dtype=object), np.empty(len(batch[ALPHA]), dtype=object)
    out_fg[:] = decode_column(batch, FOREGROUND)
    out_alpha[:] = decode_column(batch, ALPHA, mode="L")
    return out_fg, out_alpha


class OnlineCompositor:
    """Pastes cutouts onto the pool's backgrounds: `backgrounds` [(id, path)] in a fixed order,
    the subject's long side a random fraction in [scale_min, scale_max] of the canvas' short
    side, the run's `seed`. On a CUDA `device` the pixels are made there, on their own stream."""

    def __init__(
        self,
        backgrounds: Sequence[tuple[str, str]],
        seed: int,
        scale_min: float,
        scale_max: float,
        device: torch.device | str = "cpu",
    ) -> None:
        self.backgrounds = [tuple(b) for b in backgrounds]
        self.seed, self.scale_min, self.scale_max = seed, scale_min, scale_max
        self.device = torch.device(device)
        self._upload = lru_cache(maxsize=64)(self._upload_background)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def composites(
        self, foregrounds: Sequence[np.ndarray], alphas: Sequence[np.ndarray], keys: Sequence[int], epochs: Sequence[int]
    ) -> list[np.ndarray]:
        """Row i's composite for epoch epochs[i]: foregrounds[i] uint8 (H, W, 3), alphas[i] uint8
        0-255 or float in [0, 1] (H, W), keys[i] its row_key. uint8 (H, W, 3) each, on the host."""
        alphas = [to_unit(a) for a in alphas]
        draws = []
        for alpha, key, epoch in zip(alphas, keys, epochs, strict=True):
            height, width = alpha.shape
            bbox = subject_bbox(alpha)
            seed = epoch_seed(self.seed, int(epoch), int(key))
            draws.append((bbox, draw_composite(0, seed, height, width, bbox, self.backgrounds, self.scale_min, self.scale_max)))
        if self._stream is None:
            return [
                paste_subject(fg, alpha, covered_background(d.background_path, *alpha.shape), bbox, d.placement)
                for fg, alpha, (bbox, d) in zip(foregrounds, alphas, draws, strict=True)
            ]
        with torch.cuda.stream(self._stream):
            return self._torch_pixels(foregrounds, alphas, draws)

    def _torch_pixels(
        self, foregrounds: Sequence[np.ndarray], alphas: Sequence[np.ndarray], draws: list[tuple[tuple[int, int, int, int], Any]]
    ) -> list[np.ndarray]:
        """composite_subjects_torch's pixels of (bbox, CompositeDraw) `draws` on self.device."""
        fg_dev = [torch.tensor(fg).to(self.device, non_blocking=True) for fg in foregrounds]
        alpha_dev = [torch.tensor(a).to(self.device, non_blocking=True) for a in alphas]
        jobs = [
            PasteJob(i, bbox, d.placement, self._upload(d.background_path, *alphas[i].shape))
            for i, (bbox, d) in enumerate(draws)
        ]
        return [p.cpu().numpy() for p in composite_subjects_torch(fg_dev, alpha_dev, jobs)]

    def _upload_background(self, path: str, height: int, width: int) -> torch.Tensor:
        return torch.tensor(covered_background(path, height, width), device=self.device)
