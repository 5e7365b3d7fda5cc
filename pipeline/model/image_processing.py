"""Reference-image preprocessing and output postprocessing, with PIL and numpy only.

Mirrors the BlipImageProcessor that ships in the released checkpoint's `image_processor/`
(resize -> rescale -> normalize -> center crop, channels first) step for step, including its
float64 rescale and float32 normalisation, so pixel values match the reference bit for bit.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from pipeline.errors import UserError
from pipeline.model.checkpoint import CheckpointError, read_json
from stages.decode import to_8bit

# OpenAI CLIP statistics: the reference's defaults when the config names none.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_NAME = "preprocessor_config.json"

ImageLike = PIL.Image.Image | str | Path


class SubjectImageProcessor:
    """Turns reference photos into ViT input and decoded latents back into images.

    `config` is the `preprocessor_config.json` mapping; it is kept as read so `save_pretrained`
    writes it back unchanged. `mean`/`std`, when given, win over the config's: the reference
    pipeline passes `model_index.json`'s `mean`/`std` to `preprocess`.
    """

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        self.config = dict(config or {})
        size = self.config.get("size") or {"height": 224, "width": 224}
        if isinstance(size, int):
            size = {"height": size, "width": size}
        self.height, self.width = int(size["height"]), int(size["width"])
        self.do_resize = bool(self.config.get("do_resize", True))
        self.resample = int(self.config.get("resample", PIL.Image.Resampling.BICUBIC))
        self.do_rescale = bool(self.config.get("do_rescale", True))
        self.rescale_factor = float(self.config.get("rescale_factor", 1 / 255))
        self.do_normalize = bool(self.config.get("do_normalize", True))
        self.do_center_crop = bool(self.config.get("do_center_crop", True))
        self.do_convert_rgb = bool(self.config.get("do_convert_rgb", True))
        self.mean = tuple(mean if mean is not None else self.config.get("image_mean") or CLIP_MEAN)
        self.std = tuple(std if std is not None else self.config.get("image_std") or CLIP_STD)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
    ) -> SubjectImageProcessor:
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise CheckpointError(f"image processor config not found: {path}")
        return cls(read_json(path), mean=mean, std=std)

    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = self.config or {
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": list(self.mean),
            "image_processor_type": "BlipImageProcessor",
            "image_std": list(self.std),
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "size": {"height": self.height, "width": self.width},
        }
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """Photos (PIL images or file paths) -> float32 tensor (N, 3, H, W), CLIP-normalised.

        Raises ValueError naming the offending item when one is not a readable image.
        """
        if isinstance(images, PIL.Image.Image | str | Path):
            images = [images]
        if len(images) == 0:
            raise ValueError("at least one reference image is needed")
        arrays = [self._preprocess_one(load_image(img, i)) for i, img in enumerate(images)]
        return torch.from_numpy(np.stack(arrays))

    def _preprocess_one(self, image: PIL.Image.Image) -> np.ndarray:
        if self.do_convert_rgb and image.mode != "RGB":
            image = image.convert("RGB")
        if self.do_resize:
            image = image.resize((self.width, self.height), resample=self.resample)
        array = np.asarray(image)  # (H, W, 3) uint8
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        if self.do_rescale:
            # transformers' `rescale` multiplies in float64, then casts to float32.
            array = (array.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            array = array.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.mean, dtype=np.float32)
            std = np.asarray(self.std, dtype=np.float32)
            array = (array - mean) / std
        if self.do_center_crop:
            array = _center_crop(array, self.height, self.width)
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    @staticmethod
    def postprocess(images: torch.Tensor, output_type: str = "pil") -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
        """VAE output (N, 3, H, W) in about [-1, 1] -> images.

        "pt": float tensor in [0, 1]; "np": float32 array (N, H, W, 3) in [0, 1];
        "pil": list of RGB images (rounded to uint8 as diffusers' `numpy_to_pil`).
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if output_type == "pil":
            return [PIL.Image.fromarray(img) for img in SubjectImageProcessor.to_pixels(images).cpu().numpy()]
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        return images.detach().float().cpu().permute(0, 2, 3, 1).numpy()

    @staticmethod
    def to_pixels(images: torch.Tensor) -> torch.Tensor:
        """VAE output (N, 3, H, W) in about [-1, 1] -> uint8 (N, H, W, 3) on its own device: the
        pixels of postprocess's "pil", rounded as diffusers' `numpy_to_pil` (x * 255 in float32,
        rounded half to even) but on the device, so that only a quarter of the bytes cross to the
        host and no host core spends the batch's time on the arithmetic (the server,
        pipeline/serving/drawn.py)."""
        scaled = (images / 2 + 0.5).clamp(0, 1).detach().float()
        return (scaled * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


class ImageError(UserError, ValueError):
    """A reference image file that cannot be read; the message names the file."""


def _open_file(path: str | Path) -> PIL.Image.Image:
    """PIL.Image.open of a regular file; OSError for anything else, before it is opened: opening a
    FIFO blocks until something writes to it, so a FIFO given as a photo hung the command."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = "folder" if stat.S_ISDIR(mode) else "fifo" if stat.S_ISFIFO(mode) else "device or socket"
        raise OSError(f"not a regular file ({kind})")
    return PIL.Image.open(path)


def load_image(image: ImageLike, index: int = 0) -> PIL.Image.Image:
    """A PIL image from an image or a path; ImageError naming an unreadable file, ValueError for
    anything else."""
    if isinstance(image, PIL.Image.Image):
        return image
    if isinstance(image, str | Path):
        try:
            with _open_file(image) as opened:
                opened.load()
                return to_8bit(PIL.ImageOps.exif_transpose(opened))  # a copy, upright as the camera meant it
        except (OSError, PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError) as exc:
            raise ImageError(f"reference image {index} ({image}) is not a readable image: {exc}") from exc
    raise ValueError(f"reference image {index} must be a PIL image or a path, got {type(image).__name__}")


def read_rgb(image: ImageLike, error: type[Exception], label: str) -> PIL.Image.Image:
    """`image` (a PIL image or a path) as RGB; `error` naming it as `label` when the file is not
    a readable image."""
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    try:
        with _open_file(image) as opened:
            return to_8bit(PIL.ImageOps.exif_transpose(opened)).convert("RGB")
    except (OSError, PIL.UnidentifiedImageError, ValueError, PIL.Image.DecompressionBombError) as exc:
        raise error(f"{label} {image} is not a readable image: {exc}") from exc


def _center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop (H, W, C) to (height, width) about the centre, zero-padding a side that is too small
    (transformers' `center_crop`)."""
    h, w = array.shape[:2]
    if (h, w) == (height, width):
        return array
    out_h, out_w = max(h, height), max(w, width)
    if (out_h, out_w) != (h, w):
        padded = np.zeros((out_h, out_w, array.shape[2]), dtype=array.dtype)
        top, left = (out_h - h) // 2, (out_w - w) // 2
        padded[top : top + h, left : left + w] = array
        array, h, w = padded, out_h, out_w
    top, left = (h - height) // 2, (w - width) // 2
    return array[top : top + height, left : left + width]
