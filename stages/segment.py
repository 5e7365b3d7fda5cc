"""Segment stage: CLIPSeg, prompted with the subject's category, gives a confidence map.

The pure core turns CLIPSeg logits into a confidence map at the photo's resolution; the
`Segmenter` class loads the model once per actor and runs batched forward passes. The same pass
scores `data.filter.exclude_prompts` ("person"), and the filter stage's `check_excluded` rejects
a photo they cover (stages/filter.py): such a photo is never matted or captioned.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from stages.filter import check_excluded, prompt_areas
from stages.records import (
    CATEGORY,
    CONFIDENCE,
    IMAGE,
    PLACEHOLDER_MAP,
    Reject,
    apply_per_row,
    healthy_rows,
    timed,
)

STAGE = "segment"
log = logging.getLogger(__name__)


def confidence_from_logits(logits: torch.Tensor, height: int, width: int, normalize: str = "none") -> np.ndarray:
    """CLIPSeg logits (h, w), or a stack (B, h, w), at model resolution -> float32 confidence
    in [0, 1] of shape (height, width), or (B, height, width).

    Upsampling happens on logits, before the sigmoid, so the map stays smooth where the model
    was uncertain. `normalize="minmax"` rescales each map to span [0, 1].
    """
    stack = logits.reshape(-1, 1, *logits.shape[-2:]).float()
    up = F.interpolate(stack, size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    conf = torch.sigmoid(up)
    if normalize == "minmax":
        lo = conf.amin(dim=(1, 2), keepdim=True)
        hi = conf.amax(dim=(1, 2), keepdim=True)
        conf = (conf - lo) / (hi - lo).clamp_min(1e-6)
    conf = conf.cpu().numpy().astype(np.float32)
    return conf.reshape(*logits.shape[:-2], height, width)


_INTERPOLATION = {2: "bilinear", 3: "bicubic"}  # PIL resample codes we can match on tensors


def pixels_for_clipseg(
    images: list[np.ndarray],
    height: int,
    width: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    resample: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Photos (uint8 HxWx3, any sizes) -> CLIPSeg's normalised pixel_values (B, 3, height, width).

    What CLIPSeg's image processor does (resize, 1/255, normalise), on `device`: the processor
    runs PIL on the actor's CPU core, 7 ms per 512 px photo, which capped each actor near 110
    photos/s while its GPU share sat idle. An antialiased resize matches PIL's filter, and the
    result is rounded to uint8 levels as PIL's is, so the values differ from the processor's by
    rounding only.
    """
    mode = _INTERPOLATION[resample]
    out = torch.empty((len(images), 3, height, width), dtype=torch.float32, device=device)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(i)
    for rows in by_shape.values():
        stacked = torch.from_numpy(np.stack([images[i] for i in rows])).to(device, non_blocking=True)
        x = stacked.permute(0, 3, 1, 2).float()
        if x.shape[-2:] != (height, width):
            x = F.interpolate(x, size=(height, width), mode=mode, antialias=True, align_corners=False)
            x = x.round_().clamp_(0, 255)
        out[rows] = x
    scale = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0
    shift = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
    return ((out - shift) / scale).to(dtype)


def fixed_size(image_processor: object) -> tuple[int, int] | None:
    """(height, width) of a fixed-size resize; `size` is a SizeDict or a plain dict by version."""
    size = getattr(image_processor, "size", None)
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    height, width = get("height"), get("width")
    return (int(height), int(width)) if height and width else None


def tensor_preprocessing_matches(image_processor: object) -> bool:
    """Whether pixels_for_clipseg reproduces this image processor (the released CLIPSeg ones: a
    fixed-size bilinear resize, 1/255, mean/std); anything else stays with the processor."""
    return (
        getattr(image_processor, "do_resize", False)
        and fixed_size(image_processor) is not None
        and getattr(image_processor, "resample", None) in _INTERPOLATION
        and getattr(image_processor, "do_rescale", False)
        and abs(float(getattr(image_processor, "rescale_factor", 0.0)) - 1 / 255) < 1e-9
        and getattr(image_processor, "do_normalize", False)
        and not getattr(image_processor, "do_center_crop", False)
    )


def pick_device(prefer_gpu: bool = True) -> torch.device:
    return torch.device("cuda" if prefer_gpu and torch.cuda.is_available() else "cpu")


class Segmenter:
    """Ray Data actor: CLIPSeg loaded once, applied to batches of photos.

    Adds CONFIDENCE (float32 HxW in [0, 1]) to each healthy row. With `exclude_prompts`, a row
    where one of them covers more than `exclude_area` of the photo is rejected at `filter`.
    """

    def __init__(
        self,
        model_path: str,
        prompt_template: str = "{category}",
        batch_size: int = 8,
        normalize: str = "none",
        exclude_prompts: Sequence[str] = (),
        exclude_area: float = 1.0,
    ):
        # Imported here so that modules which only need the pure function do not pay for it.
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the torchvision fallback notice is noise here
        hf_logging.disable_progress_bar()
        self.device = pick_device()
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.processor = CLIPSegProcessor.from_pretrained(model_path)
        self.model = CLIPSegForImageSegmentation.from_pretrained(model_path, dtype=self.dtype).to(self.device).eval()
        self.prompt_template = prompt_template
        self.batch_size = batch_size
        self.normalize = normalize
        self.exclude_prompts = list(exclude_prompts)
        self.exclude_area = exclude_area
        self.tensor_preprocessing = tensor_preprocessing_matches(self.processor.image_processor)
        log.info(
            "CLIPSeg %s on %s (%s), images preprocessed %s",
            model_path,
            self.device,
            self.dtype,
            "as tensors on the model's device" if self.tensor_preprocessing else "by the processor",
        )

    @torch.inference_mode()
    def predict_logits(self, images: list[np.ndarray], categories: list[str]) -> torch.Tensor:
        """Photos (uint8 HxWx3) and their categories -> logits (B, h, w) at model resolution."""
        return self.prompt_logits(images, [[self.prompt_template.format(category=c) for c in categories]])[0]

    @torch.inference_mode()
    def prompt_logits(self, images: list[np.ndarray], prompt_sets: list[list[str]]) -> torch.Tensor:
        """Photos (uint8 HxWx3) and S sets of one prompt per photo -> logits (S, B, h, w) at
        model resolution, in one forward pass: the photos are preprocessed once and repeated."""
        prompts = [prompt for prompts in prompt_sets for prompt in prompts]
        if self.tensor_preprocessing:
            inputs = self._tokens(prompts)
            ip = self.processor.image_processor
            pixels = pixels_for_clipseg(
                images, *fixed_size(ip), ip.image_mean, ip.image_std, ip.resample, self.device, self.dtype
            )
            inputs["pixel_values"] = pixels.repeat(len(prompt_sets), 1, 1, 1)
        else:
            repeated = list(images) * len(prompt_sets)
            inputs = self.processor(
                text=prompts, images=repeated, return_tensors="pt", padding=True, **self._truncation()
            )
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        logits = self.model(**inputs).logits
        # CLIPSeg squeezes the batch axis away when the batch has one photo.
        return logits.reshape(len(prompt_sets), len(images), *logits.shape[-2:])

    def _tokens(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Each distinct prompt tokenized once; a batch holds few categories."""
        distinct = sorted(set(prompts))
        tokens = self.processor.tokenizer(distinct, padding=True, return_tensors="pt", **self._truncation())
        rows = torch.tensor([distinct.index(p) for p in prompts])
        return {k: v[rows].to(self.device) for k, v in tokens.items()}

    def _truncation(self) -> dict[str, object]:
        """Tokenizer arguments that cut a prompt at the tokens CLIP's text model reads (77): a
        longer one (a category of 100 emoji is ~400 tokens) was CLIPSeg's ValueError, which failed
        the whole build. The tokenizer's own model_max_length may be unset (the tiny one's is)."""
        return {"truncation": True, "max_length": self.model.config.text_config.max_position_embeddings}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with timed(batch, STAGE):
            ok = healthy_rows(batch)
            maps: dict[int, np.ndarray] = {}
            excluded: dict[int, dict[str, float]] = {}
            for start in range(0, len(ok), self.batch_size):
                rows = [int(i) for i in ok[start : start + self.batch_size]]
                categories = [str(batch[CATEGORY][i]) for i in rows]
                prompt_sets = [[self.prompt_template.format(category=c) for c in categories]]
                prompt_sets += [[prompt] * len(rows) for prompt in self.exclude_prompts]
                all_logits = self.prompt_logits([batch[IMAGE][i] for i in rows], prompt_sets)
                logits = all_logits[0]
                if self.exclude_prompts:
                    areas = prompt_areas(all_logits[1:])  # (P, B)
                    for k, i in enumerate(rows):
                        excluded[i] = dict(zip(self.exclude_prompts, areas[:, k].tolist(), strict=True))
                by_size: dict[tuple[int, int], list[int]] = {}
                for k, i in enumerate(rows):
                    by_size.setdefault(batch[IMAGE][i].shape[:2], []).append(k)
                for (h, w), ks in by_size.items():  # one upsample and one copy to the host per size
                    confs = confidence_from_logits(logits[ks], h, w, self.normalize)
                    for k, conf in zip(ks, confs, strict=True):
                        maps[rows[k]] = conf

            def one(i: int) -> dict[str, object]:
                conf = maps[i]
                if not np.isfinite(conf).all():
                    raise Reject(STAGE, "CLIPSeg produced non-finite confidences")
                check_excluded(excluded.get(i, {}), str(batch[CATEGORY][i]), self.exclude_area)
                return {CONFIDENCE: conf}

            return apply_per_row(batch, one, {CONFIDENCE: PLACEHOLDER_MAP})
