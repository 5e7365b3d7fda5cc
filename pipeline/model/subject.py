"""A fine-tuned subject: what it adds to a base BLIP-Diffusion, on disk and at generation.

A subject folder holds only what the subject needs on top of its base model, as safetensors,
plus `subject.json` naming the base (a folder, Hub id or `models:/NAME/VERSION`):

| method              | files                                                        |
| ------------------- | ------------------------------------------------------------ |
| `blipd`             | subject_embeds (1, Q, D), the full UNet (and text encoder)    |
| `lora`              | subject_embeds, LoRA adapters of the UNet attention (a few MB) |
| `textual-inversion` | subject_embeds only: the learned word [S], (1, V, D)           |
| `dreambooth`        | the full UNet (and text encoder); the subject is a rare token |

The subject embeddings live in the text encoder's token-embedding space (the Q-Former's
output is spliced in after "a"). A textual inversion is a word of its own, written [S] in a
prompt (pipeline/model/pseudoword.py; subject.json's `ti_property` says whether it learned an
object or a style); one saved before that field existed is a Q-vector pseudo-word drawn like
the Q-Former's embeddings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from safetensors.torch import load_file, save_file

from pipeline.config import FINETUNE_TRAITS, MethodTraits
from pipeline.model.blip_diffusion import BlipDiffusion
from pipeline.model.checkpoint import CheckpointError, read_json, write_json
from pipeline.model.control import Control
from pipeline.model.prompts import DEFAULT_NEGATIVE_PROMPT, check_text
from pipeline.model.pseudoword import compose_prompt, encode_pseudoword_prompts
from pipeline.model.schedulers import fresh_scheduler

SUBJECT_FILE = "subject.json"
EMBEDS_FILE = "subject_embeds.safetensors"  # {"subject_embeds": (1, Q, D)}
UNET_FILE = "unet.safetensors"  # the UNet's full state dict (blipd, dreambooth)
TEXT_ENCODER_FILE = "text_encoder.safetensors"  # only with finetune.train_text_encoder
LORA_FILE = "lora.safetensors"  # peft's adapter state dict of the UNet
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the UNet's attention projections


@dataclass
class SubjectSpec:
    """subject.json: what the subject folder holds and which base it applies to."""

    method: str
    subject_id: str
    category: str
    base: str  # folder, Hub id or models:/NAME/VERSION of the base model
    resolution: int  # the training resolution: the default generation size
    identifier: str | None = None  # dreambooth's rare token
    lora_rank: int | None = None
    lora_alpha: float | None = None
    text_encoder: bool = False  # TEXT_ENCODER_FILE is present
    ti_property: str | None = None  # textual inversion's word [S]: "object" or "style" (pseudoword.py)

    @classmethod
    def read(cls, folder: Path) -> SubjectSpec:
        path = Path(folder) / SUBJECT_FILE
        if not path.is_file():
            raise CheckpointError(f"{folder} is not a subject folder (no {SUBJECT_FILE})")
        spec = cls(**read_json(path))
        if spec.method not in FINETUNE_TRAITS:
            raise CheckpointError(f"{path}: unknown method {spec.method!r}; one of {', '.join(FINETUNE_TRAITS)}")
        return spec

    @property
    def traits(self) -> MethodTraits:
        """Which files the folder holds: EMBEDS_FILE with `embeds`, UNET_FILE with a full UNet,
        LORA_FILE with LoRA adapters."""
        return FINETUNE_TRAITS[self.method]


def add_lora(unet: torch.nn.Module, rank: int, alpha: float | None) -> None:
    """Inject LoRA adapters (A: Gaussian, B: zeros, so the UNet is unchanged until trained) into
    the UNet's attention projections, in place. The base weights are never modified."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(LORA_TARGETS), init_lora_weights="gaussian")
    inject_adapter_in_model(config, unet)


def lora_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def save_subject(
    folder: Path,
    spec: SubjectSpec,
    model: BlipDiffusion,
    subject_embeds: torch.Tensor | None,
) -> None:
    """Write `spec` and the method's tensors (see the module docstring) to `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"}
    if subject_embeds is not None:
        save_file({"subject_embeds": subject_embeds.detach().float().cpu().contiguous()}, str(folder / EMBEDS_FILE), metadata=meta)
    if spec.traits.unet == "full":
        save_file(_cpu(model.unet.state_dict()), str(folder / UNET_FILE), metadata=meta)
    if spec.traits.unet == "lora":
        save_file(_cpu(lora_state(model.unet)), str(folder / LORA_FILE), metadata=meta)
    if spec.text_encoder:
        save_file(_cpu(model.text_encoder.state_dict()), str(folder / TEXT_ENCODER_FILE), metadata=meta)
    write_json(folder / SUBJECT_FILE, asdict(spec))


def apply_subject(model: BlipDiffusion, folder: Path) -> tuple[SubjectSpec, torch.Tensor | None]:
    """Load the subject in `folder` onto `model` (its base) in place; returns the spec and the
    subject embeddings (1, Q, D) float32 on the CPU, or None for dreambooth."""
    folder = Path(folder)
    spec = SubjectSpec.read(folder)
    if spec.traits.unet == "full":
        model.unet.load_state_dict(load_file(str(folder / UNET_FILE)))
    if spec.traits.unet == "lora":
        from peft import set_peft_model_state_dict

        add_lora(model.unet, spec.lora_rank or 4, spec.lora_alpha)
        result = set_peft_model_state_dict(model.unet, load_file(str(folder / LORA_FILE)))
        if result.unexpected_keys:
            raise CheckpointError(f"{folder / LORA_FILE}: unexpected LoRA weights {result.unexpected_keys[:3]}")
    if spec.text_encoder:
        model.text_encoder.load_state_dict(load_file(str(folder / TEXT_ENCODER_FILE)))
    embeds = load_file(str(folder / EMBEDS_FILE))["subject_embeds"] if spec.traits.embeds else None
    return spec, embeds


def dreambooth_prompt(identifier: str, category: str, prompt: str = "") -> str:
    """DreamBooth's instance prompt: "a sks dog on the beach" ("a sks dog" without `prompt`)."""
    return " ".join(part for part in ("a", identifier, category, prompt.strip()) if part)


@torch.no_grad()
def generate_from_text(
    model: BlipDiffusion,
    prompts: list[str],
    *,
    num_images: int = 1,
    steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
    height: int = 512,
    width: int = 512,
    seed: int | None = None,
    learned_word: torch.Tensor | None = None,
) -> list[PIL.Image.Image]:
    """Text-only generation with the model's UNet and text encoder (no subject embeddings):
    DreamBooth subjects, the class-prior images and, with `learned_word` (1, V, D), textual
    inversion's word in place of each prompt's [S]. `num_images` per prompt, PIL RGB."""
    texts = [check_text(p, "prompt") for p in prompts for _ in range(num_images)]
    latents = model.prepare_latents(len(texts), height, width, seed=seed).to(device=model.device, dtype=model.unet.dtype)
    if learned_word is not None:
        cond = encode_pseudoword_prompts(model, texts, learned_word)  # (N, 77, D)
    else:
        cond = model.encode_prompts(texts, None)
    uncond = model.encode_prompts([negative_prompt], None).expand(len(texts), -1, -1) if guidance_scale > 1.0 else None
    scheduler = fresh_scheduler(model.scheduler)
    scheduler.set_timesteps(steps)  # on the host (BlipDiffusion._denoise)
    latents = model._denoise(latents * scheduler.init_noise_sigma, cond, uncond, scheduler, guidance_scale, progress=False)
    decoded = model.vae.decode(latents / model.vae.config.scaling_factor).sample
    return model.image_processor.postprocess(decoded.to(torch.float32), "pil")


class SubjectModel:
    """A base model with one subject applied: `generate(prompt, ...)` draws the subject."""

    def __init__(self, model: BlipDiffusion, spec: SubjectSpec, subject_embeds: torch.Tensor | None) -> None:
        self.model, self.spec, self.subject_embeds = model, spec, subject_embeds

    @classmethod
    def load(
        cls, folder: str | Path, base: str | Path | None = None, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> SubjectModel:
        """The subject in `folder` on its base: `base` (a local folder or Hub id, e.g. the
        downloaded registry version) or else the spec's own `base`."""
        spec = SubjectSpec.read(Path(folder))
        model = BlipDiffusion.from_pretrained(base or spec.base)
        spec, embeds = apply_subject(model, Path(folder))
        model.to(device=device, dtype=dtype).eval()
        return cls(model, spec, embeds)

    def generate(
        self,
        prompt: str,
        *,
        num_images: int = 1,
        seed: int | None = 0,
        guidance_scale: float = 7.5,
        steps: int = 50,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        control: Control | None = None,
    ) -> list[PIL.Image.Image]:
        """`num_images` images of the subject in `prompt` ("on the beach"; for a textual
        inversion, a prompt may place its word: "a painting of [S] in the snow"), PIL RGB of
        height x width (default: the training resolution); `control` steers them with a
        ControlNet (its map at that size; not for a subject drawn from text alone)."""
        kwargs: dict[str, Any] = {
            "num_images": num_images,
            "steps": steps,
            "guidance_scale": guidance_scale,
            "negative_prompt": negative_prompt if negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT,
            "height": height or self.spec.resolution,
            "width": width or self.spec.resolution,
            "seed": seed,
        }
        if self.subject_embeds is None or self.spec.ti_property is not None:
            if control is not None:
                raise ValueError(f"a {self.spec.method} subject draws from text alone: structure control is not available")
            if self.spec.ti_property is not None:
                text = compose_prompt(prompt, self.spec.ti_property)
                return generate_from_text(self.model, [text], learned_word=self.subject_embeds, **kwargs)
            text = dreambooth_prompt(self.spec.identifier or "sks", self.spec.category, prompt)
            return generate_from_text(self.model, [text], **kwargs)
        return self.model.generate(
            prompt, subject_embeds=self.subject_embeds, category=self.spec.category, progress=False, control=control, **kwargs
        )


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
