"""The answer of POST /v1/generate (pipeline/serving/api.py image_answer): its PNGs are fast
to make (zlib level PNG_COMPRESS_LEVEL) and still lossless."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from pipeline.serving.api import image_answer
from pipeline.serving.requests import GenerationRequest


def test_the_answers_pngs_decode_to_the_drawn_pixels():
    rng = np.random.default_rng(0)
    smooth = np.repeat(np.repeat(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), 8, 0), 8, 1)
    images = [Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)), Image.fromarray(smooth)]
    request = GenerationRequest("on the beach", 2, 7, 2, 7.5, None, 64, 96)
    answer = image_answer(images, request, "zero-shot", None, "base")
    decoded = [Image.open(io.BytesIO(base64.b64decode(data))) for data in answer["images"]]
    assert [d.format for d in decoded] == ["PNG", "PNG"]
    for image, back in zip(images, decoded, strict=True):
        assert np.array_equal(np.asarray(back.convert("RGB")), np.asarray(image))
    assert answer["seeds"] == [7, 7] and answer["size"] == [64, 96]
