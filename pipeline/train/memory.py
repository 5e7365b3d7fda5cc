"""Memory options of training: gradient checkpointing and the optimizer's state.

- `train.gradient_checkpointing`: the UNet's blocks and the text encoder's layers keep only
  their inputs in the forward pass and recompute the rest in the backward pass (about a third
  more compute for most of the activation memory). The loss and gradients are the same.
- `train.optimizer`: `adamw` (torch, fused on a GPU) or `adamw8bit` (bitsandbytes' AdamW with
  8-bit moments: 2 bytes of state per parameter instead of 8). bitsandbytes comes with the
  optional extra `pip install "subjectforge[gpu]"`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from pipeline.config import ConfigError, TrainConfig

GPU_EXTRA = "subjectforge[gpu]"


def enable_gradient_checkpointing(unet: nn.Module, text_encoder: nn.Module) -> None:
    """Checkpoint the UNet (diffusers' own switch) and every transformer layer of the text
    encoder (transformers' GradientCheckpointingLayer switch; our ContextCLIPTextModel is not a
    PreTrainedModel, so the layers are set here). Non-reentrant checkpointing: gradients also
    reach inputs that need them (the subject embeddings) when the weights are frozen."""
    unet.enable_gradient_checkpointing()
    for module in text_encoder.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.gradient_checkpointing = True
            module._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)


def check_optimizer(train: TrainConfig) -> None:
    """ConfigError naming the extra when `train.optimizer` needs a package that is missing;
    called by the driver before any worker starts, and by `build_optimizer`."""
    if train.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"train.optimizer: adamw8bit needs bitsandbytes, which is not installed; "
            f'install the optional extra: pip install "{GPU_EXTRA}" (or choose train.optimizer=adamw)'
        )


def build_optimizer(params: Sequence[nn.Parameter], train: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over `params` at train.learning_rate() (train.lr scaled by train.lr_scaling) with train.weight_decay, as `train.optimizer` picks it."""
    check_optimizer(train)
    if train.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=train.learning_rate(), weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=train.learning_rate(), weight_decay=train.weight_decay, fused=device.type == "cuda")
