"""BLIP-Diffusion as plain PyTorch modules on current transformers and diffusers.

No Ray, MLflow or torch.distributed here: these are the nn modules and their math.

The names below load on first use (PEP 562): a process that needs one submodule, such as a
training feed's data task opening the checkpoint's image processor (image_processing) or a
checkpoint check (checkpoint), does not import transformers and diffusers (~6 s of CPU) for
the modules it never builds.
"""

from importlib import import_module
from typing import Any

# name -> the submodule that declares it
_EXPORTS = {
    "BlipDiffusion": "blip_diffusion",
    "CheckpointError": "checkpoint",
    "ContextCLIPTextModel": "text_encoder",
    "DEFAULT_NEGATIVE_PROMPT": "prompts",
    "SubjectImageProcessor": "image_processing",
    "SubjectProjection": "qformer",
    "SubjectQFormer": "qformer",
    "VisionEncoder": "vision",
    "build_prompt": "prompts",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
