"""Subject-driven editing in a request from outside: `replace` and `edit_image`.

`replace` names the word of the prompt whose object the subject takes the place of (LAVIS
`generate_then_edit`; pipeline/model/editing.py); with `edit_image`, a base64 photo the prompt
describes, that photo is edited after DDIM inversion instead of an image generated from the
prompt. An edit makes one image; the rest of it stays as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import PIL.Image

from pipeline.config import DecodeConfig, EditConfig
from pipeline.serving.requests import GenerationRequest, RequestError
from pipeline.serving.subjects import decode_photo

REPLACE_FIELD, EDIT_IMAGE_FIELD = "replace", "edit_image"
EDIT_FIELDS = (REPLACE_FIELD, EDIT_IMAGE_FIELD)
MAX_REPLACE_CHARS = 100  # a word or two of the prompt


@dataclass(frozen=True)
class EditRequest:
    """A checked edit: the prompt's words to replace, and the photo to edit (None: generate it)."""

    replace: str
    image: PIL.Image.Image | None


def validate_edit(row: Mapping[str, Any], request: GenerationRequest, decode: DecodeConfig) -> EditRequest | None:
    """The edit of request `row` (already checked as `request`), or None without `replace`.
    RequestError names the field: a photo without `replace`, a `replace` that is not a word of
    the prompt, more than one image, or a photo that is not one."""
    from pipeline.model.editing import EditError, find_words

    replace, image = row.get(REPLACE_FIELD), row.get(EDIT_IMAGE_FIELD)
    if replace is None:
        if image is not None:
            raise RequestError(EDIT_IMAGE_FIELD, f"goes with {REPLACE_FIELD} (the word of the prompt the subject replaces)")
        return None
    if not isinstance(replace, str) or not replace.strip() or len(replace) > MAX_REPLACE_CHARS:
        raise RequestError(REPLACE_FIELD, f"must be a word of the prompt, 1..{MAX_REPLACE_CHARS} characters")
    try:
        find_words(request.prompt, replace)
    except EditError:
        raise RequestError(REPLACE_FIELD, f"{replace[:40]!r} is not a word of the prompt") from None
    if request.num_images != 1:
        raise RequestError("num_images", "an edit makes one image; give num_images 1")
    return EditRequest(replace.strip(), None if image is None else decode_photo(image, EDIT_IMAGE_FIELD, decode))


def draw_edit(
    model: Any, edit_request: EditRequest, request: GenerationRequest, subject_embeds: Any, category: str,
    height: int, width: int, settings: EditConfig, step_callback: Any = None,
) -> PIL.Image.Image:
    """The edited image (PIL RGB, height x width) of `request` with the subject's embeddings
    (1, Q, D) named `category`, with the `edit:` settings; `step_callback` as in `edit`."""
    import torch

    from pipeline.model import DEFAULT_NEGATIVE_PROMPT
    from pipeline.model.editing import edit

    # Eager even when the UNet is compiled (serve.compile): the attention control's processors
    # and the inversion's batch sizes are graph variants of their own, and with the plain and
    # ControlNet ones they would pass Dynamo's recompile limit, after which new shapes of every
    # request run eagerly; each would also compile, for minutes, in the request that met it.
    with torch.compiler.set_stance("force_eager"):
        result = edit(
            model, request.prompt, edit_request.replace, subject_embeds=subject_embeds, category=category,
            image=edit_request.image, steps=request.steps, guidance_scale=request.guidance_scale,
            negative_prompt=request.negative_prompt if request.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT,
            height=height, width=width, seed=request.seed, cross_replace_steps=settings.cross_replace_steps,
            self_replace_steps=settings.self_replace_steps, threshold=settings.threshold, keep_outside=settings.keep_outside,
            progress=False, step_callback=step_callback,
        )
    return result.edited
