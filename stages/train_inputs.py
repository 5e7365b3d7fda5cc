"""Training inputs: dataset rows -> model-ready arrays, and what the frozen encoders make of them.

Pure cores:
- `crop_target(photo, resolution, crop, rng)`: the target photo, uint8 (H, W, 3)
  -> float32 (3, R, R) in [-1, 1], short side resized to R, then a random or centre R x R crop.
- `subject_pixels(composite, processor)`: the composite, uint8 (H, W, 3) -> float32 (3, S, S),
  CLIP-normalised at the Q-Former's input size S (the checkpoint's image processor).
- `latent_params(vae, images)`: (B, 3, R, R) in [-1, 1] -> (B, 2C, R/8, R/8), the VAE
  posterior's mean and log-variance; `sample_latents` in pipeline.train.losses draws from it.
- `image_features(qformer, pixels)`: (B, 3, S, S) -> (B, 1 + N, Dv), the frozen ViT's features.

Decoding: `decode_rgb` / `decode_column` (both `_decode_bytes`), the one decode of a row's image
bytes in training (the Ray Data feeds, the in-memory shard, the online cutouts), raise
UndecodableImage for bytes that are not an image, naming the column and the data file. The
photos a build reads come in through stages/decode.py's decode_image instead (resize, limits).

Batch adapters: `prepare_batch` (a Ray Data map function: decode, crop, preprocess) and
`FrozenEncoder` (a Ray Data actor that loads the VAE and the ViT once and replaces the pixel
columns by their encodings, for training from precomputed inputs; the VAE alone for online
composites, whose ViT input is new each epoch).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from stages.decode import CORRUPT_IMAGE_ERRORS

# CAPTION: a column of datasets the caption stage wrote; rows without one (or an empty one) get
# the prompt template.
from stages.records import CAPTION, CATEGORY, COMPOSITE, IMAGE

PIXEL_VALUES = "pixel_values"  # float32 (3, S, S), the composite as Q-Former input
TARGET = "target"  # float32 (3, R, R) in [-1, 1], the photo to reconstruct
LATENT_PARAMS = "latent_params"  # float32 (2C, R/8, R/8): VAE posterior mean and log-variance
IMAGE_FEATURES = "image_features"  # float16 (1 + N, Dv): frozen ViT features of the composite

PATH = "path"  # a row's data file, the column ray.data.read_parquet(include_paths=True) adds

# Columns `prepare_batch` reads from the dataset (CAPTION too when the dataset has it).
INPUT_COLUMNS = (CATEGORY, IMAGE, COMPOSITE)


class UndecodableImage(ValueError):
    """A row's image bytes that PIL cannot decode (not an image, or cut short): a damaged dataset
    version, not a bug. Carries the column, the data file where the batch had PATH, and the
    bytes' SHA-256, by which the driver finds the row (pipeline.train.data
    undecodable_rows_refused). The same rows fail the same way on every attempt."""

    def __init__(self, reason: str, sha256: str, column: str | None = None, file: str | None = None) -> None:
        super().__init__(reason, sha256, column, file)
        self.reason, self.sha256, self.column, self.file = reason, sha256, column, file

    def __reduce__(self) -> tuple[type, tuple[str, str, str | None, str | None]]:
        # Rebuilt from its fields between processes: Ray Data appends retry advice to args[0].
        return type(self), (self.reason, self.sha256, self.column, self.file)

    def at(self, column: str, file: str | None) -> UndecodableImage:
        return UndecodableImage(self.reason, self.sha256, column, file)

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        return f"{where}{self.column or 'image'} does not decode: {self.reason} (bytes sha256 {self.sha256[:16]})"


def _decode_bytes(data: bytes | None, mode: str = "RGB") -> np.ndarray:
    """JPEG/PNG bytes -> uint8 (H, W, 3) in RGB, (H, W) in L. UndecodableImage when they are
    missing, not an image or cut short."""
    try:
        with Image.open(io.BytesIO(data or b"")) as img:
            return np.asarray(img.convert(mode))
    except UnidentifiedImageError:
        reason = "not an image (no format PIL recognises)" if data else "no bytes"
    except CORRUPT_IMAGE_ERRORS as exc:  # a recognised format, damaged or truncated
        reason = f"corrupt or truncated image: {exc}"
    raise UndecodableImage(reason, hashlib.sha256(data or b"").hexdigest())


def decode_rgb(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 (H, W, 3); UndecodableImage for bytes that are not an image."""
    return _decode_bytes(data, "RGB")


def decode_column(batch: Mapping[str, Any], column: str, mode: str = "RGB") -> list[np.ndarray]:
    """Each row's `column` decoded (_decode_bytes); the UndecodableImage of a row that does not
    decode names the column and, where the batch has PATH, the row's data file."""
    decoded = []
    for i, data in enumerate(batch[column]):
        try:
            decoded.append(_decode_bytes(data, mode))
        except UndecodableImage as exc:
            raise exc.at(column, str(batch[PATH][i]) if PATH in batch else None) from None
    return decoded


def crop_target(photo: np.ndarray, resolution: int, crop: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, R, R) in [-1, 1]: resize the short side to R (bicubic),
    then crop R x R at a random offset (`crop="random"`) or about the centre."""
    h, w = photo.shape[:2]
    if min(h, w) != resolution:
        scale = resolution / min(h, w)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        photo = np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.BICUBIC))
        h, w = photo.shape[:2]
    if crop == "random":
        top, left = int(rng.integers(0, h - resolution + 1)), int(rng.integers(0, w - resolution + 1))
    else:
        top, left = (h - resolution) // 2, (w - resolution) // 2
    window = photo[top : top + resolution, left : left + resolution]
    return (window.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)


def subject_pixels(composite: np.ndarray, processor: Any) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (3, S, S) through the checkpoint's image processor (exactly
    what `BlipDiffusion.encode_subject` does to a reference photo)."""
    return processor.preprocess(Image.fromarray(composite))[0].numpy()


def prepare_batch(
    batch: dict[str, np.ndarray], *, processor: Any, resolution: int, crop: str, seed: int | None = None
) -> dict[str, np.ndarray]:
    """Ray Data adapter: encoded rows -> category, caption, PIXEL_VALUES and TARGET.

    Random crops: with `seed`, each row's is its own (`row_rngs`), the same in any batch, task
    or run; without, drawn from a fresh generator per call, so each epoch (Ray Data re-runs the
    map) sees new crops.
    """
    n = len(batch[CATEGORY])
    captions = batch[CAPTION] if CAPTION in batch else np.full(n, "", dtype=object)
    pixels = np.stack([subject_pixels(c, processor) for c in decode_column(batch, COMPOSITE)])
    photos = zip(decode_column(batch, IMAGE), row_rngs(batch[IMAGE], seed), strict=True)
    return {
        CATEGORY: np.asarray(batch[CATEGORY], dtype=object),
        CAPTION: np.asarray([c or "" for c in captions], dtype=object),
        PIXEL_VALUES: pixels,
        TARGET: np.stack([crop_target(photo, resolution, crop, rng) for photo, rng in photos]),
    }


def row_rngs(images: Any, seed: int | None) -> list[np.random.Generator]:
    """One generator per row of `images` (encoded bytes) for its random crop. With `seed`, a
    row's comes from (seed, its bytes' SHA-256), so the row gets the same crop whichever map
    batch, task or run it lands in: a batch-wide generator would hand a row the draw of its
    place in the batch, and Ray Data's batches are cut where its tasks' blocks end. Without, one
    fresh generator for the batch."""
    if seed is None:
        return [np.random.default_rng()] * len(images)
    keys = (int.from_bytes(hashlib.sha256(data).digest()[:8], "little") for data in images)
    return [np.random.default_rng([seed, key]) for key in keys]


@torch.no_grad()
def latent_params(vae: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, R, R) in [-1, 1] -> (B, 2C, R/f, R/f): the VAE posterior's mean and log-variance
    (diffusers' `latent_dist.parameters`), unscaled."""
    images = images.to(device=vae.device, dtype=vae.dtype)
    return vae.encode(images).latent_dist.parameters


@torch.no_grad()
def image_features(qformer: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) CLIP-normalised -> (B, 1 + N, Dv): the frozen ViT's output, the part of the
    subject encoder that never trains (the Q-Former accepts it in place of pixels)."""
    return qformer.image_features(pixels.to(device=qformer.query_tokens.device))


class FrozenEncoder:
    """Ray Data actor: the VAE and the ViT of a checkpoint, loaded once.

    Replaces TARGET by LATENT_PARAMS (float32) and PIXEL_VALUES by IMAGE_FEATURES (float16,
    half the bytes; the features go through the Q-Former's bf16/fp32 compute either way); other
    columns pass through. With `vit` False (online composites: the ViT's input is new each
    epoch) only the VAE is loaded and the batches carry no PIXEL_VALUES.
    """

    def __init__(self, model_path: str, use_gpu: bool = False, bf16: bool = False, vit: bool = True) -> None:
        from pipeline.model import BlipDiffusion

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        model = BlipDiffusion.from_pretrained(model_path)
        # Keep only the frozen parts; the UNet and the text encoder are not needed here.
        self.vae = model.vae.to(self.device).eval()
        self.qformer = model.qformer.to(self.device).eval() if vit else None
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {name: column for name, column in batch.items() if name not in (TARGET, PIXEL_VALUES)}
        with self.autocast:
            out[LATENT_PARAMS] = latent_params(self.vae, torch.from_numpy(batch[TARGET])).float().cpu().numpy()
            if PIXEL_VALUES in batch:
                features = image_features(self.qformer, torch.from_numpy(batch[PIXEL_VALUES]))
                out[IMAGE_FEATURES] = features.to(torch.float16).cpu().numpy()
        return out
