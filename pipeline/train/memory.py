"""Memory options of training: gradient checkpointing and the optimizer's state, and what a run
that does not fit its GPU is told.

- `train.gradient_checkpointing`: the UNet's blocks and the text encoder's layers keep only
  their inputs in the forward pass and recompute the rest in the backward pass (about a third
  more compute for most of the activation memory). The loss and gradients are the same.
- `train.optimizer`: `adamw` (torch, fused on a GPU) or `adamw8bit` (bitsandbytes' AdamW with
  8-bit moments: 2 bytes of state per parameter instead of 8). bitsandbytes comes with the
  optional extra `pip install "subjectforge[gpu]"`.
- `early_out_of_memory_is_final`, `out_of_memory_explained`: a CUDA out-of-memory error at an
  attempt's start is reported as OutOfGPUMemory, which ends the run at once, and the driver
  exits 2 naming these settings.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from pipeline.config import ConfigError, TrainConfig
from pipeline.train.callbacks import EARLY_OOM_STEPS, OutOfGPUMemory, find_error

GPU_EXTRA = "subjectforge[gpu]"


def enable_gradient_checkpointing(unet: nn.Module, text_encoder: nn.Module) -> None:
    """Checkpoint the UNet (diffusers' own switch) and every transformer layer of the text
    encoder (transformers' GradientCheckpointingLayer switch; our ContextCLIPTextModel is not a
    PreTrainedModel, so the layers are set here). Non-reentrant checkpointing: gradients also
    reach inputs that need them (the subject embeddings) when the weights are frozen."""
    unet.enable_gradient_checkpointing(checkpoint_layer)
    for module in text_encoder.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.gradient_checkpointing = True
            module._gradient_checkpointing_func = checkpoint_layer


# The global SDPA kernel flags that `sdpa_kernel` sets (they govern CPU and CUDA calls alike).
_SDPA_FLAGS = (
    (SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled),
    (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled),
    (SDPBackend.CUDNN_ATTENTION, torch.backends.cuda.cudnn_sdp_enabled),
    (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled),
)


def _forward_kernels_in_recompute() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """checkpoint's context_fn, called in the forward pass: nothing for the forward, and for the
    recomputation in the backward pass the SDPA kernels the forward was allowed.

    Why: the text encoder runs inside `attention_kernels` (pipeline/train/speed.py), a context
    that has ended when the backward pass recomputes the layer. Without this the recomputation
    picks other kernels, which save other tensors, and torch's checkpoint raises "Recomputed
    values ... have different metadata" (blipd with gradient checkpointing on an H100)."""
    allowed = [backend for backend, enabled in _SDPA_FLAGS if enabled()]
    return contextlib.nullcontext(), sdpa_kernel(allowed) if allowed else contextlib.nullcontext()


def checkpoint_layer(function, *args, **kwargs):
    """Non-reentrant activation checkpointing of one layer call, recomputed with the forward's
    SDPA kernels. Under torch.compile the kernels are fixed when Dynamo traces the forward and
    backward, and Dynamo takes only dispatch modes as context_fn, so it gets none there."""
    if torch.compiler.is_compiling():
        return checkpoint(function, *args, use_reentrant=False, **kwargs)
    return checkpoint(function, *args, use_reentrant=False, context_fn=_forward_kernels_in_recompute, **kwargs)


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


@contextlib.contextmanager
def early_out_of_memory_is_final(state: Any, batch_key: str, batch_size: int) -> Iterator[None]:
    """Around the training loop: torch's OutOfMemoryError within EARLY_OOM_STEPS optimizer steps
    of `state.start_step` (a TrainState) becomes OutOfGPUMemory naming `batch_key` (the setting
    that holds the batch size), which Ray Train does not retry (callbacks.StopAtEarlyOutOfMemory)
    and the driver reports as a settings error; a later one passes through as it is."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        if state.step - state.start_step >= EARLY_OOM_STEPS:
            raise
        raise OutOfGPUMemory(str(exc), state.step, batch_key, batch_size) from None


@contextlib.contextmanager
def out_of_memory_explained() -> Iterator[None]:
    """Around the driver's fit: a run ended by OutOfGPUMemory, however Ray Train wrapped it, is
    the ConfigError (exit 2) that names the settings to change; other errors pass through."""
    try:
        yield
    except Exception as exc:
        oom = find_error(exc, OutOfGPUMemory)
        if oom is None:
            raise
        raise ConfigError(str(oom)) from None
