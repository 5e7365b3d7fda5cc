"""Training methods: what trains, what is saved and how the prompt is built.

Pretraining and every fine-tuning method run through the same loop (pipeline/train/loop.py).
A method is an `nn.Module` that owns the model (and any parameters of its own, such as a
subject embedding or LoRA adapters); the loop wraps it for data parallelism, so its `forward`
is the training forward pass. Methods are picked by name in METHODS (`train.method`).

The interface, in the order the loop uses it:

- `Method.load(config, checkpoint)`: the method with its model, from the base weights
  (`models.blip_diffusion`) or from the folder a checkpoint's `save` wrote (resume).
- `trainable_parameters()`: freezes everything else; the parameters AdamW updates.
- `build_prompts(categories, captions)`: the prompt text of each sample.
- `forward(subject, categories, prompts, noisy_latents, timesteps, drop_subject)`: the noise
  prediction (B, C, h, w); `subject` is composite pixels (B, 3, S, S) or their precomputed ViT
  features (B, 1 + N, Dv).
- `loss(prediction, target)`: the training loss (MSE; DreamBooth adds its prior term here).
- `save(folder)`: what a checkpoint holds; `folder/MODEL_FOLDER` is what the registry gets.
- `sample(...)`: images for the sample hook.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import PIL.Image
import torch
from torch import nn

from pipeline.config import Config, ConfigError
from pipeline.model import BlipDiffusion, build_prompt
from pipeline.train.losses import diffusion_loss


class Method(nn.Module):
    """Base class: the model, its frozen encoders kept in eval mode, and the shared defaults."""

    name: ClassVar[str]
    MODEL_FOLDER: ClassVar[str] = "model"

    def __init__(self, model: BlipDiffusion, config: Config) -> None:
        super().__init__()
        self.model = model
        self.config = config

    @classmethod
    def load(cls, config: Config, checkpoint: Path | None = None) -> Method:
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
        return self.model.predict_noise(subject, categories, prompts, noisy_latents, timesteps, drop_subject)

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return diffusion_loss(prediction, target)

    def save(self, folder: Path) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, subject_image: PIL.Image.Image, category: str, prompt: str, **kwargs: Any) -> PIL.Image.Image:
        """One image of the subject (a composite) in `prompt`; kwargs go to `BlipDiffusion.generate`."""
        was_training = self.training
        self.eval()
        try:
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
    def load(cls, config: Config, checkpoint: Path | None = None) -> Pretrain:
        source = checkpoint / cls.MODEL_FOLDER if checkpoint is not None else config.model_path("blip_diffusion")
        return cls(BlipDiffusion.from_pretrained(source), config)

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


# Name -> method class: the one place a training method is chosen (`train.method`).
METHODS: dict[str, type[Method]] = {Pretrain.name: Pretrain}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"train.method: unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
