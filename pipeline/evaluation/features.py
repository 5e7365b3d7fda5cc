"""Feature extractors of the DreamBench metrics: DINO ViT-S/16 and CLIP ViT-B/32.

Both load from a Hub id or a local folder in the official Hugging Face layout
(`facebook/dino-vits16` with `ViTModel`, `openai/clip-vit-base-patch32` with `CLIPModel` and
its tokenizer), and the tiny profile's random checkpoints (pipeline/assets/tiny-dino,
tiny-clip) load through the same code.

Preprocessing follows each metric's usual definition, written here with PIL and numpy (no
torchvision), with the input size taken from the model's config (224 for the real models):

- DINO: the DINO repository's evaluation transform (`eval_knn.py`, `eval_linear.py`): resize
  the short side to 256 (bicubic), centre-crop 224, scale to [0, 1], normalise with the
  ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225). The feature is the CLS
  token of the last layer after the final LayerNorm (`last_hidden_state[:, 0]`, what DINO's
  `VisionTransformer.forward` returns), not HF's extra pooler, which the DINO weights lack.
- CLIP: OpenAI CLIP's `_transform`: resize the short side to 224 (bicubic), centre-crop 224,
  scale to [0, 1], normalise with CLIP's mean (0.48145466, 0.4578275, 0.40821073) and std
  (0.26862954, 0.26130258, 0.27577711). Image and text embeddings are the projected ones
  (`get_image_features`, `get_text_features`); texts are truncated to the 77 positions.

The centre crop rounds its offset as torchvision does (`int(round((size - crop) / 2))`).
The folders' own `preprocessor_config.json` files are not read: the metric defines the
transform, not the checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch

from pipeline.model.image_processing import CLIP_MEAN, CLIP_STD

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_RESIZE_RATIO = 256 / 224  # DINO resizes to 256 before its 224 crop


def preprocess_images(
    images: Sequence[PIL.Image.Image], resize: int, crop: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """RGB images of any size -> float32 (B, 3, crop, crop), normalised with mean/std.

    Each image: convert to RGB, resize its short side to `resize` px (bicubic; the long side
    becomes int(resize * long / short), as torchvision's Resize), centre-crop `crop` x `crop`,
    scale to [0, 1], subtract `mean` and divide by `std` per channel.
    """
    if not images:
        raise ValueError("no images to preprocess")
    if crop > resize:
        raise ValueError(f"crop ({crop}) must not exceed resize ({resize})")
    mean_a = np.asarray(mean, dtype=np.float32)
    std_a = np.asarray(std, dtype=np.float32)
    batch = []
    for image in images:
        image = _resize_short_side(image.convert("RGB"), resize)
        width, height = image.size
        top, left = int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))
        image = image.crop((left, top, left + crop, top + crop))
        array = np.asarray(image, dtype=np.float32) / 255.0  # (crop, crop, 3) in [0, 1]
        batch.append(((array - mean_a) / std_a).transpose(2, 0, 1))
    return torch.from_numpy(np.ascontiguousarray(np.stack(batch)))


def _resize_short_side(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) == (width, height):
        return image
    return image.resize((new_w, new_h), resample=PIL.Image.Resampling.BICUBIC)


class DinoFeatures:
    """DINO ViT CLS features: `encode_images(images)` -> float32 (B, D) on the CPU (D = 384 for ViT-S/16)."""

    def __init__(self, path_or_id: str, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        from transformers import ViTModel

        self.device = torch.device(device)
        self.model = ViTModel.from_pretrained(path_or_id, add_pooling_layer=False).to(self.device).eval()
        self.crop = int(self.model.config.image_size)
        self.resize = round(self.crop * DINO_RESIZE_RATIO)
        self.batch_size = batch_size

    @torch.inference_mode()
    def encode_images(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = preprocess_images(images[start : start + self.batch_size], self.resize, self.crop, IMAGENET_MEAN, IMAGENET_STD)
            hidden = self.model(pixel_values=pixels.to(self.device)).last_hidden_state  # (b, 1 + patches, D)
            out.append(hidden[:, 0].float().cpu())
        return torch.cat(out)


class ClipFeatures:
    """CLIP image and text embeddings in the joint space: float32 (B, P) on the CPU (P = 512 for ViT-B/32)."""

    def __init__(self, path_or_id: str, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        from transformers import AutoTokenizer, CLIPModel

        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(path_or_id).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path_or_id)
        self.crop = self.resize = int(self.model.config.vision_config.image_size)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.batch_size = batch_size

    @torch.inference_mode()
    def encode_images(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = preprocess_images(images[start : start + self.batch_size], self.resize, self.crop, CLIP_MEAN, CLIP_STD)
            out.append(self.model.get_image_features(pixel_values=pixels.to(self.device)).pooler_output.float().cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(
                list(texts[start : start + self.batch_size]), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            features = self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
            out.append(features.pooler_output.float().cpu())
        return torch.cat(out)
