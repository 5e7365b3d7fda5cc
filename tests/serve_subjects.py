"""Tiny subjects for the serving tests: LoRA subjects with visible (random, non-zero) adapter
weights, a textual-inversion subject and a blipd subject, saved as subject folders and, when
asked, registered in a SQLite MLflow store."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from pipeline.config import PROFILE_MODELS

TINY = PROFILE_MODELS["tiny"]["blip_diffusion"]
RESOLUTION = 64  # the tiny subjects' training resolution: their default image size


def make_subject(folder: Path, method: str, seed: int, category: str = "dog") -> Path:
    """A subject folder of `method` (lora, textual-inversion, blipd) whose weights differ
    from the base by amounts a seed picks, so two subjects draw visibly different images."""
    from pipeline.model import BlipDiffusion
    from pipeline.model.subject import SubjectSpec, add_lora, save_subject

    model = BlipDiffusion.from_pretrained(TINY)
    generator = torch.Generator().manual_seed(seed)
    colour = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=generator))
    embeds = model.encode_subject(Image.new("RGB", (RESOLUTION, RESOLUTION), colour), category)
    spec = SubjectSpec(method, folder.name, category, TINY, RESOLUTION)
    if method == "lora":
        add_lora(model.unet, 4, 4.0)
        spec.lora_rank, spec.lora_alpha = 4, 4.0
        for name, param in model.unet.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: an untrained adapter changes nothing
                param.data = torch.randn(param.shape, generator=generator) * 0.5
    if method == "blipd":
        for param in model.unet.parameters():
            param.data += torch.randn(param.shape, generator=generator) * 0.02
    save_subject(folder, spec, model, embeds)
    return folder


def register_subject(uri: str, folder: Path, name: str, alias: str = "champion") -> str:
    """Register the subject folder as a new version of `name` with `alias`; returns the version."""
    from pipeline import tracking

    tracking.ensure_experiment(uri, "serve-tests", (folder.parent / "artifacts").as_uri())
    run_id = tracking.start_run(uri, "serve-tests", f"finetune-{name}")
    version = tracking.log_subject_model(uri, run_id, folder, name, {"method": "test"}, alias)
    tracking.finish_run(uri, run_id)
    return version


def fail_first_call(monkeypatch, owner, name: str, error: BaseException) -> None:
    """Patch `owner.name` to raise `error` on its first call and behave as before after it: a
    replica that runs out of memory once must answer the next request."""
    original, calls = getattr(owner, name), []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, fail_once)
