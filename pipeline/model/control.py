"""Structure control for generation: control maps and the ControlNet that reads them.

A control map is an RGB image the size of the output whose structure the generated image
follows: Canny edges of a photo, its depth, its HED soft edges, or a map given as is. A
ControlNet (diffusers' `ControlNetModel`, a trainable copy of the UNet's encoder) turns the map
into residuals that are added to the UNet's skip connections at every denoising step of its
window (`Control.start`/`end`, every step by default), as in LAVIS `BlipDiffusion._predict_noise` and diffusers' `BlipDiffusionControlNetPipeline`.

The ControlNet runs in two parts. Its conditioning embedding of the map (small-channel convs at
the full image size) is the same at every step, so a generation computes it once
(`Control.prepared`, `embed_control_image`); each step runs the rest, `controlnet_residuals`, our
own step of `ControlNetModel.forward` from its submodules with that embedding.

Maps are made here, in process: Canny with OpenCV, depth with a transformers depth-estimation
model, HED with a TorchScript edge detector. Detector and ControlNet weights are loaded from a
folder or the Hub cache; nothing here downloads unless the caller allows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from pipeline.config import CONTROL_KINDS
from pipeline.errors import UserError
from pipeline.model.image_processing import ImageLike, SubjectImageProcessor, read_rgb

# Kinds whose map is computed from a photo by a model the user names.
DETECTOR_KINDS = ("depth", "hed")


class ControlError(UserError, ValueError):
    """A control image, map, detector or ControlNet that cannot be used; the message names it."""


# ControlNet config keys and the values `controlnet_residuals` supports (the SD 1.5 layout of
# the released ControlNets); anything else needs inputs we never pass (class labels, added
# conditions) or changes what the residuals mean (pooled, guess-mode ControlNets).
SUPPORTED_CONFIG = {
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "addition_embed_type": (None,),
    "encoder_hid_dim_type": (None,),
    "global_pool_conditions": (False,),
    "controlnet_conditioning_channel_order": ("rgb", "bgr"),
    "mid_block_type": ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"),
}


@dataclass(frozen=True)
class Control:
    """What one generation is steered by.

    controlnet: the loaded ControlNet (same device and dtype as the UNet);
    image: (1, 3, H, W) float in [0, 1], the map at the output size (`prepare_control_image`);
    scale: multiplies every residual; 0 leaves the UNet's output unchanged;
    start, end: the guidance window, fractions of the denoising steps (0 <= start < end <= 1,
    diffusers' control_guidance_start/end; not in LAVIS): the ControlNet steers only the steps
    `steered_steps` keeps, so that with end < 1 the last steps draw detail freely. The defaults
    steer every step;
    embedding: the ControlNet's embedding of `image`, (1, C0, H/8, W/8) in its dtype, on its
    device, set by `prepared` (None until then).
    """

    controlnet: Any  # diffusers.ControlNetModel (imported lazily: diffusers is slow to import)
    image: torch.Tensor
    scale: float = 1.0
    embedding: torch.Tensor | None = field(default=None, repr=False)
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.start < self.end <= 1.0:  # also False for NaN
            raise ControlError(
                f"the control window needs 0 <= start < end <= 1, got start={self.start} and end={self.end}"
            )

    def steers(self, num_steps: int) -> list[bool]:
        """For each of `num_steps` denoising steps, whether the ControlNet runs in it
        (`steered_steps` of this control's window)."""
        return steered_steps(num_steps, self.start, self.end)

    def prepared(self) -> Control:
        """This control with its embedding computed (itself when it has one): once per
        generation, since the map does not change from step to step. ControlError when the
        ControlNet's config is one `controlnet_residuals` does not run."""
        if self.embedding is not None:
            return self
        check_controlnet_config(self.controlnet)
        return replace(self, embedding=embed_control_image(self.controlnet, self.image))


def steered_steps(num_steps: int, start: float = 0.0, end: float = 1.0) -> list[bool]:
    """Which of `num_steps` denoising steps (scheduler timesteps, PNDM's repeated first one
    included) a ControlNet with the window start..end steers: diffusers' `controlnet_keep` of
    StableDiffusionControlNetPipeline, keep = 1 unless i / n < start or (i + 1) / n > end, the
    same expression so that a window keeps exactly diffusers' steps (end=0.5 of 10 keeps 0..4)."""
    return [not (i / num_steps < start or (i + 1) / num_steps > end) for i in range(num_steps)]


def check_controlnet_config(controlnet: Any) -> None:
    """ControlError naming the first config value outside SUPPORTED_CONFIG."""
    for key, allowed in SUPPORTED_CONFIG.items():
        value = controlnet.config.get(key)
        if value not in allowed:
            raise ControlError(
                f"ControlNets with {key}={value!r} are not supported (supported: {' or '.join(map(repr, allowed))}); "
                "use an SD 1.5 ControlNet such as lllyasviel/sd-controlnet-canny"
            )


def embed_control_image(controlnet: Any, image: torch.Tensor) -> torch.Tensor:
    """The ControlNet's conditioning embedding of a control map (1, 3, H, W) float in [0, 1]
    -> (1, C0, H/8, W/8) in the ControlNet's dtype and device, C0 its first block's channels.
    What `ControlNetModel.forward` adds to `conv_in` of the latents at every step, computed
    once: it depends on the map alone."""
    image = image.to(device=controlnet.device, dtype=controlnet.dtype)
    if controlnet.config.controlnet_conditioning_channel_order == "bgr":
        image = image.flip(1)  # the ControlNet was trained on BGR maps
    return controlnet.controlnet_cond_embedding(image)


def controlnet_residuals(
    controlnet: Any,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    embeds: torch.Tensor,
    embedding: torch.Tensor,
    scale: float,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """One step of the ControlNet with the map's `embedding` (`embed_control_image`), equal to
    `ControlNetModel.forward(latents, timestep, embeds, map, scale)` for the configs
    `check_controlnet_config` accepts (no class or added embeddings, no guess mode).

    latents (b, C, h, w), timestep 0-d or (b,), text states (b, 77, D), embedding (1 or b, C0,
    h, w) -> the UNet's residuals times `scale`: one per down-block output (b, Ci, hi, wi), and
    the mid block's.
    """
    time = embed_timestep(controlnet, latents, timestep)
    hidden = controlnet.conv_in(latents) + embedding  # a (1, ...) embedding broadcasts over the batch
    hidden, skips = run_down_blocks(controlnet, hidden, time, embeds)
    hidden = run_mid_block(controlnet.mid_block, hidden, time, embeds)
    down = tuple(project(skip) * scale for project, skip in zip(controlnet.controlnet_down_blocks, skips, strict=True))
    return down, controlnet.controlnet_mid_block(hidden) * scale


def embed_timestep(net: Any, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """A UNet's or ControlNet's time embedding (b, T) of `timestep` (0-d or (b,)) for `latents`
    (b, C, h, w), as their forward makes it: the sinusoidal projection is float32 whatever the
    weights, cast to the latents' dtype as diffusers does."""
    timesteps = timestep.reshape(-1).to(latents.device).expand(latents.shape[0])
    return net.time_embedding(net.time_proj(timesteps).to(latents.dtype))


def run_down_blocks(net: Any, hidden: torch.Tensor, time: torch.Tensor, embeds: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """A UNet's or ControlNet's down blocks on `hidden` (conv_in's output), as their forward runs
    them: the last block's output, and the skip connections (`hidden`, then each block's)."""
    skips = [hidden]
    for block in net.down_blocks:
        if getattr(block, "has_cross_attention", False):
            hidden, outputs = block(hidden_states=hidden, temb=time, encoder_hidden_states=embeds)
        else:
            hidden, outputs = block(hidden_states=hidden, temb=time)
        skips.extend(outputs)
    return hidden, tuple(skips)


def run_mid_block(block: Any, hidden: torch.Tensor, time: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """A UNet's or ControlNet's mid block, with the text states where it attends to them."""
    if getattr(block, "has_cross_attention", False):
        return block(hidden, time, encoder_hidden_states=embeds)
    return block(hidden, time)


def load_controlnet(path_or_id: str | Path, *, dtype: torch.dtype, device: str | torch.device, local_files_only: bool = True):
    """diffusers' ControlNetModel from a folder or a Hub id (offline by default)."""
    from diffusers import ControlNetModel

    try:
        model = ControlNetModel.from_pretrained(str(path_or_id), torch_dtype=dtype, local_files_only=local_files_only)
    except (OSError, ValueError) as exc:
        raise ControlError(f"cannot load the ControlNet {str(path_or_id)!r}: {exc}") from exc
    except RecursionError:  # a config.json nested past Python's recursion
        raise ControlError(f"cannot load the ControlNet {str(path_or_id)!r}: its config.json nests too deeply") from None
    # Weights the files lack stay on the meta device (a UNet's folder has none of the
    # ControlNet's own): .to(device) failed on them with a NotImplementedError.
    missing = [name for name, param in model.named_parameters() if param.device.type == "meta"]
    if missing:
        raise ControlError(
            f"{str(path_or_id)!r} is not a whole ControlNet: its files lack {len(missing)} of its weights (e.g. {missing[0]})"
        )
    return model.to(device).eval()


def match_layout(controlnet: Any, unet: Any) -> None:
    """Put `controlnet` in `unet`'s memory format, in place: channels-last when the UNet is
    (`BlipDiffusion.compile_for_inference` converts the UNet; a ControlNet loaded later would
    otherwise run its convolutions in the other layout, with a layout copy at each residual
    it hands the UNet). Cheap to call again: it looks at one weight of each."""
    def channels_last(module: Any) -> bool:
        weight = module.conv_in.weight
        return weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()

    if channels_last(unet) and not channels_last(controlnet):
        controlnet.to(memory_format=torch.channels_last)


def check_controlnet(controlnet: Any, unet: Any) -> None:
    """A ControlNet built for another UNet layout would fail deep inside the UNet; say so here."""
    want = tuple(unet.config.block_out_channels)
    have = tuple(controlnet.config.block_out_channels)
    if have != want or controlnet.config.cross_attention_dim != unet.config.cross_attention_dim:
        raise ControlError(
            f"the ControlNet (blocks {have}, cross-attention {controlnet.config.cross_attention_dim}) does not fit "
            f"the UNet (blocks {want}, cross-attention {unet.config.cross_attention_dim})"
        )


def read_control_image(path: ImageLike) -> PIL.Image.Image:
    """The control photo or map as RGB; ControlError naming the file when it is not an image."""
    return read_rgb(path, ControlError, "control image")


def canny_map(image: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Canny edges of an RGB image (H, W, 3) uint8 -> (H, W, 3) uint8, 255 on edges, 0 elsewhere.

    OpenCV's Canny on the colour image (the gradient is the largest over the channels), with
    hysteresis thresholds `low` < `high` on the Sobel gradient magnitude (L1 norm), which is
    what the released canny ControlNets were trained on (controlnet_aux's CannyDetector).
    """
    import cv2

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ControlError(f"canny needs an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    if not 0 <= low <= high:
        raise ControlError(f"canny thresholds must satisfy 0 <= low <= high, got {low} and {high}")
    edges = cv2.Canny(np.ascontiguousarray(image), low, high)
    return np.repeat(edges[:, :, None], 3, axis=2)


def depth_map(image: np.ndarray, detector: str | Path, local_files_only: bool = True) -> np.ndarray:
    """Relative depth of an RGB image (H, W, 3) uint8 -> (H, W, 3) uint8, near = bright.

    detector: a transformers depth-estimation model (id or folder), e.g. Intel/dpt-hybrid-midas,
    the estimator the released depth ControlNet was trained with. Its output is scaled to
    0..255 per image.
    """
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    try:
        processor = AutoImageProcessor.from_pretrained(str(detector), local_files_only=local_files_only)
        model = AutoModelForDepthEstimation.from_pretrained(str(detector), local_files_only=local_files_only).eval()
    except (OSError, ValueError) as exc:
        raise ControlError(f"cannot load the depth model {detector!r} (generate.control.detector): {exc}") from exc
    with torch.no_grad():
        depth = model(**processor(images=PIL.Image.fromarray(image), return_tensors="pt")).predicted_depth
    depth = torch.nn.functional.interpolate(depth[:, None].float(), size=image.shape[:2], mode="bicubic")[0, 0]
    return _to_map(depth)


def hed_map(image: np.ndarray, detector: str | Path) -> np.ndarray:
    """Soft edges of an RGB image (H, W, 3) uint8 -> (H, W, 3) uint8.

    detector: a TorchScript file of an HED network taking (1, 3, H, W) float in [0, 255] and
    returning edge probabilities (1, 1, H, W) in [0, 1] (HED has no transformers class, so the
    network comes as a scripted file; export one with `torch.jit.script(model).save(path)`).
    """
    path = Path(detector)
    if not path.is_file():
        raise ControlError(f"the HED model {str(detector)!r} (generate.control.detector) is not a file")
    try:
        model = torch.jit.load(str(path), map_location="cpu").eval()
    except (RuntimeError, ValueError) as exc:
        raise ControlError(f"cannot load the HED model {str(detector)!r} as TorchScript: {exc}") from exc
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        edges = model(pixels)
    if not torch.is_tensor(edges) or edges.shape[-2:] != image.shape[:2]:
        raise ControlError(f"the HED model {str(detector)!r} must return (1, 1, H, W) edges for an (H, W) image")
    return _to_map(edges.reshape(image.shape[:2]).clamp(0, 1) * 255, normalize=False)


def make_control_map(
    kind: str,
    image: PIL.Image.Image,
    height: int,
    width: int,
    *,
    detector: str | Path | None = None,
    canny_low: int = 100,
    canny_high: int = 200,
    local_files_only: bool = True,
) -> PIL.Image.Image:
    """The control map of `kind` for an output of height x width, as an RGB image of that size.

    A photo is first resized to the output size (PIL bicubic, aspect ratio not kept), so edges
    stay one pixel thin in the output. A `map` is returned unchanged: `prepare_control_image`
    resizes it the same way.
    """
    if kind == "map":
        return image
    if kind in DETECTOR_KINDS and detector is None:
        raise ControlError(f"--control {kind} needs a detector model (generate.control.detector: an id or a path)")
    photo = np.asarray(image.convert("RGB").resize((width, height), resample=PIL.Image.Resampling.BICUBIC))
    if kind == "canny":
        result = canny_map(photo, canny_low, canny_high)
    elif kind == "depth":
        result = depth_map(photo, detector, local_files_only)
    elif kind == "hed":
        result = hed_map(photo, detector)
    else:
        raise ControlError(f"unknown control kind {kind!r}; choose one of {', '.join(CONTROL_KINDS[1:])}")
    return PIL.Image.fromarray(result)


def prepare_control_image(image: PIL.Image.Image, processor: SubjectImageProcessor, height: int, width: int) -> torch.Tensor:
    """Control map -> (1, 3, height, width) float32 in [0, 1]: RGB, PIL bicubic resize to the
    output size (aspect ratio not kept), times 1/255; no normalisation and no crop. This is the
    reference's `prepare_control_image` (its image processor with those options)."""
    config = {
        **processor.config,
        "size": {"height": height, "width": width},
        "do_normalize": False,
        "do_center_crop": False,
        "do_resize": True,
        "do_rescale": True,
    }
    return SubjectImageProcessor(config).preprocess(image)


def build_control(
    settings: Any,
    controlnet: str | Path,
    processor: SubjectImageProcessor,
    height: int,
    width: int,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    local_files_only: bool = True,
) -> Control:
    """The Control of one generation from `generate.control` settings (pipeline.config
    ControlConfig, a kind other than "none") and the ControlNet's id or folder."""
    photo = read_control_image(settings.image)
    control_map = make_control_map(
        settings.kind,
        photo,
        height,
        width,
        detector=settings.detector,
        canny_low=settings.canny_low,
        canny_high=settings.canny_high,
        local_files_only=local_files_only,
    )
    image = prepare_control_image(control_map, processor, height, width)
    model = load_controlnet(controlnet, dtype=dtype, device=device, local_files_only=local_files_only)
    return Control(model, image, settings.scale, start=settings.start, end=settings.end)


def _to_map(values: torch.Tensor, normalize: bool = True) -> np.ndarray:
    """(H, W) float -> (H, W, 3) uint8, min-max scaled to 0..255 when `normalize`."""
    values = values.float()
    if normalize:
        low, high = values.min(), values.max()
        values = (values - low) / (high - low).clamp_min(1e-8) * 255
    gray = values.round().clamp(0, 255).to(torch.uint8).numpy()
    return np.repeat(gray[:, :, None], 3, axis=2)


__all__ = [
    "CONTROL_KINDS",
    "Control",
    "build_control",
    "ControlError",
    "canny_map",
    "check_controlnet",
    "check_controlnet_config",
    "controlnet_residuals",
    "depth_map",
    "embed_control_image",
    "hed_map",
    "load_controlnet",
    "make_control_map",
    "prepare_control_image",
    "read_control_image",
    "steered_steps",
]
