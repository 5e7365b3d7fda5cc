"""BLIP-Diffusion as plain PyTorch modules on current transformers and diffusers.

No Ray, MLflow or torch.distributed here: these are the nn modules and their math.
"""

from pipeline.model.blip_diffusion import BlipDiffusion
from pipeline.model.checkpoint import CheckpointError
from pipeline.model.image_processing import SubjectImageProcessor
from pipeline.model.prompts import DEFAULT_NEGATIVE_PROMPT, build_prompt
from pipeline.model.qformer import SubjectProjection, SubjectQFormer
from pipeline.model.text_encoder import ContextCLIPTextModel
from pipeline.model.vision import VisionEncoder

__all__ = [
    "BlipDiffusion",
    "CheckpointError",
    "ContextCLIPTextModel",
    "DEFAULT_NEGATIVE_PROMPT",
    "SubjectImageProcessor",
    "SubjectProjection",
    "SubjectQFormer",
    "VisionEncoder",
    "build_prompt",
]
