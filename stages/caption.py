"""Caption stage: an image captioner writes each photo's caption, the text of its training prompt.

BLIP-Diffusion pretrains on prompted context generation: the prompt is the photo's caption with
the subject put in front ("a <subject tokens> <category> <caption>", pipeline/train/methods.py),
so the text describes the context the subject is drawn in. The paper captioned with BLIP-2; any
transformers image-text-to-text captioner loads here by id or folder (BLIP-2, BLIP), on the GPU
in float16 where the actor has one.

A photo with a caption of its own (the source's captions.csv, CAPTION_SOURCE "user") keeps it
and costs no generation. The pure core cleans what the captioner decoded; `Captioner` loads the
model once per actor and captions a batch's photos in `batch_size` chunks.
"""

from __future__ import annotations

import logging
import re
import time

import numpy as np
import torch

from stages.caption_attention import apply_attention
from stages.records import (
    CAPTION,
    CAPTION_MODEL,
    CAPTION_SOURCE,
    CAPTION_USER,
    IMAGE,
    Reject,
    apply_per_row,
    healthy_rows,
    timed,
)
from stages.segment import fixed_size, pick_device, pixels_for_clipseg, tensor_preprocessing_matches

STAGE = "caption"
log = logging.getLogger(__name__)

_SPACES = re.compile(r"\s+")


def clean_caption(text: str, prompt: str = "") -> str:
    """A captioner's decoded output -> the caption: `prompt` (the text it was asked to continue)
    cut from the start, white space collapsed to single spaces. Raises Reject when nothing is
    left: a row without a caption would silently train on the template instead."""
    caption = _SPACES.sub(" ", text).strip()
    prefix = _SPACES.sub(" ", prompt).strip()
    if prefix and caption.lower().startswith(prefix.lower()):
        caption = caption[len(prefix) :].strip()
    if not caption:
        raise Reject(STAGE, "the captioner wrote an empty caption")
    return caption


class Captioner:
    """Ray Data actor: a captioner loaded once, writing CAPTION and CAPTION_SOURCE (CAPTION_MODEL)
    for each healthy row whose CAPTION is empty; rows with a caption keep it (CAPTION_USER).

    prompt: text the captioner continues ("" = a plain caption); max_new_tokens and num_beams go
    to `generate` (greedy with num_beams 1, so a photo's caption is the same on every build).
    attention: "sdpa" gives a BLIP captioner fused attention (stages/caption_attention.py; the
    same captions up to float rounding), "eager" keeps transformers' own. warm_up: on CUDA, one
    batch of blank `photo_size` photos is captioned while the actor starts (_warm_up)."""

    def __init__(
        self,
        model_path: str,
        prompt: str = "",
        max_new_tokens: int = 30,
        num_beams: int = 1,
        batch_size: int = 8,
        attention: str = "sdpa",
        warm_up: bool = True,
        photo_size: int = 512,
    ):
        # Imported here so that modules which only need the pure function do not pay for it.
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.device = pick_device()
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=self.dtype).to(self.device).eval()
        self.attention = apply_attention(self.model, attention)
        self.prompt = prompt
        self.batch_size = batch_size
        # Special tokens other than the end of text are never written: a random (tiny) model
        # would otherwise emit padding, which decodes to nothing.
        tokenizer = self.processor.tokenizer
        eos = {self.model.generation_config.eos_token_id, tokenizer.eos_token_id} - {None}
        banned = [[t] for t in tokenizer.all_special_ids if t not in eos]
        self.generate_args = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "do_sample": False, "min_new_tokens": 1}
        if banned:
            self.generate_args["bad_words_ids"] = banned
        ip = self.processor.image_processor
        self.tensor_preprocessing = tensor_preprocessing_matches(ip)
        # The prompt's tokens (and BLIP-2's image placeholders before them) are the same for every
        # photo: made once, on a blank image, and repeated per batch.
        side = fixed_size(ip) or (224, 224)
        blank = np.zeros((*side, 3), np.uint8)
        text = {"text": [prompt]} if prompt else {}
        self.text_inputs = {
            k: v.to(self.device) for k, v in self.processor(images=[blank], return_tensors="pt", **text).items() if k != "pixel_values"
        }
        log.info("captioner %s on %s (%s), attention %s %s, %s", model_path, self.device, self.dtype, attention, self.attention, self.generate_args)
        if warm_up and self.device.type == "cuda":
            self._warm_up(photo_size)

    def _warm_up(self, size: int) -> None:
        """Caption one full batch of blank photos and throw the text away. The first batch an
        actor captions pays one-time costs (CUDA libraries' handles, kernel loads, generate's
        set-up), several times a later batch's time on an H100 (BENCHMARKS.md, "Caption
        stage"). The captioner starts before CLIPSeg's first rows reach it, so paid here they
        leave the build's first rows, which wait on the first captions, sooner."""
        started = time.perf_counter()
        self.caption_images([np.zeros((size, size, 3), np.uint8)] * self.batch_size)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        # The actor's start decides the rate of small builds: say where it goes.
        log.warning("captioner warm-up: %d photos at %d px in %.1f s", self.batch_size, size, time.perf_counter() - started)

    @torch.inference_mode()
    def pixel_values(self, images: list[np.ndarray]) -> torch.Tensor:
        """Photos (uint8 HxWx3, any sizes) -> the captioner's input, on its device in its dtype."""
        ip = self.processor.image_processor
        if self.tensor_preprocessing:  # resized on the device, as the segment stage does (stages/segment.py)
            return pixels_for_clipseg(images, *fixed_size(ip), ip.image_mean, ip.image_std, ip.resample, self.device, self.dtype)
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.dtype)

    @torch.inference_mode()
    def caption_images(self, images: list[np.ndarray]) -> list[str]:
        """Photos (uint8 HxWx3, any sizes) -> the captioner's decoded text, one per photo."""
        pixels = self.pixel_values(images)
        # Copies, not expanded views: BLIP's generate writes its bos over the prompt's first token in place.
        inputs = {k: v.expand(len(images), *v.shape[1:]).clone() for k, v in self.text_inputs.items()}
        tokens = self.model.generate(pixel_values=pixels, **inputs, **self.generate_args)
        return self.processor.batch_decode(tokens, skip_special_tokens=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with timed(batch, STAGE):
            given = np.asarray(batch[CAPTION], dtype=object)
            todo = [int(i) for i in healthy_rows(batch) if not str(given[i]).strip()]
            written: dict[int, str] = {}
            for start in range(0, len(todo), self.batch_size):
                rows = todo[start : start + self.batch_size]
                written.update(zip(rows, self.caption_images([batch[IMAGE][i] for i in rows]), strict=True))

            def one(i: int) -> dict[str, object]:
                if i in written:
                    return {CAPTION: clean_caption(written[i], self.prompt), CAPTION_SOURCE: CAPTION_MODEL}
                return {CAPTION: str(given[i]).strip(), CAPTION_SOURCE: CAPTION_USER}

            return apply_per_row(batch, one, {CAPTION: "", CAPTION_SOURCE: ""})
