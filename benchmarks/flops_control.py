"""Compute floor of ControlNet generation: FLOPs of plain and ControlNet generation per image.

Counts, with torch's flop counter (matmuls, convolutions and attention; norms, activations and
adds are not counted), the modules one `generate` call runs at the real sizes of
bench_generate.py (`build_real`, and `ControlNetModel.from_unet` as its --control mode):
512 px, 64x64 latents, 77 tokens, classifier-free guidance (UNet and ControlNet at batch 2).

    python benchmarks/flops_control.py                 # on the meta device: shapes only, seconds
    python benchmarks/flops_control.py --device cpu    # real float32 tensors, if meta ever fails

Per generation: plain is 51 UNet calls (50 PNDM steps), one VAE decode, the subject encoder
(BLIP-2 ViT and Q-Former on one photo) and the text encoder (prompt and negative prompt);
ControlNet adds 51 ControlNet steps (`controlnet_residuals`) and one conditioning embedding of
the map (`embed_control_image`). The FLOP ratio is the floor of the time ratio when the ControlNet runs
at the plain loop's FLOP rate. A roofline of each weight layer (fp16 weights read once a call,
H100 SXM peaks; activations not counted) shows how much of a batch-2 call is bandwidth-bound.
Options that cut ControlNet FLOPs are counted too; only the shared prefix keeps outputs exact.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import PROMPT, build_real  # noqa: E402

from pipeline.model.control import controlnet_residuals, embed_control_image  # noqa: E402
from pipeline.model.make_tiny import sd_scheduler  # noqa: E402
from pipeline.model.prompts import DEFAULT_NEGATIVE_PROMPT  # noqa: E402

PEAK_FLOPS = 989e12  # H100 SXM dense fp16/bf16 tensor-core FLOP/s
PEAK_BYTES = 3.35e12  # H100 SXM HBM3 bytes/s
GIGA = 1e9
# Modules whose input is the same in the unconditional and conditional rows (same latents,
# timestep and map): everything before the first cross-attention of down block 0.
SHARED_PREFIX = ("time_embedding", "conv_in", "down_blocks.0.resnets.0")


class ControlStep(torch.nn.Module):
    """`controlnet_residuals` as a module call, so that the flop counter names its submodules
    ("ControlStep.controlnet.down_blocks.0...") as it does the UNet's."""

    def __init__(self, controlnet: torch.nn.Module):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, latents, timestep, embeds, embedding):
        return controlnet_residuals(self.controlnet, latents, timestep, embeds, embedding, 1.0)


def count(fn) -> tuple[float, dict[str, float]]:
    """FLOPs of `fn()` in total and per module name (nested modules count in their parents).

    Attention runs as its math decomposition (matmuls the counter sees): the CPU's fused
    kernel has no FLOP formula and would count attention as 0 (~250 GFLOPs of a UNet call)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    per_module = {name: float(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    return float(counter.get_total_flops()), per_module


def roofline_s(root: str, module: torch.nn.Module, total: float, per_module: dict[str, float]) -> float:
    """Lower bound on one call's seconds: each weight layer takes the longer of its FLOPs at peak
    and reading its fp16 weights at peak bandwidth; FLOPs outside weight layers (attention
    scores) run at peak. Activations' traffic is left out."""
    seconds, layer_flops = 0.0, 0.0
    for name, sub in module.named_modules():
        params = list(sub.parameters(recurse=False))
        if not params or list(sub.children()):
            continue
        flops = per_module.get(f"{root}.{name}", 0.0)
        layer_flops += flops
        seconds += max(flops / PEAK_FLOPS, 2 * sum(p.numel() for p in params) / PEAK_BYTES)
    return seconds + (total - layer_flops) / PEAK_FLOPS


def shared_flops(root: str, per_module: dict[str, float]) -> float:
    return sum(per_module.get(f"{root}.{name}", 0.0) for name in SHARED_PREFIX)


def measure(device: torch.device, dtype: torch.dtype) -> dict:
    from diffusers import ControlNetModel

    model, _ = build_real(device, dtype)
    with torch.device(device):
        controlnet = ControlNetModel.from_unet(model.unet)
    controlnet = controlnet.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)  # the flop counter's module tracker hooks tensors that need grad
    controlnet.requires_grad_(False)
    step = ControlStep(controlnet)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    t = torch.tensor(999, device=device)
    latents, embeds = rand(2, 4, 64, 64), rand(2, 77, 768)
    embedding = embed_control_image(controlnet, torch.rand(1, 3, 512, 512))
    photo = Image.new("RGB", (300, 400))
    unet, unet_mods = count(lambda: model.unet(latents, t, encoder_hidden_states=embeds))
    control, control_mods = count(lambda: step(latents, t, embeds, embedding))
    control_cond_only, cond_only_mods = count(lambda: step(latents[:1], t, embeds[:1], embedding))
    embed_map, _ = count(lambda: embed_control_image(controlnet, torch.rand(1, 3, 512, 512)))
    vae, _ = count(lambda: model.vae.decode(rand(1, 4, 64, 64)))
    subject, _ = count(lambda: model.encode_prompts([f"a dog {PROMPT}"], model.encode_subject([photo], "dog")))
    negative, _ = count(lambda: model.encode_prompts([DEFAULT_NEGATIVE_PROMPT], None))
    # The map embedding's weights are read once a generation, not every step.
    step_params = sum(
        p.numel() for n, p in controlnet.named_parameters() if not n.startswith("controlnet_cond_embedding")
    )
    return {
        "unet": unet, "controlnet_step": control, "controlnet_step_cond_only": control_cond_only,
        "control_embedding": embed_map, "vae_decode": vae, "encoders": subject + negative,
        "unet_shared_prefix": shared_flops("UNet2DConditionModel", unet_mods),
        "controlnet_shared_prefix": shared_flops("ControlStep.controlnet", control_mods),
        "unet_params": sum(p.numel() for p in model.unet.parameters()), "controlnet_step_params": step_params,
        "unet_roofline_s": roofline_s("UNet2DConditionModel", model.unet, unet, unet_mods),
        "controlnet_roofline_s": roofline_s("ControlStep", step, control, control_mods),
        "controlnet_cond_only_roofline_s": roofline_s("ControlStep", step, control_cond_only, cond_only_mods),
    }


def denoiser_calls(steps: int) -> int:
    """UNet calls of one generation: PNDM's PLMS runs steps + 1 (its first step twice)."""
    scheduler = sd_scheduler()
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def summarize(c: dict, steps: int) -> dict:
    """GFLOPs per generation of plain and ControlNet generation (`steps` UNet calls), and the
    options' ratios."""
    plain = steps * c["unet"] + c["vae_decode"] + c["encoders"]
    added = steps * c["controlnet_step"] + c["control_embedding"]
    saved = steps * (c["unet_shared_prefix"] + c["controlnet_shared_prefix"]) / 2  # one row of two

    def ratio(extra: float) -> float:
        return round((plain + extra) / plain, 4)

    fixed_s = (c["vae_decode"] + c["encoders"]) / PEAK_FLOPS
    plain_s = steps * c["unet_roofline_s"] + fixed_s
    embedding = c["control_embedding"]
    # diffusers' control_guidance_end keeps the steps i with (i + 1) / steps <= end
    kept = {end: sum((i + 1) / steps <= end for i in range(steps)) for end in (0.8, 0.6, 0.5)}
    ends = {f"control_guidance_end={end}": n * c["controlnet_step"] + embedding for end, n in kept.items()}
    return {
        "plain_gflops": plain / GIGA, "controlnet_gflops": (plain + added) / GIGA, "flop_ratio": ratio(added),
        "options": {
            "exact: the ControlNet's shared prefix once for both CFG rows":
                ratio(added - steps * c["controlnet_shared_prefix"] / 2),
            "exact: both nets' shared prefix once, in ControlNet generation only": ratio(added - saved),
            "ControlNet on the conditional row only (guess mode's batching)":
                ratio(steps * c["controlnet_step_cond_only"] + embedding),
            **{name: ratio(extra) for name, extra in ends.items()},
        },
        "roofline": {
            "unet_ms": c["unet_roofline_s"] * 1e3, "controlnet_ms": c["controlnet_roofline_s"] * 1e3,
            "controlnet_cond_only_ms": c["controlnet_cond_only_roofline_s"] * 1e3,
            "ratio": round((plain_s + steps * c["controlnet_roofline_s"]) / plain_s, 4),
            "ratio_cond_only": round((plain_s + steps * c["controlnet_cond_only_roofline_s"]) / plain_s, 4),
        },
    }


def print_table(c: dict, s: dict, steps: int) -> None:
    rows = [
        ("UNet, batch 2", steps, c["unet"]), ("VAE decode, 1 image", 1, c["vae_decode"]),
        ("encoders (subject + prompt + negative)", 1, c["encoders"]),
        ("ControlNet step, batch 2", steps, c["controlnet_step"]),
        ("ControlNet map embedding", 1, c["control_embedding"]),
    ]
    print("| part | calls | GFLOPs/call | GFLOPs/generation |\n| --- | ---: | ---: | ---: |")
    for name, calls, flops in rows:
        print(f"| {name} | {calls} | {flops / GIGA:.1f} | {calls * flops / GIGA:.0f} |")
    print(f"| plain generation | | | {s['plain_gflops']:.0f} |")
    print(f"| ControlNet generation | | | {s['controlnet_gflops']:.0f} |")
    print(f"\nFLOP ratio ControlNet / plain: {s['flop_ratio']:.3f}x")
    for option, value in s["options"].items():
        print(f"  {option}: {value:.3f}x")
    print(f"shared prefix (before the first cross-attention), GFLOPs at batch 2: "
          f"UNet {c['unet_shared_prefix'] / GIGA:.1f}, ControlNet {c['controlnet_shared_prefix'] / GIGA:.1f}")
    print(f"weights read per call, fp16: UNet {2 * c['unet_params'] / GIGA:.2f} GB ({c['unet_params'] / 1e6:.0f}M), "
          f"ControlNet step {2 * c['controlnet_step_params'] / GIGA:.2f} GB ({c['controlnet_step_params'] / 1e6:.0f}M)")
    r = s["roofline"]
    print(f"roofline per call (H100 SXM, weights only): UNet {r['unet_ms']:.2f} ms, "
          f"ControlNet {r['controlnet_ms']:.2f} ms; generation ratio {r['ratio']:.3f}x; ControlNet on the "
          f"conditional row only {r['controlnet_cond_only_ms']:.2f} ms, {r['ratio_cond_only']:.3f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="meta", help="meta (shapes only) or cpu (float32)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", type=Path, help="also write the counts and ratios as JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    counts = measure(device, torch.float16 if device.type == "meta" else torch.float32)
    calls = denoiser_calls(args.steps)
    summary = summarize(counts, calls)
    print_table(counts, summary, calls)
    if args.out:
        args.out.write_text(json.dumps({"steps": args.steps, "calls": calls, "counts": counts, **summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
