"""Training methods: what trains, what is saved and how the prompt is built.

Pretraining and every fine-tuning method run through the same loop (pipeline/train/loop.py).
A method is an `nn.Module` that owns the model (and any parameters of its own, such as a
subject embedding or LoRA adapters); the loop wraps it for data parallelism, so its `forward`
is the training forward pass. Methods are picked by name in METHODS (`train.method`).

The interface, in the order the loop uses it:

- `Method.load(config, checkpoint, device)`: the method with its model on `device`, from the
  base weights (`models.blip_diffusion`) or from the folder a checkpoint's `save` wrote (resume).
- `trainable_parameters()`: freezes everything else; the parameters AdamW updates.
- `build_prompts(categories, captions)`: the prompt text of each sample.
- `forward(subject, categories, prompts, noisy_latents, timesteps, drop_subject)`: the noise
  prediction (B, C, h, w); `subject` is composite pixels (B, 3, S, S) or their precomputed ViT
  features (B, 1 + N, Dv).
- `loss(prediction, target, weights)`: the training loss (MSE, per-sample `weights` (B,) with
  train.snr_gamma; DreamBooth adds its prior term here).
- `save(folder)`: what a checkpoint holds; `folder/MODEL_FOLDER` is what the registry gets.
- `sample(...)`: images for the sample hook, drawn with the EMA weights when the loop keeps
  an EMA (`train.ema_decay`, set as `ema`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import PIL.Image
import torch
from torch import nn

from pipeline.config import FINETUNE_TRAITS, Config, ConfigError, MethodTraits
from pipeline.model import BlipDiffusion, build_prompt
from pipeline.model.pseudoword import TEMPLATES, encode_pseudoword_prompts, initial_vectors
from pipeline.model.subject import SubjectModel, SubjectSpec, add_lora, apply_subject, dreambooth_prompt, save_subject
from pipeline.train.bases import load_base
from pipeline.train.ema import EMA
from pipeline.train.losses import diffusion_loss
from pipeline.train.speed import GraphedUNet, attention_kernels


class Method(nn.Module):
    """Base class: the model, its frozen encoders kept in eval mode, and the shared defaults."""

    name: ClassVar[str]
    MODEL_FOLDER: ClassVar[str] = "model"

    def __init__(self, model: BlipDiffusion, config: Config) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.graphed_unet: GraphedUNet | None = None  # set by the loop with train.cuda_graphs
        self.ema: EMA | None = None  # set by the loop with train.ema_decay

    @classmethod
    def load(cls, config: Config, checkpoint: Path | None = None, device: torch.device | str = "cpu") -> Method:
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def build_prompts(self, categories: Sequence[str], captions: Sequence[str]) -> list[str]:
        """A caption becomes the reference's "a <category> <caption>"; rows without one get
        `train.prompt_template` (default "a {category}"). The subject tokens go in after "a"."""
        template = self.config.train.prompt_template
        return [
            build_prompt(category, caption, prompt_reps=1) if caption.strip() else template.format(category=category)
            for category, caption in zip(categories, captions, strict=True)
        ]

    def forward(
        self,
        subject: torch.Tensor,
        categories: Sequence[str],
        prompts: Sequence[str],
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        drop_subject: torch.Tensor,
    ) -> torch.Tensor:
        """`BlipDiffusion.predict_noise`, with the step's speed settings (pipeline/train/speed.py)."""
        if noisy_latents.shape[0] != len(prompts):
            raise ValueError(f"{noisy_latents.shape[0]} latents for {len(prompts)} prompts")
        with attention_kernels(self.config.train.sdpa_backend):
            hidden = self.model.encode_conditioning(subject, categories, prompts, drop_subject)
        return self.predict(noisy_latents, timesteps, hidden)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The UNet's noise prediction (B, C, h, w) for text states `hidden` (B, 77, D); replayed
        from CUDA graphs when the loop set `graphed_unet`."""
        hidden = hidden.to(self.model.unet.dtype)
        if self.graphed_unet is not None:
            return self.graphed_unet(noisy_latents, timesteps, hidden)
        return self.model.unet(noisy_latents, timesteps, encoder_hidden_states=hidden).sample

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        return diffusion_loss(prediction, target, weights)

    def averaged(self) -> AbstractContextManager[None]:
        """The EMA weights in the model for the block (sampling), when the loop keeps an EMA."""
        return self.ema.applied() if self.ema is not None else nullcontext()

    def save(self, folder: Path) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, subject_image: PIL.Image.Image, category: str, prompt: str, **kwargs: Any) -> PIL.Image.Image:
        """One image of the subject (a composite) in `prompt`; kwargs go to `BlipDiffusion.generate`."""
        was_training = self.training
        self.eval()
        try:
            with self.averaged():
                return self.model.generate(prompt, subject_images=[subject_image], category=category, progress=False, **kwargs)[0]
        finally:
            self.train(was_training)

    def train(self, mode: bool = True) -> Method:
        """Train mode for the trainable parts; the VAE and the ViT always stay in eval mode."""
        super().train(mode)
        self.model.vae.eval()
        self.model.qformer.visual_encoder.eval()
        return self


class Pretrain(Method):
    """Subject-representation pretraining (BLIP-Diffusion stage 2): the Q-Former, its projection,
    the text encoder and the UNet learn (each can be frozen with `train.trainable.*`); the whole
    model is saved in the released layout, so `BlipDiffusion.from_pretrained` reads a checkpoint."""

    name = "pretrain"

    @classmethod
    def load(cls, config: Config, checkpoint: Path | None = None, device: torch.device | str = "cpu") -> Pretrain:
        source = checkpoint / cls.MODEL_FOLDER if checkpoint is not None else config.model_path("blip_diffusion")
        return cls(BlipDiffusion.from_pretrained(source, device=device), config)

    def trainable_parameters(self) -> list[nn.Parameter]:
        parts = self.config.train.trainable
        qformer = self.model.qformer
        self.requires_grad_(False)
        if parts.qformer:
            for name, param in qformer.named_parameters():
                if not name.startswith(("visual_encoder.", "proj_layer.")):
                    param.requires_grad_(True)
        qformer.proj_layer.requires_grad_(parts.projection)
        self.model.text_encoder.requires_grad_(parts.text_encoder)
        self.model.unet.requires_grad_(parts.unet)
        return [p for p in self.parameters() if p.requires_grad]

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(Path(folder) / self.MODEL_FOLDER)


# ---------------------------------------------------------------------------------------------
# Fine-tuning one subject (`subjectforge finetune`): the model is the base (models.blip_diffusion);
# the subject's photos are in <train.data>/REFERENCES_FOLDER; `save` writes only what the subject
# adds to the base (pipeline/model/subject.py).

REFERENCES_FOLDER = "references"  # the subject's photos (PNG), beside its training rows
PRIOR_CAPTION = "<class-prior>"  # dreambooth: the caption that marks a class-prior row


def prior_preserving_loss(
    prediction: torch.Tensor, target: torch.Tensor, prior: torch.Tensor, weight: float, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """DreamBooth's loss: MSE over the subject's rows plus `weight` x MSE over the class-prior
    rows (B,) bool `prior`, each row weighted by `weights` (B,) when given; a term without rows
    in the batch is 0. Scalar float32."""
    prior = prior.to(prediction.device)
    loss = prediction.new_zeros((), dtype=torch.float32)
    for rows, scale in ((~prior, 1.0), (prior, weight)):
        if rows.any():
            row_weights = weights[rows.to(weights.device)] if weights is not None else None
            loss = loss + scale * diffusion_loss(prediction[rows], target[rows], row_weights)
    return loss


class _Subject(Method):
    """Shared by the fine-tuning methods: load the base (or a checkpoint's subject on it), the
    subject embeddings (1, Q, D) as a parameter, their forward pass and `save`. What trains
    follows the method's traits (config.py FINETUNE_TRAITS)."""

    MODEL_FOLDER = "subject"

    @classmethod
    def traits(cls) -> MethodTraits:
        return FINETUNE_TRAITS[cls.name]

    def __init__(self, model: BlipDiffusion, config: Config, subject_embeds: torch.Tensor | None) -> None:
        super().__init__(model, config)
        self.subject_embeds = nn.Parameter(subject_embeds.float()) if subject_embeds is not None else None

    @classmethod
    def load(cls, config: Config, checkpoint: Path | None = None, device: torch.device | str = "cpu") -> _Subject:
        # On `device` before the subject is built on it: the mean embedding and LoRA's random
        # A matrices then come out the same whether the base was just loaded or kept (bases.py).
        model = load_base(config.model_path("blip_diffusion"), device)
        if checkpoint is not None:
            _, embeds = apply_subject(model, checkpoint / cls.MODEL_FOLDER)
            return cls(model, config, embeds)
        cls.prepare(model, config)
        return cls(model, config, cls.initial_embeds(model, config))

    @classmethod
    def prepare(cls, model: BlipDiffusion, config: Config) -> None:
        """Changes to the base model before training: LoRA adapters for a LoRA method."""
        if cls.traits().unet == "lora":
            add_lora(model.unet, config.finetune.lora_rank, config.finetune.lora_alpha)

    @classmethod
    def initial_embeds(cls, model: BlipDiffusion, config: Config) -> torch.Tensor | None:
        """The mean subject embedding (1, Q, D) over the images in <train.data>/references/ (the
        fine-tune writes up to `finetune.init_photos` distinct photos there, or composites with
        `finetune.init_from: composites`); None for a method without subject embeddings."""
        if not cls.traits().embeds:
            return None
        folder = Path(config.train.data or "") / REFERENCES_FOLDER
        paths = sorted(folder.glob("*.png"))[: config.finetune.init_photos]
        if not paths:
            raise ConfigError(f"finetune.subject: no reference photos in {folder}")
        images = [PIL.Image.open(p).convert("RGB") for p in paths]
        return model.encode_subject(images, config.finetune.category)

    def trainable_parameters(self) -> list[nn.Parameter]:
        self.requires_grad_(False)
        if self.subject_embeds is not None:
            self.subject_embeds.requires_grad_(True)
        self.unfreeze()
        return [p for p in self.parameters() if p.requires_grad]

    def unfreeze(self) -> None:
        """What trains besides the subject embeddings: a full UNet (and the text encoder with
        `finetune.train_text_encoder`), or the LoRA adapters."""
        unet = self.traits().unet
        if unet == "full":
            self.model.unet.requires_grad_(True)
            self.model.text_encoder.requires_grad_(self.config.finetune.train_text_encoder)
        if unet == "lora":
            for name, param in self.model.unet.named_parameters():
                if "lora_" in name:
                    param.requires_grad_(True)

    def forward(self, subject, categories, prompts, noisy_latents, timesteps, drop_subject) -> torch.Tensor:
        """The noise prediction (B, C, h, w) with the learned subject embeddings in every prompt
        (the composites in `subject` only initialised them)."""
        embeds = self.subject_embeds.expand(len(prompts), -1, -1) if self.subject_embeds is not None else None
        with attention_kernels(self.config.train.sdpa_backend):
            hidden = self.model.encode_prompts(prompts, embeds)
        return self.predict(noisy_latents, timesteps, hidden)

    def spec(self) -> SubjectSpec:
        ft, train, traits = self.config.finetune, self.config.train, self.traits()
        lora = traits.unet == "lora"
        return SubjectSpec(
            method=self.name, subject_id=ft.subject_id or "", category=ft.category or "", base=ft.base or self.config.model_path("blip_diffusion"),
            resolution=train.resolution, identifier=None if traits.embeds else ft.identifier,
            lora_rank=ft.lora_rank if lora else None, lora_alpha=ft.lora_alpha if lora else None,
            text_encoder=ft.train_text_encoder and traits.text_encoder,
        )

    def save(self, folder: Path) -> None:
        save_subject(Path(folder) / self.MODEL_FOLDER, self.spec(), self.model, self.subject_embeds)

    @torch.no_grad()
    def sample(self, subject_image: PIL.Image.Image, category: str, prompt: str, **kwargs: Any) -> PIL.Image.Image:
        was_training = self.training
        self.eval()
        try:
            subject = SubjectModel(self.model, self.spec(), self.subject_embeds)
            with self.averaged():
                return subject.generate(prompt, num_images=1, **kwargs)[0]
        finally:
            self.train(was_training)


class BlipdFinetune(_Subject):
    """BLIP-Diffusion's subject fine-tuning: the subject embeddings (from the mean over the
    photos) and the UNet learn; the text encoder only with `finetune.train_text_encoder`."""

    name = "blipd"


class LoraFinetune(_Subject):
    """The subject embeddings and LoRA adapters (rank `finetune.lora_rank`) on the UNet's
    attention projections; every base weight stays as it was."""

    name = "lora"


class TextualInversion(_Subject):
    """Textual inversion as its paper: a new word [S] of `finetune.ti_vectors` embedding vectors
    (pipeline/model/pseudoword.py), started at the category word's embedding, learns from the
    paper's neutral templates ("a photo of a [S]"; the style templates with `finetune.ti_property:
    style`), one drawn per row; every model weight stays as it was."""

    name = "textual-inversion"

    @classmethod
    def initial_embeds(cls, model: BlipDiffusion, config: Config) -> torch.Tensor:
        ft = config.finetune
        if not ft.category:
            raise ConfigError("finetune.category: textual inversion starts its word at the category's embedding")
        return initial_vectors(model, ft.category, ft.ti_vectors)

    def build_prompts(self, categories: Sequence[str], captions: Sequence[str]) -> list[str]:
        """A template per row, drawn from torch's generator (which the loop seeds)."""
        templates = TEMPLATES[self.config.finetune.ti_property]
        return [templates[i] for i in torch.randint(len(templates), (len(categories),)).tolist()]

    def forward(self, subject, categories, prompts, noisy_latents, timesteps, drop_subject) -> torch.Tensor:
        """The noise prediction (B, C, h, w) with the learned word where each prompt has [S]."""
        with attention_kernels(self.config.train.sdpa_backend):
            hidden = encode_pseudoword_prompts(self.model, prompts, self.subject_embeds)
        return self.predict(noisy_latents, timesteps, hidden)

    def spec(self) -> SubjectSpec:
        return replace(super().spec(), ti_property=self.config.finetune.ti_property)


class DreamBooth(_Subject):
    """DreamBooth: "a sks dog" (no subject embeddings) on the subject's photos, "a dog" on
    class-prior images the base made (rows captioned PRIOR_CAPTION), the prior term weighted by
    `finetune.prior_weight`; the UNet learns (and the text encoder with train_text_encoder)."""

    name = "dreambooth"
    _prior: torch.Tensor | None = None

    def build_prompts(self, categories: Sequence[str], captions: Sequence[str]) -> list[str]:
        """Instance rows: "a sks dog"; prior rows: "a dog". Remembers which rows are prior for `loss`."""
        self._prior = torch.tensor([c == PRIOR_CAPTION for c in captions], dtype=torch.bool)
        identifier = self.config.finetune.identifier
        return [
            f"a {category}" if c == PRIOR_CAPTION else dreambooth_prompt(identifier, category)
            for category, c in zip(categories, captions, strict=True)
        ]

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        prior = self._prior if self._prior is not None else torch.zeros(prediction.shape[0], dtype=torch.bool)
        return prior_preserving_loss(prediction, target, prior, self.config.finetune.prior_weight, weights)


# Name -> method class: the one place a training method is chosen (`train.method`); its names
# are config.py's TRAIN_METHODS, and the fine-tuning ones' traits config.py's FINETUNE_TRAITS.
METHODS: dict[str, type[Method]] = {
    m.name: m for m in (Pretrain, BlipdFinetune, LoraFinetune, TextualInversion, DreamBooth)
}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"train.method: unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
