"""Segment stage: CLIPSeg, prompted with the subject's category, gives a confidence map.

The pure core turns CLIPSeg logits into a confidence map at the photo's resolution; the
`Segmenter` class loads the model once per actor and runs batched forward passes.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

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
    """CLIPSeg logits (h, w) at model resolution -> float32 (height, width) confidence in [0, 1].

    Upsampling happens on logits, before the sigmoid, so the map stays smooth where the model
    was uncertain. `normalize="minmax"` rescales each map to span [0, 1].
    """
    up = F.interpolate(logits[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)
    conf = torch.sigmoid(up[0, 0])
    if normalize == "minmax":
        lo, hi = conf.min(), conf.max()
        conf = (conf - lo) / (hi - lo).clamp_min(1e-6)
    return conf.cpu().numpy().astype(np.float32)


def pick_device(prefer_gpu: bool = True) -> torch.device:
    return torch.device("cuda" if prefer_gpu and torch.cuda.is_available() else "cpu")


class Segmenter:
    """Ray Data actor: CLIPSeg loaded once, applied to batches of photos.

    Adds CONFIDENCE (float32 HxW in [0, 1]) to each healthy row.
    """

    def __init__(self, model_path: str, prompt_template: str = "{category}", batch_size: int = 8, normalize: str = "none"):
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
        log.info("CLIPSeg %s on %s (%s)", model_path, self.device, self.dtype)

    @torch.inference_mode()
    def predict_logits(self, images: list[np.ndarray], categories: list[str]) -> torch.Tensor:
        """Photos (uint8 HxWx3) and their categories -> logits (B, h, w) at model resolution."""
        prompts = [self.prompt_template.format(category=c) for c in categories]
        inputs = self.processor(text=prompts, images=images, return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        logits = self.model(**inputs).logits
        # CLIPSeg squeezes the batch axis away when the batch has one photo.
        return logits.reshape(len(images), *logits.shape[-2:])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with timed(batch, STAGE):
            ok = healthy_rows(batch)
            maps: dict[int, np.ndarray] = {}
            for start in range(0, len(ok), self.batch_size):
                rows = [int(i) for i in ok[start : start + self.batch_size]]
                logits = self.predict_logits([batch[IMAGE][i] for i in rows], [str(batch[CATEGORY][i]) for i in rows])
                for i, row_logits in zip(rows, logits, strict=True):
                    h, w = batch[IMAGE][i].shape[:2]
                    maps[i] = confidence_from_logits(row_logits, h, w, self.normalize)

            def one(i: int) -> dict[str, object]:
                conf = maps[i]
                if not np.isfinite(conf).all():
                    raise Reject(STAGE, "CLIPSeg produced non-finite confidences")
                return {CONFIDENCE: conf}

            return apply_per_row(batch, one, {CONFIDENCE: PLACEHOLDER_MAP})
