"""BLIP-Diffusion: subject embeddings from reference photos steer Stable Diffusion 1.5.

One container holds the parts of the released checkpoint (Q-Former with its ViT, context CLIP
text encoder, UNet, VAE, scheduler, tokenizers, image processor) and offers the three things the
project needs from them: loading/saving the released layout, the training forward pass
(`predict_noise`) and zero-shot generation (`generate`).

Shapes below use B batch, Q query tokens (16), D text width (768 real), S ViT input size (224),
T prompt tokens, C latent channels (4), h x w latent size (image size / 8).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn
from tqdm.auto import tqdm

try:
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # an older huggingface_hub: configs are not strict dataclasses there
    StrictDataclassError = TypeError
from transformers import BertTokenizer, CLIPTokenizer

from pipeline.model.checkpoint import (
    MODEL_INDEX,
    QFORMER_TOKENIZER_FOLDER,
    CheckpointError,
    load_exact,
    read_json,
    read_weights,
    resolve_checkpoint,
    write_json,
    write_weights,
)
from pipeline.model.control import Control, check_controlnet, controlnet_residuals, match_layout
from pipeline.model.control_step import CUDA_GRAPH_MODES, ControlledStep, supports_unet
from pipeline.model.image_processing import ImageLike, SubjectImageProcessor
from pipeline.model.prompts import (
    CONTEXT_BEGIN_POS,
    DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_PROMPT_REPS,
    PromptError,
    build_prompt,
    build_slot_prompt,
    check_text,
    split_subject_slots,
)
from pipeline.model.qformer import SubjectQFormer
from pipeline.model.schedulers import fresh_scheduler, load_scheduler
from pipeline.model.text_encoder import ContextCLIPTextModel, SubjectSlots
from pipeline.model.tokenizers import load_clip_tokenizer, load_qformer_tokenizer

log = logging.getLogger(__name__)

# step_callback(step index, timestep, guided noise prediction (b, C, h, w), latents after the step)
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


class Editor(Protocol):
    """Hooks an edit adds to the denoising loop (pipeline/model/editing.py AttentionEdit)."""

    def after_step(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (b, C, h, w) after a scheduler step -> the latents the next step starts from."""

# Buffers the reference serialises but we rebuild from the config.
_QFORMER_OPTIONAL = ("embeddings.position_ids",)
_TEXT_OPTIONAL = ("text_model.embeddings.position_ids",)
# Category texts are padded to a multiple of this many BERT tokens (masked, so the outputs do not
# change), which keeps the Q-Former's input shape the same across training batches.
QFORMER_TEXT_PAD = 16

# Reference photos through the ViT at once: `generate --subject-image` takes any number, and a
# batch of hundreds could run a GPU out of memory. A serving batch's photos at the defaults
# (serve.max_batch_size 8 x serve.max_reference_images 6) still go in one call.
ENCODE_BATCH = 64


class BlipDiffusion(nn.Module):
    """The BLIP-Diffusion model; build it with `from_pretrained`."""

    def __init__(
        self,
        qformer: SubjectQFormer,
        text_encoder: ContextCLIPTextModel,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: SchedulerMixin,
        tokenizer: CLIPTokenizer,
        qformer_tokenizer: BertTokenizer,
        image_processor: SubjectImageProcessor,
        model_index: dict[str, Any] | None = None,
        tokenizer_files: dict[str, dict[str, bytes]] | None = None,
    ) -> None:
        super().__init__()
        self.qformer = qformer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.qformer_tokenizer = qformer_tokenizer
        self.image_processor = image_processor
        self.model_index = dict(model_index or {})
        # Tokenizer files exactly as read, so save_pretrained writes the reference's formats
        # (vocab.json/merges.txt), not only what transformers 5 would write (tokenizer.json).
        self._tokenizer_files = tokenizer_files or {}
        if qformer.config.hidden_size != text_encoder.config.hidden_size:
            raise CheckpointError(
                f"Q-Former width {qformer.config.hidden_size} differs from the text encoder's "
                f"{text_encoder.config.hidden_size}: subject embeddings cannot be inserted"
            )

    # -----------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        *,
        qformer_tokenizer: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        local_files_only: bool = False,
    ) -> BlipDiffusion:
        """Load the released layout from a folder or a Hub id (e.g. ``Salesforce/blipdiffusion``).

        qformer_tokenizer: folder (or Hub id) of the Q-Former's BERT tokenizer; by default
        `<checkpoint>/qformer_tokenizer/`, else the `tokenizer` named in `qformer/config.json`.
        Raises CheckpointError naming the missing folder, file or weight.
        """
        root = resolve_checkpoint(path_or_id, local_files_only=local_files_only)
        index = read_json(root / MODEL_INDEX)

        qformer_config = read_json(root / "qformer" / "config.json")
        qformer = _build(SubjectQFormer, root / "qformer", qformer_config)
        load_exact(qformer, read_weights(root / "qformer"), "qformer", optional=_QFORMER_OPTIONAL)

        text_encoder = _build(ContextCLIPTextModel, root / "text_encoder", read_json(root / "text_encoder" / "config.json"))
        load_exact(text_encoder, read_weights(root / "text_encoder"), "text_encoder", optional=_TEXT_OPTIONAL)

        unet = _load_diffusers(UNet2DConditionModel, root / "unet")
        vae = _load_diffusers(AutoencoderKL, root / "vae")
        bert = load_qformer_tokenizer(
            root, qformer_config.get("tokenizer"), qformer.config.vocab_size, qformer_tokenizer, local_files_only
        )
        files = {"tokenizer": _read_files(root / "tokenizer")}
        bert_dir = Path(bert.name_or_path)
        if bert_dir.is_dir():
            files[QFORMER_TOKENIZER_FOLDER] = _read_files(bert_dir)
        model = cls(
            qformer=qformer,
            text_encoder=text_encoder,
            unet=unet,
            vae=vae,
            scheduler=load_scheduler(root / "scheduler"),
            tokenizer=load_clip_tokenizer(root / "tokenizer", text_encoder.config.vocab_size),
            qformer_tokenizer=bert,
            image_processor=SubjectImageProcessor.from_pretrained(
                root / "image_processor", mean=index.get("mean"), std=index.get("std")
            ),
            model_index=index,
            tokenizer_files=files,
        )
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the released layout (safetensors weights, reference tensor names) to `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        index = dict(self.model_index) or _default_model_index()
        index["scheduler"] = ["diffusers", type(self.scheduler).__name__]
        index["ctx_begin_pos"] = self.ctx_begin_pos
        index["mean"], index["std"] = list(self.image_processor.mean), list(self.image_processor.std)
        write_json(folder / MODEL_INDEX, index)
        write_json(folder / "qformer" / "config.json", self.qformer.raw_config)
        write_weights(folder / "qformer", self.qformer.state_dict())
        write_json(folder / "text_encoder" / "config.json", self.text_encoder.raw_config)
        write_weights(folder / "text_encoder", self.text_encoder.state_dict())
        for name, module in (("unet", self.unet), ("vae", self.vae)):
            module.save_pretrained(folder / name, safe_serialization=True)
            _drop_source_path(folder / name / "config.json")
        self.scheduler.save_pretrained(folder / "scheduler")
        self.image_processor.save_pretrained(folder / "image_processor")
        for name, tokenizer in (("tokenizer", self.tokenizer), (QFORMER_TOKENIZER_FOLDER, self.qformer_tokenizer)):
            target = folder / name
            files = self._tokenizer_files.get(name)
            if files:
                target.mkdir(parents=True, exist_ok=True)
                for filename, data in files.items():
                    (target / filename).write_bytes(data)
            else:  # loaded from the Hub cache: write what transformers writes
                tokenizer.save_pretrained(str(target))

    # -----------------------------------------------------------------------------------------
    # Properties

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def num_query_tokens(self) -> int:
        return self.qformer.num_query_tokens

    @property
    def ctx_begin_pos(self) -> int:
        return int(self.model_index.get("ctx_begin_pos", CONTEXT_BEGIN_POS))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # -----------------------------------------------------------------------------------------
    # Conditioning

    def tokenize_prompts(self, prompts: Sequence[str], with_subject: bool = True) -> torch.Tensor:
        """CLIP ids (B, L) int64, padded/truncated to the text encoder's positions, less Q when the
        subject embeddings will be inserted (77 - 16 = 61 for the released model)."""
        length = self.text_encoder.max_positions - (self.num_query_tokens if with_subject else 0)
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=length, return_tensors="pt"
        )
        return to_device_async(tokens.input_ids, self.device)

    def subject_embeddings(self, pixel_values: torch.Tensor, categories: Sequence[str]) -> torch.Tensor:
        """Per-image subject embeddings (B, Q, D) in the model dtype; differentiable in the Q-Former.

        pixel_values: (B, 3, S, S) float from `image_processor.preprocess`, or the frozen ViT's
        features of them (B, 1 + N, Dv) from `qformer.image_features` (precomputed for training);
        categories: B texts (the subject's class, e.g. "dog").
        """
        categories = [check_text(c, "category") for c in categories]
        if pixel_values.ndim not in (3, 4) or pixel_values.shape[0] != len(categories):
            raise ValueError(
                f"pixel_values must be (B, 3, S, S) (or ViT features (B, 1 + N, Dv)) with B = {len(categories)} "
                f"categories, got {tuple(pixel_values.shape)}"
            )
        text = self.qformer_tokenizer(
            categories,
            padding=True,
            pad_to_multiple_of=QFORMER_TEXT_PAD,
            truncation=True,
            max_length=self.qformer.config.max_position_embeddings,
            return_tensors="pt",
        )
        # The reference photos of a zero-shot request: a plain .to() would wait for the work
        # still queued on the GPU (a serving replica's previous batch).
        pixels = to_device_async(pixel_values, self.device).to(self.qformer.query_tokens.dtype)
        ids, mask = to_device_async(text.input_ids, self.device), to_device_async(text.attention_mask, self.device)
        return self.qformer(pixels, ids, mask)

    @torch.no_grad()
    def encode_subject(self, images: ImageLike | Sequence[ImageLike], category: str) -> torch.Tensor:
        """Subject embeddings (1, Q, D) of one subject: the mean over its reference photos.

        Compute once and pass as `generate(subject_embeds=...)` to reuse (cache) them.
        """
        return self.encode_subjects([(images, category)])[0]

    def encode_subjects(self, subjects: Sequence[tuple[ImageLike | Sequence[ImageLike], str]]) -> list[torch.Tensor]:
        """`encode_subject` of several subjects ((photos, category) each): the photos go through
        the ViT and Q-Former together, ENCODE_BATCH at a time, and each subject's embeddings
        (1, Q, D) are the mean over its own photos."""
        pixels = [self.image_processor.preprocess(images) for images, _ in subjects]
        categories = [category for (_, category), part in zip(subjects, pixels, strict=True) for _ in range(part.shape[0])]
        pixels_all = torch.cat(pixels)
        embeds = torch.cat([
            self.subject_embeddings(pixels_all[start : start + ENCODE_BATCH], categories[start : start + ENCODE_BATCH])
            for start in range(0, len(categories), ENCODE_BATCH)
        ])  # (photos, Q, D)
        return [part.mean(dim=0, keepdim=True) for part in embeds.split([p.shape[0] for p in pixels])]

    def encode_prompts(self, prompts: Sequence[str], subject_embeds: torch.Tensor | None) -> torch.Tensor:
        """Text-encoder states (B, 77, D) for B prompts, with subject embeddings (B, Q, D) inserted
        at `ctx_begin_pos`, or plain prompts when `subject_embeds` is None."""
        ids = self.tokenize_prompts(prompts, with_subject=subject_embeds is not None)
        if subject_embeds is not None:
            subject_embeds = subject_embeds.to(device=self.device, dtype=self.text_encoder.dtype)
        return self.text_encoder(ids, subject_embeds, self.ctx_begin_pos)

    def encode_slot_prompts(
        self,
        prompts: Sequence[str],
        subjects: Mapping[str, torch.Tensor],
        num_images: int = 1,
        prompt_strength: float = 1.0,
        prompt_reps: int = DEFAULT_PROMPT_REPS,
    ) -> torch.Tensor:
        """Text-encoder states (len(prompts) * num_images, 77, D) of prompts that name subjects in
        slots ("a [dog] next to a [cat]"): each slot's subject embeddings (1, Q, D), from
        `subjects` by name, go before its name's first token, as the single subject goes before
        its category word after "a". K slots leave 77 - K * Q positions for the text.

        PromptError names a slot with no subject, a subject no prompt names, or a slot that falls
        beyond the tokens the text encoder reads.
        """
        rows, named = [], set()
        for prompt in prompts:
            slots = split_subject_slots(prompt)
            missing = [name for name in slots.names if name not in subjects]
            if missing:
                raise PromptError(f"the prompt names subject [{missing[0]}], which is not given; the subjects are {', '.join(subjects)}")
            named.update(slots.names)
            self._check_slot_count(len(slots.names))
            embeds = torch.cat([self._resolve_subject(None, None, subjects[name]) for name in slots.names], dim=1)  # (1, K*Q, D)
            length = self.text_encoder.max_positions - embeds.shape[1]
            positions = [1 + len(self.tokenizer(prefix, add_special_tokens=False).input_ids) for prefix in slots.prefixes]
            if positions[-1] >= length - 1:  # the last position of the ids is the end token
                raise PromptError(
                    f"subject [{slots.names[-1]}] is prompt token {positions[-1]}, past the {length - 2} prompt tokens "
                    f"the text encoder reads beside {len(slots.names)} subjects; name it earlier or shorten the prompt"
                )
            ids = self.tokenizer([build_slot_prompt(slots, prompt_strength, prompt_reps)], padding="max_length",
                                 truncation=True, max_length=length, return_tensors="pt").input_ids
            embeds = embeds.to(device=self.device, dtype=self.text_encoder.dtype)
            hidden = self.text_encoder(to_device_async(ids, self.device), embeds, SubjectSlots(tuple(positions)))
            rows.append(hidden.expand(num_images, -1, -1))
        unused = [name for name in subjects if name not in named]
        if unused:
            raise PromptError(f"subject {unused[0]!r} is given but no prompt names it as [{unused[0]}]")
        return torch.cat(rows)

    def _check_slot_count(self, count: int) -> None:
        """PromptError when `count` slots cannot fit the text encoder however the prompt is worded.

        Each slot takes Q positions for its embeddings and at least one token for its name, and
        the begin and end tokens take two, so at most (positions - 2) // (Q + 1) slots fit (4 of
        77 at Q = 16). Checked before the prompt is tokenized: past it, the tokens left for the
        text would be a negative count.
        """
        most = (self.text_encoder.max_positions - 2) // (self.num_query_tokens + 1)
        if count > most:
            raise PromptError(
                f"the prompt names {count} subjects, which take {self.num_query_tokens} positions each and a word; "
                f"at most {most} fit in one prompt ({self.text_encoder.max_positions} positions)"
            )

    def encode_conditioning(
        self,
        pixel_values: torch.Tensor,
        categories: Sequence[str],
        prompts: Sequence[str],
        drop_subject: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """UNet conditioning (B, 77, D) for training: the prompt with the subject's embeddings.

        Rows where `drop_subject` (B,) bool is True get the plain prompt with no subject tokens
        (as the reference's `disable_subject_prompt`), so the model also learns text-only
        conditioning. Every row still goes through the Q-Former and the text encoder (a dropped
        row's subject embeddings are made and not used, so they get no gradient): the shapes
        stay the same from step to step, as compiled modules, CUDA graphs and cuDNN's plan cache
        need. Keep `drop_subject` on the CPU: a CUDA mask costs a device synchronisation here.
        """
        batch = len(prompts)
        if len(categories) != batch:
            raise ValueError(f"{len(categories)} categories for {batch} prompts")
        subject = self.subject_embeddings(pixel_values, categories)
        ids = self.tokenize_prompts(prompts, with_subject=True)
        if drop_subject is None:
            return self.text_encoder(ids, subject, self.ctx_begin_pos)
        drop = drop_subject.bool().cpu()
        if drop.shape != (batch,):
            raise ValueError(f"drop_subject must be ({batch},), got {tuple(drop.shape)}")
        plain = self.tokenize_prompts(prompts, with_subject=False)
        return self.text_encoder(ids, subject, self.ctx_begin_pos, plain_ids=plain, plain_rows=to_device_async(drop, self.device))

    def predict_noise(
        self,
        pixel_values: torch.Tensor,
        categories: Sequence[str],
        prompts: Sequence[str],
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        drop_subject: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One training forward pass: the UNet's noise prediction (B, C, h, w).

        pixel_values: (B, 3, S, S) float, the composite subject images from
        `image_processor.preprocess`; categories: B subject classes ("dog"); prompts: B texts
        given to the text encoder as they are (`build_prompt(category, text, prompt_reps=1)`
        gives the reference's "a dog <text>"); noisy_latents: (B, C, h, w) in the VAE's scaled
        latent space; timesteps: (B,) int64; drop_subject: optional (B,) bool, see
        `encode_conditioning`. Gradients reach the Q-Former, projection, text encoder and UNet
        unless frozen by the caller; the ViT is always frozen.
        """
        if noisy_latents.shape[0] != len(prompts):
            raise ValueError(f"{noisy_latents.shape[0]} latents for {len(prompts)} prompts")
        hidden = self.encode_conditioning(pixel_values, categories, prompts, drop_subject)
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=hidden.to(self.unet.dtype)).sample

    # -----------------------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate(
        self,
        prompt: str | Sequence[str],
        *,
        subject_images: ImageLike | Sequence[ImageLike] | None = None,
        category: str | None = None,
        subject_embeds: torch.Tensor | None = None,
        target_category: str | None = None,
        num_images: int = 1,
        steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
        height: int = 512,
        width: int = 512,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        prompt_strength: float = 1.0,
        prompt_reps: int = DEFAULT_PROMPT_REPS,
        scheduler: str | None = None,
        batch_size: int | None = None,
        output_type: str = "pil",
        progress: bool = True,
        step_callback: StepCallback | None = None,
        control: Control | None = None,
        subjects: Mapping[str, torch.Tensor] | None = None,
    ) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
        """Zero-shot subject-driven generation, `num_images` per prompt.

        The subject comes from `subject_images` + `category` (their embeddings are averaged) or
        from precomputed `subject_embeds` (1, Q, D) from `encode_subject`. Each prompt becomes
        the reference's "a <target_category> <prompt>" repeated `prompt_strength *
        prompt_reps` times; `target_category` defaults to `category`. Classifier-free guidance
        runs when guidance_scale > 1, against `negative_prompt` encoded without the subject.
        Noise comes from `generator`, else from `seed` (on the CPU, so a seed gives the same
        images on any device), else is random; `latents` (N, C, h, w) replaces it. Images are
        made `batch_size` at a time (default: all at once); the result changes only by float
        rounding. `step_callback(i, t, noise, latents)` sees each step's guided noise
        prediction and the latents it produced (per batch). `control` adds a ControlNet's
        residuals to the UNet calls of its window, every one by default (its map is shared by
        all images and embedded once; see pipeline/model/control.py). With `subjects` ({name:
        (1, Q, D)}), the prompts name them in slots instead ("a [dog] next to a [cat]",
        `encode_slot_prompts`), and the single subject's arguments and the category are not used.

        Returns N = len(prompts) * num_images images: PIL images, a float32 array
        (N, H, W, 3) in [0, 1] ("np") or a tensor (N, 3, H, W) in [0, 1] ("pt").
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("at least one prompt is needed")
        prompts = [check_text(p, "prompt") for p in prompts]
        if num_images < 1 or steps < 1:
            raise ValueError(f"num_images and steps must be >= 1, got {num_images} and {steps}")
        factor = self.vae_scale_factor
        if height % factor or width % factor or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {factor}, got {height}x{width}")
        target = target_category if target_category is not None else category
        if subjects is not None:
            if subject_images is not None or subject_embeds is not None:
                raise ValueError("give subjects (named in prompt slots) or one subject, not both")
            cond = self.encode_slot_prompts(prompts, subjects, num_images, prompt_strength, prompt_reps)  # (N, 77, D)
        elif target is None:
            raise ValueError("give category (or target_category) to build the prompt")
        else:
            subject = self._resolve_subject(subject_images, category, subject_embeds)  # (1, Q, D)
            texts = [build_prompt(target, p, prompt_strength, prompt_reps) for p in prompts for _ in range(num_images)]
            cond = self.encode_prompts(texts, subject.expand(len(texts), -1, -1))  # (N, 77, D)
        if control is not None:
            check_controlnet(control.controlnet, self.unet)
            if tuple(control.image.shape) != (1, 3, height, width):
                raise ValueError(f"the control image must be (1, 3, {height}, {width}), got {tuple(control.image.shape)}")
            control = control.prepared()  # the map's embedding, once for every batch and step

        total = cond.shape[0]
        if latents is None:
            latents = self.prepare_latents(total, height, width, seed=seed, generator=generator)
        shape = (total, self.unet.config.in_channels, height // factor, width // factor)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must be {shape}, got {tuple(latents.shape)}")
        latents = to_device_async(latents, self.device).to(self.unet.dtype)  # CPU noise (seeded there) without waiting

        uncond = self.encode_prompts([negative_prompt], None) if guidance_scale > 1.0 else None  # (1, 77, D)
        step = batch_size or total
        images = []
        for start in range(0, total, step):
            stop = min(start + step, total)
            sched = fresh_scheduler(self.scheduler, scheduler)
            sched.set_timesteps(steps)  # on the host: `_denoise` gives the UNet one device copy
            chunk = latents[start:stop] * sched.init_noise_sigma
            null = None if uncond is None else uncond.expand(stop - start, -1, -1)
            chunk = self._denoise(chunk, cond[start:stop], null, sched, guidance_scale, progress, step_callback, control)
            decoded = self.vae.decode(chunk / self.vae.config.scaling_factor).sample
            # A copy: a CUDA-graph-compiled decoder reuses its output buffer on the next batch.
            images.append(decoded.to(torch.float32, copy=True))
        return self.image_processor.postprocess(torch.cat(images), output_type)

    def prepare_latents(
        self, count: int, height: int, width: int, seed: int | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Initial noise (count, C, height/f, width/f) float32 from `generator`, else a CPU
        generator seeded with `seed`, else unseeded (the reference's `randn_tensor` on CPU).

        f is the VAE's downsampling factor (8 for SD 1.5; the reference derives it from the
        UNet's block count, which agrees for every SD 1.5-layout checkpoint).
        """
        factor = self.vae_scale_factor
        shape = (count, self.unet.config.in_channels, height // factor, width // factor)
        if generator is None and seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)

    def _resolve_subject(
        self,
        subject_images: ImageLike | Sequence[ImageLike] | None,
        category: str | None,
        subject_embeds: torch.Tensor | None,
    ) -> torch.Tensor:
        if subject_embeds is not None:
            if subject_images is not None:
                raise ValueError("give subject_images or subject_embeds, not both")
            want = (self.num_query_tokens, self.text_encoder.config.hidden_size)
            if subject_embeds.ndim == 2:
                subject_embeds = subject_embeds[None]
            if subject_embeds.ndim != 3 or subject_embeds.shape[0] != 1 or tuple(subject_embeds.shape[1:]) != want:
                raise ValueError(f"subject_embeds must be (1, {want[0]}, {want[1]}), got {tuple(subject_embeds.shape)}")
            return subject_embeds.to(self.device)
        if subject_images is None:
            raise ValueError("give subject_images (with category) or subject_embeds")
        if category is None:
            raise ValueError("category is needed to encode subject_images")
        return self.encode_subject(subject_images, category)

    def denoise(
        self,
        latents: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        scheduler: SchedulerMixin,
        guidance_scale: float,
        *,
        progress: bool = True,
        editor: Editor | None = None,
        step_callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """The denoising loop of `generate` for callers that build their own conditioning:
        latents (b, C, h, w), already scaled by the scheduler's initial sigma, with cond (b, 77, D)
        and uncond (u, 77, D) for the last u <= b rows or None, through `scheduler` (its timesteps
        set) -> clean latents. `editor` (pipeline/model/editing.py) may change the latents after
        every step; `step_callback` is called after each, as in `generate`."""
        return self._denoise(latents, cond, uncond, scheduler, guidance_scale, progress, step_callback, editor=editor)

    def _denoise(
        self,
        latents: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        scheduler: SchedulerMixin,
        guidance_scale: float,
        progress: bool,
        step_callback: StepCallback | None = None,
        control: Control | None = None,
        editor: Editor | None = None,
    ) -> torch.Tensor:
        """Run the scheduler's timesteps on latents (b, C, h, w); cond (b, 77, D), uncond (u, 77, D).

        Guidance applies to the last u rows; the first b - u rows (an inverted photo's source row
        in an edit) take the conditional prediction alone, and the UNet skips their
        unconditional pass. A `control` without its map's embedding gets it here, once for all
        the steps; it steers the steps of its window (`Control.steers`) and the others call the
        plain UNet.
        """
        if control is not None:
            match_layout(control.controlnet, self.unet)  # before its map's embedding is made
            control = control.prepared()
        count = len(scheduler.timesteps)
        steered = [False] * count if control is None else control.steers(count)
        embeds = cond if uncond is None else torch.cat([uncond, cond]).to(self.unet.dtype)
        unguided = 0 if uncond is None else latents.shape[0] - uncond.shape[0]
        host_steps, device_steps = host_and_device_timesteps(scheduler.timesteps, self.unet.device)
        timesteps = tqdm(host_steps, disable=not progress, desc="denoising", leave=False)
        for i, t in enumerate(timesteps):
            model_input = latents if uncond is None else torch.cat([latents[unguided:], latents])
            model_input = scheduler.scale_model_input(model_input, t)
            # A step outside the control's window skips the ControlNet and its cost: diffusers runs
            # it at scale 0 there, whose residuals are exact zeros, so the plain UNet gives the
            # same noise (and the two calls are the two graphs `compile_for_inference` makes).
            noise = self._predict_step_noise(model_input, device_steps[i], embeds, control if steered[i] else None)
            if uncond is None:
                # A CUDA-graph-compiled UNet reuses its output buffer; PNDM keeps past outputs.
                noise = noise.clone()
            else:
                noise_uncond, noise_cond = noise.split([uncond.shape[0], latents.shape[0]])
                noise = noise_uncond + guidance_scale * (noise_cond[unguided:] - noise_uncond)
                if unguided:
                    noise = torch.cat([noise_cond[:unguided], noise])
            latents = scheduler.step(noise, t, latents).prev_sample
            if editor is not None:
                latents = editor.after_step(latents)
            if step_callback is not None:
                step_callback(i, t, noise, latents)
        return latents

    def _predict_step_noise(
        self, model_input: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, control: Control | None
    ) -> torch.Tensor:
        """One UNet call (b, C, h, w) -> noise (b, C, h, w); with a prepared `control`
        (`Control.prepared`), the ControlNet sees the same latents, timestep and text states, and
        its residuals are added to the UNet's down-block outputs and mid block (LAVIS
        `_predict_noise`)."""
        if control is None:
            return self.unet(model_input, t, encoder_hidden_states=embeds).sample
        return self._controlled_noise(model_input, t, embeds, control.controlnet, control.embedding, control.scale)

    def _controlled_noise(
        self,
        model_input: torch.Tensor,
        t: torch.Tensor,
        embeds: torch.Tensor,
        controlnet: Any,
        embedding: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """The ControlNet's step (`controlnet_residuals`, with the map's embedding) and the UNet
        call it steers, in one function so that `compile_for_inference(control=True)` makes one
        graph of both: the residuals never leave it. (Two CUDA graphs, a ControlNet's and a
        UNet's, would pass them through the first graph's output buffers, which its next replay
        overwrites.) Tensors, the module and the float are arguments, not a Control, so that a
        new Control with the same ControlNet reuses the compiled graph."""
        down, mid = controlnet_residuals(controlnet, model_input, t, embeds, embedding, scale)
        return self.unet(
            model_input,
            t,
            encoder_hidden_states=embeds,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample

    def compile_for_inference(
        self,
        mode: str | None = "max-autotune-no-cudagraphs",
        fullgraph: bool = False,
        control: bool = False,
        backend: str = "inductor",
    ) -> None:
        """torch.compile the UNet and the VAE decoder in place (weight names are unchanged).

        Both go channels-last first, and Inductor lowers 1x1 convolutions to matrix products
        (a process-wide Inductor setting, as in training's `compile_model`): the layout every
        compiled generation in BENCHMARKS.md was measured with, so that a server compiling
        here runs at the benchmarked speed. A ControlNet used with it is put in the same
        layout at its first generation (`control.match_layout`).

        With `control`, also the controlled step (`_controlled_noise`), compiled on the first
        controlled generation (a second compile, minutes with autotuning: off by default, so a
        server compiling at start does not pay it on its first control request). For a UNet
        `control_step.supports_unet` follows (SD 1.5's), that step is a `ControlledStep`: the
        ControlNet on a second CUDA stream beside the UNet's encoder half, each part its own
        graph, and the step captured as one CUDA graph per shape where `mode` asks for CUDA
        graphs. Otherwise the ControlNet and the UNet are compiled as one graph, in which no
        residual leaves a CUDA graph's output buffers. `backend` other than inductor (tests:
        "eager") takes no mode.
        """
        import torch._inductor.config

        torch._inductor.config.conv_1x1_as_mm = True
        self.unet.to(memory_format=torch.channels_last)
        self.vae.to(memory_format=torch.channels_last)
        options: dict[str, Any] = {"mode": mode, "fullgraph": fullgraph} if backend == "inductor" else {"fullgraph": fullgraph}
        self.unet.compile(backend=backend, **options)
        self.vae.decoder.compile(backend=backend, **options)
        if control and supports_unet(self.unet):
            graphs = backend == "inductor" and mode in CUDA_GRAPH_MODES
            # The parts run inside the step's own CUDA graph, so Inductor must not make its own.
            parts = {**options, "mode": "max-autotune-no-cudagraphs" if mode == "max-autotune" else None} if graphs else options
            self._controlled_noise = ControlledStep(self.unet, lambda fn: torch.compile(fn, backend=backend, **parts), graphs)
        elif control:
            self._controlled_noise = torch.compile(self._controlled_noise, backend=backend, **options)


def mix_subjects(embeds: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """One subject from several: sum_i w_i * e_i / sum_i w_i over subject embeddings (1, Q, D).

    LAVIS `forward_ctx_embeddings(ratio=...)` takes the same weighted sum with weights that
    must add up to 1; here any weights with a positive sum are scaled to add up to 1 (0.7/0.3
    and 7/3 mix alike). A single weight may be negative (pushing away from that subject),
    which the released model never saw in training. Raises ValueError for mismatched lengths,
    shapes, non-finite weights or a sum that is not positive.
    """
    if not embeds or len(embeds) != len(weights):
        raise ValueError(f"give one weight per subject: {len(embeds)} subjects, {len(weights)} weights")
    values = [float(w) for w in weights]
    total = sum(values)
    if not all(np.isfinite(values)) or not total > 0:
        raise ValueError(f"subject weights must be finite and add up to a positive number, got {values}")
    shape = tuple(embeds[0].shape)
    if any(tuple(e.shape) != shape for e in embeds):
        raise ValueError(f"subject embeddings differ in shape: {[tuple(e.shape) for e in embeds]}")
    mixed = torch.zeros_like(embeds[0])
    for value, embed in zip(values, embeds, strict=True):
        mixed += (value / total) * embed
    return mixed


# What a model class raises for a config.json of valid JSON whose values build no model (a
# negative size, a string for a number; transformers' strict config classes raise huggingface_hub's
# StrictDataclassError): the checkpoint's fault, so a CheckpointError naming it.
_BAD_CONFIG_VALUES = (TypeError, RuntimeError, KeyError, IndexError, OverflowError, StrictDataclassError)


def _build(cls: type, folder: Path, config: dict[str, Any]) -> Any:
    """`cls(config)`, a component built from its folder's config.json."""
    try:
        return cls(config)
    except (ValueError, *_BAD_CONFIG_VALUES) as exc:
        raise CheckpointError(f"cannot build {cls.__name__} from {folder / 'config.json'}: {exc}") from exc


def _load_diffusers(cls: type, folder: Path) -> Any:
    try:
        return cls.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load {cls.__name__} from {folder}: {exc}") from exc
    except RecursionError:  # a config.json nested past Python's recursion
        raise CheckpointError(f"cannot load {cls.__name__} from {folder}: its config.json nests too deeply") from None
    except _BAD_CONFIG_VALUES as exc:
        raise CheckpointError(f"cannot build {cls.__name__} from {folder / 'config.json'}: {exc}") from exc


def to_device_async(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor (token ids, row indices) on `device` without waiting for the device: a plain
    `.to("cuda")` synchronises with every kernel already queued, which stalls a training step
    several times per forward pass. Page-locked first on CUDA, where a non-blocking copy of
    pageable memory would still wait (torch's pinned allocator keeps the staging copy until the
    transfer is done). Other devices copy as `.to()` does: a non-blocking copy there could read
    the source after the caller freed it. On the meta device, where no data moves, the copy is
    flagged non-blocking, as on CUDA, so that tests there see each copy's intent
    (tests/host_copies.py)."""
    if tensor.device.type != "cpu" or device.type == "cpu":
        return tensor.to(device)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device, non_blocking=device.type == "meta")


def host_and_device_timesteps(timesteps: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`timesteps` on the host, for a denoising loop's own arithmetic, and one copy on `device`,
    for the UNet. PNDM and DDIM compare and index with the timestep (`prev_timestep >= 0`,
    `alphas_cumprod[timestep]`; inversion's `int(t)`), which on a device tensor makes the host
    wait for the GPU at every step, so the GPU idled while the host queued the next step."""
    host = timesteps.cpu()
    return host, to_device_async(host, device)


def _drop_source_path(config: Path) -> None:
    """diffusers records where a model was loaded from (`_name_or_path`); the released configs
    have no such key, and a machine-specific path does not belong in a saved checkpoint."""
    data = read_json(config)
    if data.pop("_name_or_path", None) is not None:
        write_json(config, data)


def _read_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _default_model_index() -> dict[str, Any]:
    """model_index.json as the reference writes it (component classes of diffusers 0.33)."""
    return {
        "_class_name": "BlipDiffusionPipeline",
        "_diffusers_version": "0.33.1",
        "ctx_begin_pos": CONTEXT_BEGIN_POS,
        "image_processor": ["blip_diffusion", "BlipImageProcessor"],
        "qformer": ["blip_diffusion", "Blip2QFormerModel"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["blip_diffusion", "ContextCLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
