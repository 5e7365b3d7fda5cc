"""The compiled controlled denoising step: the ControlNet beside the UNet's encoder half.

A controlled step is one ControlNet call (`controlnet_residuals`) and one UNet call that adds
the ControlNet's residuals to its skip connections and to its mid block's output. The UNet
needs them only after its down blocks: its time embedding, `conv_in` and down blocks
(`unet_encode`) do not read them. So on a GPU the ControlNet runs on a second CUDA stream while
the UNet's encoder half runs on the current one, and the rest of the UNet (`unet_decode`: the
residual adds, the mid block, the up blocks) waits for both. At one image's batch (two rows
with guidance) neither net fills an H100, its low-resolution layers least: plain generation
ran at ~20% of the card's fp16 peak and the ControlNet step at 78% of plain's FLOP rate
(BENCHMARKS.md "ControlNet generation"), so side by side the two share the idle SMs instead
of queueing behind each other. The operations and their inputs are the one-call step's
(`BlipDiffusion._controlled_noise`): the noise is the same bit for bit (tests, on a CPU).

Compiled (`BlipDiffusion.compile_for_inference(control=True)`), each of the three parts is an
Inductor graph without CUDA graphs, and with a CUDA-graph mode (reduce-overhead, max-autotune)
the whole step, both streams, is captured as one CUDA graph per input shape (`_Captured`) and
replayed: torch.compile's own CUDA graphs are recorded per compiled function, on one stream,
and the step's ~600 kernels launched from Python one by one would leave the GPU waiting for
the host at these sizes.

A UNet whose config `unet_encode` / `unet_decode` do not follow (class or added embeddings, a
centred input: not SD 1.5's) keeps the one-call step (`supports_unet`).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from pipeline.model.control import controlnet_residuals, embed_timestep, run_down_blocks, run_mid_block

# UNet2DConditionModel config keys and the values unet_encode / unet_decode follow (SD 1.5's):
# anything else adds inputs or steps to diffusers' forward that these two do not take.
SUPPORTED_UNET_CONFIG = {
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "addition_embed_type": (None,),
    "encoder_hid_dim_type": (None,),
    "time_cond_proj_dim": (None,),
    "time_embedding_act_fn": (None,),
    "center_input_sample": (False,),
}
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
MAX_CAPTURED = 8  # step graphs kept (one per input shape, scale and model pair); each holds its activations' memory

Tensors = tuple[torch.Tensor, ...]


def supports_unet(unet: Any) -> bool:
    """Whether `unet_encode` and `unet_decode` together equal `unet.forward` for this UNet."""
    config = unet.config
    return all(config.get(key) in allowed for key, allowed in SUPPORTED_UNET_CONFIG.items())


def unet_encode(unet: Any, latents: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor) -> tuple[torch.Tensor, Tensors, torch.Tensor]:
    """The UNet's forward up to its down blocks' outputs (UNet2DConditionModel.forward for the
    configs `supports_unet` accepts): latents (b, C, h, w), timestep 0-d or (b,), text states
    (b, 77, D) -> the last down block's output, the skip connections (conv_in's output, then each
    down block's), and the time embedding (b, T)."""
    time = embed_timestep(unet, latents, timestep)
    hidden, skips = run_down_blocks(unet, unet.conv_in(latents), time, embeds)
    return hidden, skips, time


def unet_decode(
    unet: Any,
    hidden: torch.Tensor,
    skips: Tensors,
    time: torch.Tensor,
    embeds: torch.Tensor,
    down_residuals: Tensors,
    mid_residual: torch.Tensor,
) -> torch.Tensor:
    """The rest of the UNet's forward after `unet_encode`, with a ControlNet's residuals added
    as diffusers adds `down_block_additional_residuals` and `mid_block_additional_residual`
    -> the noise (b, C, h, w)."""
    skips = tuple(skip + residual for skip, residual in zip(skips, down_residuals, strict=True))
    if unet.mid_block is not None:
        hidden = run_mid_block(unet.mid_block, hidden, time, embeds)
    hidden = hidden + mid_residual
    # A latent side that is not a multiple of the up-sampling factor needs each upsampler told
    # its output size, the size of the skip connection it meets (diffusers' forward_upsample_size).
    factor = 2**unet.num_upsamplers
    exact = all(side % factor == 0 for side in skips[0].shape[-2:])
    last = len(unet.up_blocks) - 1
    for i, block in enumerate(unet.up_blocks):
        taken = len(block.resnets)
        block_skips, skips = skips[-taken:], skips[:-taken]
        size = None if exact or i == last else skips[-1].shape[2:]
        if getattr(block, "has_cross_attention", False):
            hidden = block(hidden_states=hidden, temb=time, res_hidden_states_tuple=block_skips, encoder_hidden_states=embeds,
                           upsample_size=size)
        else:
            hidden = block(hidden_states=hidden, temb=time, res_hidden_states_tuple=block_skips, upsample_size=size)
    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)


class ControlledStep:
    """`BlipDiffusion._controlled_noise`'s signature, (latents, t, embeds, controlnet, embedding,
    scale) -> noise, run as the module docstring says: its three parts compiled with `compile`
    (a function -> compiled function; `torch.compile` with the caller's options), the ControlNet
    on a side stream on a GPU, and with `cuda_graphs` the step captured per input shape."""

    def __init__(self, unet: Any, compile: Callable[[Callable], Callable], cuda_graphs: bool = False) -> None:
        self.unet = unet
        self._encode, self._decode, self._residuals = compile(unet_encode), compile(unet_decode), compile(controlnet_residuals)
        self.cuda_graphs = cuda_graphs
        self._side: torch.cuda.Stream | None = None
        self._captured: OrderedDict[tuple, tuple[_Captured, weakref.ref]] = OrderedDict()

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, controlnet: Any,
                 embedding: torch.Tensor, scale: float) -> torch.Tensor:
        if latents.device.type != "cuda":
            return self._run(latents, t, embeds, embedding, controlnet=controlnet, scale=scale)
        if not self.cuda_graphs:
            return self._run_two_streams(latents, t, embeds, embedding, controlnet=controlnet, scale=scale)
        inputs = (latents, t, embeds, embedding)
        # A graph replays the weights at the addresses it was captured with: the key holds the
        # nets' first weights' addresses (a net moved or converted since is captured anew), and
        # the entry a weak reference to the ControlNet (a new one given a dead one's id is not it).
        weights = tuple(next(net.parameters()).data_ptr() for net in (self.unet, controlnet))
        key = (*((x.shape, x.dtype, x.device) for x in inputs), id(controlnet), weights, float(scale))
        entry = self._captured.get(key)
        if entry is None or entry[1]() is not controlnet:
            entry = (_Captured(lambda *xs: self._run_two_streams(*xs, controlnet=controlnet, scale=scale), inputs),
                     weakref.ref(controlnet))
            self._captured[key] = entry
            while len(self._captured) > MAX_CAPTURED:
                self._captured.popitem(last=False)
        self._captured.move_to_end(key)
        return entry[0](inputs)

    def _run(self, latents, t, embeds, embedding, *, controlnet, scale) -> torch.Tensor:
        """The three parts one after another (a CPU)."""
        down, mid = self._residuals(controlnet, latents, t, embeds, embedding, scale)
        hidden, skips, time = self._encode(self.unet, latents, t, embeds)
        return self._decode(self.unet, hidden, skips, time, embeds, down, mid)

    def _run_two_streams(self, latents, t, embeds, embedding, *, controlnet, scale) -> torch.Tensor:
        """The ControlNet on the side stream, the UNet's encoder half on the current one, the
        decoder half after both. No tensor needs `record_stream`: every input the side stream
        reads is held by the caller past the join, and the side stream's own allocations are
        reused only by its next step's work, which waits for everything queued before it."""
        main = torch.cuda.current_stream(latents.device)
        if self._side is None:
            self._side = torch.cuda.Stream(latents.device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            down, mid = self._residuals(controlnet, latents, t, embeds, embedding, scale)
        hidden, skips, time = self._encode(self.unet, latents, t, embeds)
        main.wait_stream(self._side)
        return self._decode(self.unet, hidden, skips, time, embeds, down, mid)


class _Captured:
    """One input shape's step as a CUDA graph: built from a first run on a spare stream (the
    compile, Triton's autotuning and cuBLAS's set-up happen there, not in the capture), then
    replayed on copies of each call's inputs into its own. Its output tensor is the graph's,
    rewritten by the next replay, as a torch.compile CUDA graph's is (the denoising loop keeps
    copies: `BlipDiffusion._denoise`)."""

    def __init__(self, step: Callable[..., torch.Tensor], inputs: Tensors) -> None:
        device = inputs[0].device
        self.inputs = tuple(x.clone() for x in inputs)
        spare = torch.cuda.Stream(device)
        spare.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(spare):
            step(*self.inputs)
        torch.cuda.current_stream(device).wait_stream(spare)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = step(*self.inputs)

    def __call__(self, inputs: Tensors) -> torch.Tensor:
        for mine, given in zip(self.inputs, inputs, strict=True):
            mine.copy_(given)
        self.graph.replay()
        return self.output
