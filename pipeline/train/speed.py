"""What makes the training step fast on a GPU, chosen by config; nothing here changes the math.

- `attention_kernels(train.sdpa_backend)`: the attention kernels of the Q-Former and the
  text encoder (the methods' forward). "no-cudnn" keeps them off PyTorch's cuDNN backend, which builds an execution
  plan per new shape at ~1-3 ms of host time a call (BENCHMARKS.md, issue 5 profile).
- `compile_model` (`train.compile`): torch.compile of the UNet (channels-last), the Q-Former
  and the text encoder. Minutes of compilation at start: for long runs.
- `GraphedUNet` (`train.cuda_graphs`): the eager UNet's forward and backward captured once as
  CUDA graphs and replayed. Seconds to set up: for fine-tuning's short runs at batch 3, where
  launching ~4,000 kernels a step, not arithmetic, bounds the step (issue 6).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

COMPILED_PARTS = ("unet", "qformer", "text_encoder")


def attention_kernels(backend: str) -> contextlib.AbstractContextManager:
    """Context for a forward pass: "default" (PyTorch's choice of SDPA kernels) or "no-cudnn"
    (flash, memory-efficient or math kernels). The backward uses the forward's choice."""
    if backend == "default":
        return contextlib.nullcontext()
    if backend == "no-cudnn":
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    raise ValueError(f"unknown SDPA backend {backend!r} (default or no-cudnn)")


def compile_model(model: nn.Module, parts: tuple[str, ...] = COMPILED_PARTS, mode: str | None = None) -> None:
    """torch.compile `parts` of a BlipDiffusion in place (parameter names are unchanged). The UNet
    goes channels-last first: its convolutions then skip layout copies."""
    if "unet" in parts:
        model.unet.to(memory_format=torch.channels_last)
    for name in parts:
        getattr(model, name).compile(mode=mode)


class _UNetCall(nn.Module):
    """The UNet as a function of tensors alone, as CUDA-graph capture wants it:
    (latents (B, C, h, w), timesteps (B,) int64, text states (B, L, D)) -> noise (B, C, h, w)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return self.unet(latents, timesteps, encoder_hidden_states=states, return_dict=False)[0]


class GraphedUNet:
    """The UNet's training forward and backward as CUDA graphs (`torch.cuda.make_graphed_callables`).

    Captured at the first call, with that call's shapes and autocast state: later calls with the
    same shapes replay the graphs (inputs are copied into the graphs' own buffers), any other call
    runs the UNet eagerly. Needs autocast with `cache_enabled=False` (a cached bf16 weight copy
    would be freed under the graph) and a fresh `.grad` each step (`zero_grad(set_to_none=True)`
    with no gradient accumulation: a replay overwrites the gradients it returned last time). The
    output is the graph's buffer, overwritten by the next call: use it before calling again.
    Not a Module on purpose, so the UNet's parameters are not registered twice.
    """

    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet
        self._graphed: nn.Module | None = None
        self._signature: tuple | None = None

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        signature = _signature(latents, timesteps, states)
        if self._graphed is None and torch.is_grad_enabled():
            log.info("capturing the UNet's forward and backward as CUDA graphs, latents %s", tuple(latents.shape))
            # Detached copies: the graphs keep their sample inputs, which must not hold this
            # step's autograd graph (the text encoder's activations) alive.
            sample = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in (latents, timesteps, states))
            # Flash/efficient attention in the graphs: cuDNN's attention keeps host-side plans,
            # which we do not rely on under replay.
            with attention_kernels("no-cudnn"):
                self._graphed = torch.cuda.make_graphed_callables(_UNetCall(self.unet), sample)
            self._signature = signature
        if signature == self._signature and torch.is_grad_enabled():
            return self._graphed(latents, timesteps, states)
        return self.unet(latents, timesteps, encoder_hidden_states=states).sample


def _signature(*tensors: torch.Tensor) -> tuple:
    """What a capture depends on: shapes, dtypes, strides, requires_grad, autocast state."""
    parts = tuple((t.shape, t.dtype, t.stride(), t.requires_grad) for t in tensors)
    return parts + (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))


def use_cuda_graphs(enabled: bool, device: torch.device, world_size: int, grad_accum: int, compiled: bool) -> bool:
    """Whether `train.cuda_graphs` applies: a GPU, one worker (DDP's gradient hooks were not
    checked under replay), no gradient accumulation (see GraphedUNet) and an eager UNet (a
    compiled one fuses its kernels instead)."""
    if not enabled or device.type != "cuda":
        return False
    reasons = [why for why, bad in (("several workers", world_size > 1), ("grad_accum > 1", grad_accum > 1), ("train.compile", compiled)) if bad]
    if reasons:
        log.info("train.cuda_graphs off: %s", ", ".join(reasons))
        return False
    return True
