"""What makes the training step fast on a GPU, chosen by config; nothing here changes the math.

- `attention_kernels(train.sdpa_backend)`: the attention kernels of the Q-Former and the
  text encoder (the methods' forward). "no-cudnn" keeps them off PyTorch's cuDNN backend, which builds an execution
  plan per new shape at ~1-3 ms of host time a call (BENCHMARKS.md, "Pretraining step").
- `set_unet_attention(train.unet_sdpa_backend)`: the UNet's attention kernel in training (flash,
  memory-efficient, cuDNN...). PyTorch picks cuDNN for the UNet on an H100, and its backward was
  42 ms of a 356 ms step (BENCHMARKS.md, "Pretraining step"). Set through the UNet's attention processors so that
  it holds inside a compiled UNet too (see `UNetAttention`).
- `resolve_compile` / `resolve_composite` / `resolve_precompute` / `resolve_speed_settings`: the
  one place where `train.compile`, `train.compile_mode`, `train.composite` and `train.precompute`
  set to "auto" become values (the rules are in each resolve_*; each choice is logged).
- `use_compile_cache`: Inductor's and Triton's on-disk caches under `train.storage_path`, so a
  restart, a resume or a second job with the same shapes skips the code generation.
- `compile_model` (`train.compile`, `train.compile_mode`): torch.compile of the UNet
  (channels-last), the Q-Former and the text encoder. Minutes of compilation at start: for long
  runs. "reduce-overhead" replays the compiled graphs as CUDA graphs (cudagraph trees), which
  removes the host's launch gaps between kernels; the loop then marks each step's start
  (`step_begin`).
- `GraphedUNet` (`train.cuda_graphs`): the eager UNet's forward and backward captured once as
  CUDA graphs and replayed. Seconds to set up: for fine-tuning's short runs at batch 3, where
  launching ~4,000 kernels a step, not arithmetic, bounds the step ("auto": small batches only,
  CUDA_GRAPHS_MAX_BATCH).
- `channels_last_convolutions`: every UNet convolution's input and output gradient in
  channels-last, which leaves cuDNN's convolution backward nothing to copy (issue 18; part of
  `compile_model`, BENCHMARKS.md "Pretraining step": 8% more samples/s on an H100).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._functorch.config
import torch._inductor.config
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

COMPILED_PARTS = ("unet", "qformer", "text_encoder")

# torch.compile modes (`train.compile_mode`), and those that replay the compiled graphs as CUDA
# graphs. Same names as pipeline/config.py's Literal (tests/train/test_speed.py checks).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")

# `train.unet_sdpa_backend`: the SDPA kernels a setting allows (None: PyTorch's choice). A single
# kernel is strict, so a measurement cannot silently fall back to another: SDPA raises when that
# kernel cannot take the inputs (flash needs fp16/bf16, i.e. autocast on a GPU).
UNET_SDPA_BACKENDS: dict[str, list[SDPBackend] | None] = {
    "auto": None,
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "no-cudnn": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "math": [SDPBackend.MATH],
}
_NO_CPU_KERNEL = ("efficient", "cudnn")


def attention_kernels(backend: str) -> contextlib.AbstractContextManager:
    """Context for a forward pass: "default" (PyTorch's choice of SDPA kernels) or "no-cudnn"
    (flash, memory-efficient or math kernels). The backward uses the forward's choice."""
    if backend == "default":
        return contextlib.nullcontext()
    if backend == "no-cudnn":
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
    raise ValueError(f"unknown SDPA backend {backend!r} (default or no-cudnn)")


class UNetAttention(AttnProcessor2_0):
    """diffusers' SDPA attention processor (the UNet's default) with SDPA limited to the
    kernels of a `train.unet_sdpa_backend` setting, in calls with gradients on (training).

    Why a processor and not a context around the UNet call: torch.compile picks the SDPA kernel
    when it traces (AOTAutograd decomposes `scaled_dot_product_attention` into the kernel's op,
    forward and backward), Dynamo does not guard on the global kernel flags, and the on-disk
    AOTAutograd cache does not key on them either (torch 2.13; pytorch/pytorch PR 186458 proposed
    it). A context outside a compiled UNet would hold only for the first trace, and a warm cache
    could hand back graphs traced under other flags. Inside the processor, Dynamo traces the
    `sdpa_kernel` block itself (torch >= 2.5; 2.4 breaks the graph there and runs the attention
    eagerly) and guards on `backends`: the choice is part of the compiled graph, and a new
    setting recompiles. (Graphs with that block bypass the AOTAutograd cache, so a recompile
    costs a full trace: pytorch/pytorch issue 194007.)

    Calls without gradients (the loop's sample images, generation) keep PyTorch's choice: a
    strict kernel could not take their float32 inputs.
    """

    def __init__(self, setting: str) -> None:
        super().__init__()
        self.setting = setting
        self.backends = UNET_SDPA_BACKENDS[setting]

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        if self.backends is None or not torch.is_grad_enabled():
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        with sdpa_kernel(self.backends):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def set_unet_attention(unet: nn.Module, setting: str) -> int:
    """Give every attention layer of `unet` that runs diffusers' SDPA processor the kernels of
    `setting` (`UNET_SDPA_BACKENDS`); "auto" puts the plain processor back where one of ours is.
    Layers with another processor are left alone. Returns the number of layers set."""
    if setting not in UNET_SDPA_BACKENDS:
        raise ValueError(f"unknown UNet SDPA backend {setting!r} ({', '.join(UNET_SDPA_BACKENDS)})")
    param = next(unet.parameters(), None)
    if param is not None and param.device.type == "cpu" and setting in _NO_CPU_KERNEL:
        raise ValueError(f"UNet SDPA backend {setting!r} has no CPU kernel (auto, flash, no-cudnn or math run on CPU)")
    processor = AttnProcessor2_0() if setting == "auto" else UNetAttention(setting)
    layers = [m for m in unet.modules() if isinstance(m, Attention)]
    takes = (UNetAttention,) if setting == "auto" else (AttnProcessor2_0, UNetAttention)
    ours = [m for m in layers if type(m.processor) in takes]
    for layer in ours:
        layer.set_processor(processor)
    if len(ours) < len(layers) and setting != "auto":
        log.warning(
            "UNet SDPA backend %s: %d of %d attention layers have another processor and keep it",
            setting,
            len(layers) - len(ours),
            len(layers),
        )
    return len(ours)


def compile_model(
    model: nn.Module, parts: tuple[str, ...] = COMPILED_PARTS, mode: str = "default", backend: str = "inductor"
) -> None:
    """torch.compile `parts` of a BlipDiffusion in place (parameter names are unchanged), with
    `mode` (COMPILE_MODES). The UNet goes channels-last first: its convolutions then skip layout
    copies, and channels_last_convolutions hands every convolution channels-last arguments, so
    that cuDNN's backward copies none either. `backend` other than inductor (tests and CPU smoke
    runs: "aot_eager") takes no mode."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r} ({', '.join(COMPILE_MODES)})")
    if "unet" in parts:
        model.unet.to(memory_format=torch.channels_last)
        channels_last_convolutions(model.unet)
        # Their autograd.Function made AOTAutograd bypass its cache for the whole UNet, so a
        # warm-cache job traced and partitioned its forward and backward again. Dynamo traces
        # the Function's forward and backward into the graph, so the cache key covers them
        # (a changed backward misses): caching it is sound. Process-wide, as conv_1x1_as_mm.
        torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True
        # The UNet's 1x1 convolutions (attention in/out projections, skip connections) as matrix
        # products, as every compiled step in BENCHMARKS.md was measured.
        torch._inductor.config.conv_1x1_as_mm = True
    options = {"mode": mode} if backend == "inductor" else {}
    for name in parts:
        getattr(model, name).compile(backend=backend, **options)


# `train.compile: auto` compiles on a GPU for runs of at least this many steps: a compile costs
# ~5 min cold and ~0.5 min from a warm cache on an H100, and saves 0.2-0.5 s per step at batch 32.
COMPILE_MIN_STEPS = 200
# `train.cuda_graphs: auto` captures the eager UNet at per-worker batches up to this. At
# fine-tuning's batch 3 launching ~4,000 kernels a step bounds the step, and the graphs took
# blipd from 17.9 s to 10.7 s a 100 steps (BENCHMARKS.md, "Fine-tuning"); at pretraining's
# batches the kernels themselves bound it, and the graphs' private memory pool, which no other
# part of the step can use, sits beside the rest: an eager pretrain at batch 48 ran out of an
# H100's 80 GB on its second step.
CUDA_GRAPHS_MAX_BATCH = 8
# `train.precompute: auto` precomputes on GPUs when the run plans at least this many epochs:
# encoding a row once costs about what 4-5 epochs of encoding it in the step cost (BENCHMARKS.md).
PRECOMPUTE_MIN_EPOCHS = 5.0


def resolve_compile(setting: bool | str, mode: str, *, cuda: bool, world_size: int, grad_accum: int, steps: int) -> str | None:
    """The torch.compile mode a worker uses, or None for eager. `setting` is `train.compile`
    (True, False or "auto"), `mode` `train.compile_mode` (a COMPILE_MODES name or "auto").

    - compile "auto": on a GPU for runs of COMPILE_MIN_STEPS steps or more; never on the CPU
      (Inductor's CPU code is no faster here, and tiny CPU runs would pay minutes to start).
    - mode "auto": "reduce-overhead" (the compiled graphs replayed as CUDA graphs: the fastest
      measured step) with one worker and no gradient accumulation, else "default".
    - A CUDA-graph mode falls back to one without CUDA graphs, with the reason logged, under
      gradient accumulation (a replayed backward would overwrite the gradients being summed)
      and under DDP (its gradient hooks inside replayed graphs were never verified on GPUs).
    """
    if setting == "auto":
        setting = cuda and steps >= COMPILE_MIN_STEPS
        log.info("train.compile auto -> %s (%s, %d steps)", setting, "GPU" if cuda else "CPU", steps)
    if not setting or not cuda:
        return None
    if mode == "auto":
        mode = "reduce-overhead" if world_size == 1 and grad_accum == 1 else "default"
        log.info("train.compile_mode auto -> %s (%d worker(s), grad_accum %d)", mode, world_size, grad_accum)
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r} ({', '.join(COMPILE_MODES)} or auto)")
    reasons = [why for why, bad in (("grad_accum > 1", grad_accum > 1), ("DDP over several workers", world_size > 1)) if bad]
    if mode in CUDA_GRAPH_MODES and reasons:
        fallback = "max-autotune-no-cudagraphs" if mode == "max-autotune" else "default"
        log.warning("train.compile_mode %s -> %s: no CUDA graphs with %s", mode, fallback, " and ".join(reasons))
        return fallback
    return mode


def resolve_composite(setting: str, *, method: str, has_cutout: bool, precompute: bool | str) -> str:
    """`train.composite`: "auto" is online (fresh composites every epoch, as BLIP-Diffusion's
    pretraining makes them) for pretraining on a dataset whose rows carry the cutout, unless
    precompute is explicitly true (stored composites then: the full precompute, ViT features
    too, makes the fastest step; online composites precompute the targets alone); stored
    otherwise."""
    if setting != "auto":
        return setting
    chosen = "online" if method == "pretrain" and has_cutout and precompute is not True else "stored"
    log.info("train.composite auto -> %s (%s, %s)", chosen, method, "rows with cutouts" if has_cutout else "no cutouts")
    return chosen


def resolve_precompute(
    setting: bool | str, *, gpu: bool, rows: int, samples_per_step: int, steps: int, online: bool = False, cached: bool = False
) -> bool:
    """`train.precompute`: "auto" precomputes on GPUs when the run's planned epochs
    (steps x samples per step / rows) reach PRECOMPUTE_MIN_EPOCHS, or when the precomputed
    inputs are `cached` already (an earlier job's, free now: a short restart or second job then
    also reuses that job's compiled graphs); never on the CPU. With
    `online` composites it precomputes the targets' VAE posteriors only (each epoch's composite
    is new: its ViT features are made in the step); the same rule holds, the VAE encoder being
    nearly all of what the step spends on encoding (benchmarks/bench_pretrain.py --composite
    measures it). A precomputed target is centre-cropped for the whole run (no random crops)."""
    if setting != "auto":
        return bool(setting)
    epochs = steps * samples_per_step / max(rows, 1)
    chosen = gpu and (epochs >= PRECOMPUTE_MIN_EPOCHS or cached)
    what = " (the targets; train.composite online)" if online and chosen else ""
    reuse = ", precomputed already" if gpu and cached else ""
    log.info("train.precompute auto -> %s%s (%s, %.1f planned epochs%s)", chosen, what, "GPU" if gpu else "CPU", epochs, reuse)
    return chosen


def resolve_speed_settings(train: Any, rows: int, has_cutout: bool = False, ready: Callable[[Any], bool] | None = None) -> Any:
    """`train` (a TrainConfig) with its "auto" speed settings resolved for its workers and a
    dataset of `rows` rows (`has_cutout`: rows carry the cutout for online composites): what the
    driver logs with the run and hands to the workers. `ready(train)`: whether the precomputed
    inputs for `train` (its composite resolved) exist already (pipeline.train.data.precompute_ready)."""
    cuda, workers = train.gpu, train.workers
    mode = resolve_compile(
        train.compile, train.compile_mode, cuda=cuda, world_size=workers, grad_accum=train.grad_accum, steps=train.steps
    )
    composite = resolve_composite(train.composite, method=train.method, has_cutout=has_cutout, precompute=train.precompute)
    cached = train.precompute == "auto" and cuda and ready is not None and ready(train.model_copy(update={"composite": composite}))
    precompute = resolve_precompute(
        train.precompute, gpu=cuda, rows=rows, samples_per_step=train.batch_size * train.grad_accum * workers, steps=train.steps,
        online=composite == "online", cached=cached,
    )  # fmt: skip
    return train.model_copy(
        update={
            "compile": mode is not None,
            "compile_mode": mode or ("default" if train.compile_mode == "auto" else train.compile_mode),
            "composite": composite,
            "precompute": precompute,
        }
    )


def use_compile_cache(storage_path: str) -> str | None:
    """Point Inductor's cache (its FX graphs, AOTAutograd entries and Triton kernels) at
    <storage_path>/compile-cache, shared by every run there: a restart, a resume or a second job
    with the same shapes then skips the code generation. Call before the first compile. Local
    storage only (the caches are plain folders); returns the folder, or None."""
    if "://" in storage_path:
        log.info("compile cache stays on the node: train.storage_path %s is not a local folder", storage_path)
        return None
    return point_compile_cache(Path(storage_path) / "compile-cache")


def point_compile_cache(folder: str | Path) -> str:
    """Make `folder` and point this process's Inductor cache (TORCHINDUCTOR_CACHE_DIR) and Triton
    cache (TRITON_CACHE_DIR, its triton/ subfolder) at it; both are read when a compile needs
    them, so call it before the first compile. Returns the resolved folder. Training's
    `use_compile_cache` and the server's serve.compile_cache go through here."""
    path = Path(folder).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ["TRITON_CACHE_DIR"] = str(path / "triton")
    return str(path)


def compile_cache_counts(since: dict[str, int] | None = None) -> dict[str, int]:
    """This process's hits, misses and bypasses of Inductor's FX graph cache and the AOTAutograd
    cache (torch's dynamo counters; empty before any compile): what a warm start reused. With
    `since` (an earlier result), only those after it."""
    from torch._dynamo.utils import counters

    wanted = {"inductor": "fxgraph_cache_", "aot_autograd": "autograd_cache_"}
    now = {f"{group}.{name}": count for group, prefix in wanted.items() for name, count in counters[group].items() if name.startswith(prefix)}
    since = since or {}
    return {name: count - since.get(name, 0) for name, count in now.items() if count > since.get(name, 0)}


def compile_time_spent() -> dict[str, float]:
    """This process's torch.compile seconds so far, by Dynamo's timers (calculate_time_spent)."""
    from torch._dynamo.utils import calculate_time_spent

    return dict(calculate_time_spent())


def describe_compile_time(since: dict[str, float] | None = None) -> str:
    """torch.compile's time in this process (with `since`, a `compile_time_spent()` from before:
    the time after it), from Dynamo's timers: "compile 70.2 s (forward graphs 55.0 s, 25.0 s of
    it in the backend; backward graphs 15.2 s)", or "no compile". The forward graphs' time is
    Dynamo's tracing plus the backend's (AOTAutograd and Inductor, or their cache reads); the
    backward graphs are compiled at the first backward. A compile earlier in the process (a
    test's, a reused worker's) is not this job's, hence `since`."""
    since = since or {}
    spent = {key: value - since.get(key, 0.0) for key, value in compile_time_spent().items()}
    if spent.get("total_wall_time", 0.0) <= 0.0:
        return "no compile"
    return (
        f"compile {spent['total_wall_time']:.1f} s (forward graphs {spent.get('entire_frame_compile', 0.0):.1f} s, "
        f"{spent.get('backend_compile', 0.0):.1f} s of it in the backend; backward graphs {spent.get('entire_backward_compile', 0.0):.1f} s)"
    )


def step_begin(mode: str | None) -> None:
    """Call at the start of each optimizer step. Under CUDA-graph modes it tells cudagraph trees
    that the previous step's graph outputs are dead, so the next replays may reuse their memory.
    Said explicitly rather than left to the trees' guess (a compiled call with no backward
    pending starts a new step), which PyTorch's docs say to override where it can be wrong."""
    if mode in CUDA_GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()


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
            # which we do not rely on under replay (a train.unet_sdpa_backend other than auto
            # is the user's explicit choice and wins, inside the UNet's processors).
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


def use_cuda_graphs(
    enabled: bool | str, device: torch.device, world_size: int, grad_accum: int, compiled: bool, checkpointing: bool = False,
    batch_size: int = 1,
) -> bool:
    """Whether `train.cuda_graphs` applies: a GPU, one worker (DDP's gradient hooks were not
    checked under replay), no gradient accumulation (see GraphedUNet), an eager UNet (a
    compiled one fuses its kernels instead) and no gradient checkpointing (its recomputation
    in the backward pass was not checked under capture). "auto": also a per-worker batch of at
    most CUDA_GRAPHS_MAX_BATCH."""
    if enabled == "auto":
        enabled = batch_size <= CUDA_GRAPHS_MAX_BATCH
        if not enabled and device.type == "cuda":
            log.info("train.cuda_graphs auto -> off: batch %d > %d", batch_size, CUDA_GRAPHS_MAX_BATCH)
    if not enabled or device.type != "cuda":
        return False
    reasons = [
        why
        for why, bad in (
            ("several workers", world_size > 1),
            ("grad_accum > 1", grad_accum > 1),
            ("train.compile", compiled),
            ("train.gradient_checkpointing", checkpointing),
        )
        if bad
    ]
    if reasons:
        log.info("train.cuda_graphs off: %s", ", ".join(reasons))
        return False
    return True


class _ChannelsLastGradient(torch.autograd.Function):
    """Identity whose backward hands the gradient on in channels-last memory (values unchanged)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


def _channels_last_input(conv: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: the convolution's input in channels-last memory (no copy if it is)."""
    x = args[0]
    if x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last):
        return None
    return (x.contiguous(memory_format=torch.channels_last), *args[1:])


def _channels_last_output_gradient(conv: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
    """Forward hook: the gradient reaching the convolution's output goes on in channels-last."""
    if out.dim() != 4 or not (torch.is_grad_enabled() and out.requires_grad):
        return None
    return _ChannelsLastGradient.apply(out)


def channels_last_convolutions(unet: nn.Module) -> int:
    """Hand every Conv2d of `unet` (channels-last weights, compile_model) a channels-last input
    and, in the backward, a channels-last output gradient; values are unchanged. Returns the
    number of convolutions hooked now (0 when they all are already). compile_model applies it
    to a compiled UNet; benchmarks/bench_pretrain.py's +noclconv takes it off again, to measure.

    Why: cuDNN's convolution backward with a channels-last weight copies an argument that is not
    channels-last (ATen's generic elementwise kernel), and in a compiled backward Inductor pins
    `convolution_backward`'s arguments to the traced strides (constrain_conv_bwd_to_fx_strides),
    so those copies stay inside the compiled step. diffusers (0.42.1) makes such arguments in
    training: ResnetBlock2D.forward's `input_tensor.contiguous()` before conv_shortcut and
    Transformer2DModel._get_output_for_continuous_inputs' `.permute(0, 3, 1, 2).contiguous()`
    before proj_out give NCHW inputs; the up blocks' torch.cat hands Upsample2D.conv, and
    proj_out through its residual sum, a channel slice of its gradient. A pre-hook lays the
    input out channels-last, a forward hook wraps the output in an identity whose backward
    lays the gradient out channels-last: traced, both are copies Inductor writes (and may fuse)
    instead of ATen's inside the convolution backward. Every Conv2d, not just those: where an
    argument already is channels-last, both are no-ops (no copy, nothing traced).
    """
    hooked = 0
    for conv in unet.modules():
        if not isinstance(conv, nn.Conv2d) or _channels_last_input in conv._forward_pre_hooks.values():
            continue
        conv.register_forward_pre_hook(_channels_last_input)
        conv.register_forward_hook(_channels_last_output_gradient)
        hooked += 1
    return hooked


def remove_channels_last_convolutions(unet: nn.Module) -> int:
    """Undo channels_last_convolutions; returns the number of convolutions unhooked."""
    unhooked = 0
    for conv in unet.modules():
        for hooks, hook in (
            (conv._forward_pre_hooks, _channels_last_input),
            (conv._forward_hooks, _channels_last_output_gradient),
        ):
            for key in [k for k, h in hooks.items() if h is hook]:
                del hooks[key]
                unhooked += hook is _channels_last_input
    return unhooked
