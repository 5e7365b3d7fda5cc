"""Subject-driven editing: swap one word's object in an image for a subject, keeping the rest.

Prompt-to-prompt attention control (Hertz et al. 2022) as LAVIS `BlipDiffusion.generate_then_edit`
uses it. Two rows are denoised together from the same starting latents:

- the source row, the prompt as given ("a dog on the grass"), with no subject;
- the target row, the same prompt with the replaced word changed to the target category and the
  subject's Q embeddings spliced in before it ("a [subject] cat on the grass").

While they are denoised (`AttentionEdit`):

- the target row's cross-attention to the tokens the two prompts share is the source row's
  (LAVIS AttentionRefine) for the first `cross_replace_steps` of the steps;
- its self-attention at 1/4 of the latent resolution and coarser is the source row's for the first
  `self_replace_steps`, which keeps the layout;
- after every step, the target row's latents outside the edit region are set to the source row's
  (LAVIS LocalBlend). The region is where the replaced word's cross-attention, summed over the
  steps so far, reaches `threshold` of its peak, or a mask given by the caller (e.g. CLIPSeg's
  "shirt" for try-on).

A real photo is first DDIM-inverted with the text-only source prompt (pipeline/model/inversion.py,
LAVIS `edit`); both rows then start from the inverted latents, and the source row is denoised
without guidance so that it retraces the inversion.

Shapes: Q subject tokens, D text width, L = 77 text positions, h x w latents, H x W pixels.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.model.blip_diffusion import BlipDiffusion, StepCallback
from pipeline.model.image_processing import ImageLike, SubjectImageProcessor, read_rgb
from pipeline.model.inversion import editing_scheduler, invert_ddim
from pipeline.model.prompts import DEFAULT_NEGATIVE_PROMPT, check_text
from pipeline.model.schedulers import fresh_scheduler

# Self-attention is shared and the edit region measured at this UNet level (downsamplings of the
# latents): 16x16 maps for 512 px images, where LAVIS's LocalBlend reads its maps and its
# self-attention replacement stops (maps of at most 16 ** 2 positions).
CONTROL_LEVEL = 2
# LocalBlend widens the word's attention map by a 3x3 max filter before thresholding.
_BLEND_POOL = 3
_PUNCTUATION = ".,;:!?\"'()[]{}"


class EditError(UserError, ValueError):
    """An edit that cannot be made as asked; the message names the word, prompt or image."""


@dataclass(frozen=True)
class EditPrompts:
    """The two prompts of an edit and how their tokens line up.

    source: the prompt as given; target: the prompt with the replaced word changed to the target
    category; subject_pos: text position the subject embeddings go in before, in the target row;
    word: (n,) int64 text positions of the replaced word in the source row; mapper (L,) int64
    and alphas (L,) float: the target row's position j takes the source's attention at
    mapper[j] where alphas[j] is 1, and keeps its own where 0 (subject, new word).
    """

    source: str
    target: str
    subject_pos: int
    word: torch.Tensor
    mapper: torch.Tensor
    alphas: torch.Tensor


@dataclass(frozen=True)
class EditResult:
    """source: the generated image, or the photo cropped to the output size; edited: the edit;
    mask: (H, W) float32, 1 where the edit was free to change the image, 0 where it kept the
    source; reconstruction: a photo's inversion denoised again without the edit (None for a
    generated source), which shows how much inversion alone changes."""

    source: PIL.Image.Image
    edited: PIL.Image.Image
    mask: np.ndarray
    reconstruction: PIL.Image.Image | None = None


def _past_the_text_encoder(replace: str, target: str, target_tokens: int, start: int, room: int, num_query_tokens: int) -> str:
    """Why the target's tokens, put where `replace` starts (token `start`), end past `room`: the
    word sits too far into the prompt, or, where a one-token word would fit there, the target
    category is too long."""
    limit = f"it must end within the first {room} tokens, which the subject's {num_query_tokens} tokens leave"
    if start + 1 > room:
        return f"--replace {replace!r}: the word is too far into the prompt; {limit}"
    return (
        f"the target category {target!r:.60} is {target_tokens} tokens: put in place of --replace {replace!r} "
        f"(token {start}) it ends past the tokens the text encoder reads; {limit}: use a shorter category"
    )


def build_edit_prompts(tokenizer: Any, prompt: str, replace: str, target: str, num_query_tokens: int, length: int) -> EditPrompts:
    """Locate `replace` (one or more whole words, case and surrounding punctuation ignored) in
    `prompt` and build the source/target pair; `length` is the text encoder's positions (77).

    Raises EditError naming the word when the prompt does not contain it, or when the word sits
    past the positions left next to the subject's tokens.
    """
    for text, name in ((prompt, "prompt"), (replace, "--replace"), (target, "target category")):
        _check_text(text, name)
    start_char, end_char = find_words(prompt, replace)
    prefix = tokenizer(prompt[:start_char], add_special_tokens=False).input_ids
    source_word = tokenizer(prompt[start_char:end_char], add_special_tokens=False).input_ids
    target_word = tokenizer(target.strip(), add_special_tokens=False).input_ids
    full = tokenizer(prompt, add_special_tokens=True).input_ids
    start = 1 + len(prefix)  # after <bos>
    if full[start : start + len(source_word)] != source_word:
        raise EditError(f"--replace {replace!r}: cannot locate its tokens in the prompt {prompt!r}")
    room = length - num_query_tokens - 1  # the edited prompt's tokens with <bos>, before <eos>
    if start + len(target_word) > room:
        raise EditError(_past_the_text_encoder(replace, target, len(target_word), start, room, num_query_tokens))
    mapper = torch.arange(length)
    alphas = torch.ones(length)
    new = slice(start, start + num_query_tokens + len(target_word))
    alphas[new] = 0.0
    if target_word == source_word:
        # The same word (a dog for a dog): it keeps the source's attention, as LAVIS's alignment gives.
        mapper[start + num_query_tokens : new.stop] = torch.arange(start, start + len(source_word))
        alphas[start + num_query_tokens : new.stop] = 1.0
    shift = num_query_tokens + len(target_word) - len(source_word)
    after = torch.arange(new.stop, length)
    mapper[new.stop :] = (after - shift).clamp(0, length - 1)
    alphas[new.stop :] = ((after - shift) < length).float()
    return EditPrompts(
        source=prompt,
        target=prompt[:start_char] + target.strip() + prompt[end_char:],
        subject_pos=start,
        word=torch.arange(start, start + len(source_word)),
        mapper=mapper,
        alphas=alphas,
    )


def find_words(prompt: str, replace: str) -> tuple[int, int]:
    """Character span of the first run of whole words in `prompt` equal to `replace`'s words
    (case and surrounding punctuation ignored); EditError naming the word when there is none."""
    _check_text(prompt, "prompt")
    _check_text(replace, "--replace")
    spans = [m.span() for m in re.finditer(r"\S+", prompt)]
    cores = []
    for s, e in spans:
        word = prompt[s:e]
        lead = len(word) - len(word.lstrip(_PUNCTUATION))
        trail = len(word) - len(word.rstrip(_PUNCTUATION))
        cores.append((s + lead, max(s + lead, e - trail)))
    wanted = [w.strip(_PUNCTUATION).lower() for w in replace.split()]
    words = [prompt[s:e].lower() for s, e in cores]
    for i in range(len(words) - len(wanted) + 1):
        if words[i : i + len(wanted)] == wanted:
            return cores[i][0], cores[i + len(wanted) - 1][1]
    raise EditError(f"--replace {replace!r}: the word is not in the prompt {prompt!r}")


class AttentionEdit:
    """Prompt-to-prompt control of a two-row batch [source, target], with local blending.

    Installed on the UNet's attention layers by `attached`; the denoising loop calls
    `after_step` after each scheduler step (BlipDiffusion.denoise's `editor`). Per-step switches are tensors changed in place, so a
    compiled UNet sees the same graph at every step.
    """

    def __init__(
        self,
        prompts: EditPrompts,
        steps: int,
        latent_size: tuple[int, int],
        *,
        cross_replace_steps: float,
        self_replace_steps: float,
        threshold: float,
        mask: torch.Tensor | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.cross_steps = int(cross_replace_steps * steps)
        self.self_steps = int(self_replace_steps * steps)
        self.threshold = threshold
        self.fixed_mask = mask  # (1, 1, h, w) 0/1, or None: from the word's attention
        self.latent_size = latent_size
        self.word = prompts.word.to(device)
        self.mapper = prompts.mapper.to(device)
        self.alphas = prompts.alphas.to(device=device, dtype=dtype)
        size = _level_size(latent_size, CONTROL_LEVEL)
        self.word_attention = torch.zeros(size[0] * size[1], device=device, dtype=torch.float32)
        self.cross_on = torch.zeros((), device=device, dtype=dtype)
        self.self_on = torch.zeros((), device=device, dtype=dtype)
        self.blend_level = CONTROL_LEVEL
        self.step = 0
        self.mask: torch.Tensor | None = None  # the last blend mask (1, 1, h, w)
        self._set_switches()

    # The hooks ---------------------------------------------------------------------------------

    def attend(self, probs: torch.Tensor, heads: int, is_cross: bool, level: int) -> torch.Tensor:
        """Attention probabilities (B * heads, N, K) of one layer -> the controlled ones.

        The conditional rows [source, target] come last, after the unconditional ones (none, one
        or two); only they are controlled, as LAVIS does.
        """
        batch = probs.shape[0] // heads
        rows = probs.view(batch, heads, *probs.shape[1:])
        source, target = rows[-2], rows[-1]  # (heads, N, K)
        if is_cross:
            if level == self.blend_level and self.fixed_mask is None:
                self.word_attention += source[:, :, self.word].sum(-1).mean(0).float()
            refined = self.alphas * source[:, :, self.mapper] + (1 - self.alphas) * target
            new = target + self.cross_on * (refined - target)
        else:
            new = target + self.self_on * (source - target)
        return torch.cat([rows[:-1], new[None]]).view_as(probs)

    def after_step(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (2, C, h, w) after a scheduler step -> the target row's, outside the edit
        region, replaced by the source row's."""
        self.step += 1
        self._set_switches()
        self.mask = self.fixed_mask if self.fixed_mask is not None else self._attention_mask()
        mask = self.mask.to(latents.dtype)
        return latents[:1] + mask * (latents - latents[:1])

    def _attention_mask(self) -> torch.Tensor:
        """(1, 1, h, w) 0/1: the word's summed attention map, 3x3 max-filtered, resized (nearest)
        to the latents, over `threshold` of its peak (LAVIS LocalBlend)."""
        size = _level_size(self.latent_size, self.blend_level)
        maps = self.word_attention.view(1, 1, *size)
        maps = F.max_pool2d(maps, _BLEND_POOL, stride=1, padding=_BLEND_POOL // 2)
        maps = F.interpolate(maps, size=self.latent_size, mode="nearest")
        maps = maps / maps.max().clamp_min(torch.finfo(maps.dtype).tiny)
        return (maps > self.threshold).float()

    def _set_switches(self) -> None:
        self.cross_on.fill_(float(self.step < self.cross_steps))
        self.self_on.fill_(float(self.step < self.self_steps))

    # Installing it -----------------------------------------------------------------------------

    @contextmanager
    def attached(self, unet: Any) -> Iterator[AttentionEdit]:
        """The UNet's cross-attention layers, and its self-attention layers at the control level
        and coarser, run through this controller inside the block; the others keep their own
        (fused) processors. The original processors are back on exit."""
        original = unet.attn_processors
        levels = len(unet.config.block_out_channels) - 1
        cross = {name: _layer_level(name, levels) for name in original if name.endswith("attn2.processor")}
        blend = {level for name, level in cross.items() if not name.startswith("mid_block")}
        if blend and CONTROL_LEVEL not in blend:
            self.blend_level = max(blend)
            size = _level_size(self.latent_size, self.blend_level)
            self.word_attention = self.word_attention.new_zeros(size[0] * size[1])
        processors = {}
        for name, processor in original.items():
            level = _layer_level(name, levels)
            is_cross = name.endswith("attn2.processor")
            controlled = is_cross or level >= CONTROL_LEVEL
            processors[name] = _ControlledAttention(self, is_cross, level) if controlled else processor
        unet.set_attn_processor(processors)
        try:
            yield self
        finally:
            unet.set_attn_processor(original)


class _ControlledAttention:
    """diffusers' classic attention processor with the probabilities passed through `controller`
    (they must exist as a tensor, so these layers cannot use fused attention kernels)."""

    def __init__(self, controller: AttentionEdit, is_cross: bool, level: int) -> None:
        self.controller = controller
        self.is_cross = is_cross
        self.level = level

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], context.shape[0])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B * heads, N, K)
        probs = self.controller.attend(probs, attn.heads, self.is_cross, self.level)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if spatial:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _layer_level(name: str, levels: int) -> int:
    """Downsamplings of the latents at an attention layer, from its name in the UNet."""
    if name.startswith("down_blocks."):
        return int(name.split(".")[1])
    if name.startswith("up_blocks."):
        return levels - int(name.split(".")[1])
    return levels  # mid_block


def _level_size(latent_size: tuple[int, int], level: int) -> tuple[int, int]:
    """Spatial size after `level` stride-2 downsamplings with padding 1 (rounding up)."""
    height, width = latent_size
    for _ in range(level):
        height, width = (height + 1) // 2, (width + 1) // 2
    return height, width


# ---------------------------------------------------------------------------------------------
# Images in and out


def fit_photo(image: ImageLike, height: int, width: int) -> PIL.Image.Image:
    """A photo as RGB height x width: scaled (bilinear) to cover that size with its aspect ratio
    kept, then centre-cropped, as LAVIS's inversion transform does for squares."""
    photo = _read_photo(image)
    scale = max(height / photo.height, width / photo.width)
    size = (max(width, round(photo.width * scale)), max(height, round(photo.height * scale)))
    photo = photo.resize(size, resample=PIL.Image.Resampling.BILINEAR)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return photo.crop((left, top, left + width, top + height))


def _read_photo(image: ImageLike) -> PIL.Image.Image:
    return read_rgb(image, EditError, "image")


def _to_pixels(photo: PIL.Image.Image) -> torch.Tensor:
    """RGB photo -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(photo, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def segment_mask(
    photo: PIL.Image.Image, text: str, clipseg: str | Path, threshold: float, normalize: str = "none"
) -> np.ndarray:
    """Where CLIPSeg, prompted with `text` ("shirt"), finds it in `photo`: (H, W) float32 0/1,
    confidence over `threshold`, read as the dataset's segment stage reads it (stages/segment.py;
    `normalize` is data.segment.normalize)."""
    from stages.segment import Segmenter, confidence_from_logits

    _check_text(text, "--mask-prompt")
    segmenter = Segmenter(str(clipseg), prompt_template="{category}", batch_size=1)
    logits = segmenter.predict_logits([np.asarray(photo.convert("RGB"))], [text])
    confidence = confidence_from_logits(logits[0], photo.height, photo.width, normalize)
    return (confidence > threshold).astype(np.float32)


def _check_text(text: object, name: str) -> None:
    try:
        check_text(text, name)
    except ValueError as exc:
        raise EditError(str(exc)) from None  # check_text's message names `name` already


def _latent_mask(mask: np.ndarray, latent_size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(H, W) mask in [0, 1] -> (1, 1, h, w) 0/1: a latent cell may change if any of its pixels may."""
    if mask.ndim != 2:
        raise EditError(f"the edit mask must be (H, W), got {mask.shape}")
    pixels = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return (F.adaptive_max_pool2d(pixels, latent_size) > 0.5).float().to(device)


# ---------------------------------------------------------------------------------------------
# The edit


@torch.no_grad()
def edit(
    model: BlipDiffusion,
    prompt: str,
    replace: str,
    *,
    subject_images: ImageLike | Sequence[ImageLike] | None = None,
    category: str | None = None,
    subject_embeds: torch.Tensor | None = None,
    target_category: str | None = None,
    image: ImageLike | None = None,
    mask: np.ndarray | None = None,
    steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
    height: int = 512,
    width: int = 512,
    seed: int | None = None,
    cross_replace_steps: float = 0.8,
    self_replace_steps: float = 0.4,
    threshold: float = 0.3,
    keep_outside: bool = True,
    progress: bool = True,
    step_callback: StepCallback | None = None,
) -> EditResult:
    """Replace the object `replace` names in `prompt` by the subject.

    Without `image`, the source is generated from `prompt` (noise from `seed`) and edited in the
    same run (LAVIS `generate_then_edit`); with `image` (a path or PIL image, fitted to height x
    width by `fit_photo`), the photo is DDIM-inverted with `prompt` and edited (LAVIS `edit`);
    `prompt` should then describe the photo. The subject comes from `subject_images` with
    `category`, or `subject_embeds` (1, Q, D); it is named `target_category` (default
    `category`) in the edited prompt. `mask` (H, W) in [0, 1] fixes the region that may change
    (1 = may change); by default it is where `replace`'s cross-attention is over `threshold` of
    its peak. With `keep_outside`, pixels outside the region are the source's exactly (the
    decoder's reach otherwise blurs the boundary by a few pixels, and a photo's inversion is
    not exact); without it the result is the decoded target row, as LAVIS returns it.
    `step_callback(i, t, noise, latents)` is called after every inversion and denoising step
    (a server stops an edit whose client left by raising from it).
    """
    target = target_category if target_category is not None else category
    if target is None:
        raise EditError("give category (or target_category): it names the subject in the edited prompt")
    if steps < 1:
        raise EditError(f"steps must be >= 1, got {steps}")
    factor = model.vae_scale_factor
    if height % factor or width % factor or height <= 0 or width <= 0:
        raise EditError(f"height and width must be positive multiples of {factor}, got {height}x{width}")
    photo = fit_photo(image, height, width) if image is not None else None
    if mask is not None and mask.shape != (height, width):
        raise EditError(f"the edit mask is {mask.shape}, the image {height}x{width}")
    subject = _subject(model, subject_images, category, subject_embeds)
    prompts = build_edit_prompts(model.tokenizer, prompt, replace, target, model.num_query_tokens, model.text_encoder.max_positions)

    source_cond = model.encode_prompts([prompts.source], None)  # (1, L, D)
    target_ids = model.tokenize_prompts([prompts.target], with_subject=True)
    target_cond = model.text_encoder(target_ids, subject.to(model.text_encoder.dtype), prompts.subject_pos)
    cond = torch.cat([source_cond, target_cond]).to(model.unet.dtype)  # (2, L, D)
    # An inverted photo's source row is denoised without guidance, as it was inverted (LAVIS
    # `edit`), so only the target row gets an unconditional pass.
    guided_rows = 1 if photo is not None else 2
    uncond = model.encode_prompts([negative_prompt], None).expand(guided_rows, -1, -1) if guidance_scale > 1.0 else None

    latent_size = (height // factor, width // factor)
    if photo is None:
        scheduler = fresh_scheduler(model.scheduler)
        scheduler.set_timesteps(steps)  # on the host (BlipDiffusion._denoise)
        noise = model.prepare_latents(1, height, width, seed=seed).to(device=model.device, dtype=model.unet.dtype)
        start = noise * scheduler.init_noise_sigma
    else:
        scheduler = editing_scheduler(model.scheduler)
        scheduler.set_timesteps(steps)  # on the host (BlipDiffusion._denoise)
        start = _invert(model, photo, source_cond.to(model.unet.dtype), scheduler, progress, step_callback)
    editor = AttentionEdit(
        prompts,
        len(scheduler.timesteps),  # PNDM runs one step more than asked
        latent_size,
        cross_replace_steps=cross_replace_steps,
        self_replace_steps=self_replace_steps,
        threshold=threshold,
        mask=None if mask is None else _latent_mask(mask, latent_size, model.device),
        device=model.device,
        dtype=model.unet.dtype,
    )
    with editor.attached(model.unet):
        latents = model.denoise(start.expand(2, -1, -1, -1), cond, uncond, scheduler, guidance_scale, progress=progress, editor=editor,
                               step_callback=step_callback)
    decoded = model.vae.decode(latents / model.vae.config.scaling_factor).sample.float()
    rows = SubjectImageProcessor.postprocess(decoded, "pt")  # (2, 3, H, W) in [0, 1]
    region = F.interpolate(editor.mask.float(), size=(height, width), mode="nearest").cpu()  # (1, 1, H, W)
    source = rows[:1].cpu() if photo is None else _to_pixels(photo)
    edited = rows[1:].cpu()
    if keep_outside:
        edited = source + region * (edited - source)
    return EditResult(
        source=_to_pil(source),
        edited=_to_pil(edited),
        mask=region[0, 0].numpy(),
        reconstruction=None if photo is None else _to_pil(rows[:1].cpu()),
    )


def _subject(model: BlipDiffusion, images: Any, category: str | None, embeds: torch.Tensor | None) -> torch.Tensor:
    """The subject's embeddings (1, Q, D) from photos and category, or as given."""
    want = (1, model.num_query_tokens, model.text_encoder.config.hidden_size)
    if embeds is not None:
        if images is not None:
            raise EditError("give subject_images or subject_embeds, not both")
        embeds = embeds[None] if embeds.ndim == 2 else embeds
        if tuple(embeds.shape) != want:
            raise EditError(f"subject_embeds must be {want}, got {tuple(embeds.shape)}")
        return embeds.to(model.device)
    if images is None or category is None:
        raise EditError("give subject_images with category, or subject_embeds")
    _check_text(category, "category")
    return model.encode_subject(images, category)


def _invert(
    model: BlipDiffusion, photo: PIL.Image.Image, cond: torch.Tensor, scheduler: Any, progress: bool,
    step_callback: StepCallback | None = None,
) -> torch.Tensor:
    """The photo's latents (1, C, h, w), DDIM-inverted with the text-only prompt `cond` (1, L, D)
    and no guidance. The VAE's mean is used, not a sample, so an edit is repeatable."""
    pixels = (_to_pixels(photo) * 2 - 1).to(device=model.device, dtype=model.vae.dtype)
    latents = model.vae.encode(pixels).latent_dist.mode() * model.vae.config.scaling_factor
    latents = latents.to(model.unet.dtype)
    return invert_ddim(latents, scheduler, lambda x, t: model.unet(x, t, encoder_hidden_states=cond).sample, progress, step_callback)


def _to_pil(pixels: torch.Tensor) -> PIL.Image.Image:
    """(1, 3, H, W) float in [0, 1] -> RGB image (rounded to uint8 as generate's images are)."""
    array = pixels[0].clamp(0, 1).permute(1, 2, 0).numpy()
    return PIL.Image.fromarray((array * 255).round().astype(np.uint8))
