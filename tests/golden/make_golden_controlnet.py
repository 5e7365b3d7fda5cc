"""Record diffusers' ``BlipDiffusionControlNetPipeline`` on the tiny checkpoint plus a tiny ControlNet.

Runs in the same throwaway venv as ``make_golden.py`` (diffusers 0.33.1, transformers 4.51.3,
CPU torch), after it, from the repo root:

    /tmp/golden-venv/bin/python tests/golden/make_golden_controlnet.py

It reads ``tiny-blipdiffusion/`` (written by make_golden.py, left unchanged) and writes, in this
folder:

- ``tiny-controlnet/``: a ControlNet made from the tiny UNet with ``ControlNetModel.from_unet``,
  its zero-initialised layers given seeded random values (diffusers layout, safetensors);
- ``control.png``: a procedural 48x40 control map, deliberately not the output size, so the
  reference's resize is part of what is recorded;
- ``golden_controlnet.safetensors`` / ``golden_controlnet.json``: the tensors, the inputs, and
  for every tensor the call that produced it.

Everything is recorded from reloaded copies, as the parity test loads them.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys

import diffusers
import make_golden as base  # noqa: E402  (this folder; sets the HF offline variables first)
import numpy as np
import torch
import transformers
from diffusers import ControlNetModel, PNDMScheduler
from diffusers.pipelines.controlnet.pipeline_controlnet_blip_diffusion import (
    BlipDiffusionControlNetPipeline,
)
from PIL import Image, ImageDraw
from safetensors.torch import save_file

GOLDEN_DIR = base.GOLDEN_DIR
CONTROLNET_DIR = GOLDEN_DIR / "tiny-controlnet"
CONTROL_IMAGE = GOLDEN_DIR / "control.png"
CONTROL_SIZE_WH = (48, 40)
# One strided conv: the tiny UNet's latents are 1/2 of the image (SD 1.5's are 1/8, three convs).
CONDITIONING_CHANNELS = (8, 16)


def make_control_image() -> Image.Image:
    """A canny-like map: white lines (a box, a diagonal, a circle) and a grey bar on black."""
    image = Image.new("RGB", CONTROL_SIZE_WH, "black")
    draw = ImageDraw.Draw(image)
    draw.rectangle((6, 5, 30, 27), outline=(255, 255, 255))
    draw.line((0, 39, 47, 0), fill=(255, 255, 255))
    draw.ellipse((26, 14, 44, 34), outline=(255, 255, 255))
    draw.rectangle((2, 32, 20, 35), fill=(128, 128, 128))
    return image


def build_controlnet(pipe) -> ControlNetModel:
    """ControlNet copied from the UNet; its zero convs and conditioning output get random values."""
    generator = torch.Generator().manual_seed(base.SEED + 1)
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS)
    zero_initialised = ("controlnet_cond_embedding.conv_out", "controlnet_down_blocks", "controlnet_mid_block")
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(zero_initialised):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return controlnet


@torch.no_grad()
def record(pipe: BlipDiffusionControlNetPipeline, reference: Image.Image, control: Image.Image, rec) -> None:
    g = base.GUIDANCE_SCALE
    control_image = rec.add(
        "control_image",
        pipe.prepare_control_image(
            control, base.WIDTH, base.HEIGHT, 1, 1, torch.device("cpu"), torch.float32, do_classifier_free_guidance=False
        ),
        "control map after the reference's preprocessing: RGB, PIL bicubic resize 48x40 -> 32x32, * 1/255, "
        "no normalisation, no crop, NCHW in [0, 1]",
        "pipe.prepare_control_image(control.png, 32, 32, 1, 1, cpu, float32, do_classifier_free_guidance=False)",
    )
    pixel_values = pipe.image_processor.preprocess(
        reference, image_mean=pipe.config.mean, image_std=pipe.config.std, return_tensors="pt"
    )["pixel_values"]
    subject = pipe.get_query_embeddings(pixel_values, [base.CATEGORY])
    built = pipe._build_prompt([base.PROMPT], [base.CATEGORY], base.PROMPT_STRENGTH, base.PROMPT_REPS)
    cond = rec.add("cond_embeds", pipe.encode_prompt(subject, built), "prompt states with the subject", "pipe.encode_prompt")
    uncond_ids = pipe.tokenizer([base.NEG_PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    uncond = rec.add(
        "uncond_embeds", pipe.text_encoder(input_ids=uncond_ids, ctx_embeddings=None)[0], "negative prompt states", "text_encoder"
    )
    embeds = torch.cat([uncond, cond])
    shape = (1, pipe.unet.config.in_channels, base.HEIGHT // 2, base.WIDTH // 2)
    init = rec.add(
        "init_latents",
        torch.randn(shape, generator=torch.Generator("cpu").manual_seed(base.SEED), dtype=torch.float32),
        "initial noise (as make_golden.py)",
        f"torch.randn({shape}, generator=torch.Generator('cpu').manual_seed({base.SEED}))",
    )
    scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(base.NUM_INFERENCE_STEPS)
    rec.add("timesteps", scheduler.timesteps, "PNDM timesteps for 3 steps", "scheduler.timesteps")

    t0 = scheduler.timesteps[0]
    latents2 = torch.cat([init] * 2)
    cond_image2 = torch.cat([control_image] * 2)
    for scale, suffix in ((1.0, ""), (0.5, "_half")):
        down, mid = pipe.controlnet(
            latents2, t0, encoder_hidden_states=embeds, controlnet_cond=cond_image2, conditioning_scale=scale, return_dict=False
        )
        for i, residual in enumerate(down):
            rec.add(
                f"controlnet_down_{i}{suffix}",
                residual,
                f"ControlNet down-block residual {i} at t = timesteps[0], conditioning_scale {scale}",
                f"pipe.controlnet(cat([init_latents] * 2), timesteps[0], cat([uncond, cond]), cat([control_image] * 2), "
                f"conditioning_scale={scale}, return_dict=False)[0][{i}]",
            )
        rec.add(f"controlnet_mid{suffix}", mid, f"ControlNet mid-block residual, conditioning_scale {scale}", "...[1]")
        if suffix == "":
            rec.add(
                "unet_noise_pred",
                pipe.unet(
                    latents2,
                    t0,
                    encoder_hidden_states=embeds,
                    down_block_additional_residuals=down,
                    mid_block_additional_residual=mid,
                ).sample,
                "one UNet call with the scale-1 residuals added",
                "pipe.unet(cat([init_latents] * 2), timesteps[0], cat([uncond, cond]), "
                "down_block_additional_residuals=controlnet_down_*, mid_block_additional_residual=controlnet_mid).sample",
            )

    # The denoising loop of BlipDiffusionControlNetPipeline.__call__, step by step.
    latents = init * scheduler.init_noise_sigma
    step_noise, step_latents = [], []
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2)
        down, mid = pipe.controlnet(model_input, t, encoder_hidden_states=embeds, controlnet_cond=cond_image2, return_dict=False)
        noise_uncond, noise_text = pipe.unet(
            model_input,
            timestep=t,
            encoder_hidden_states=embeds,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample.chunk(2)
        noise = noise_uncond + g * (noise_text - noise_uncond)
        latents = scheduler.step(noise, t, latents).prev_sample
        step_noise.append(noise)
        step_latents.append(latents)
    rec.add("step_guided_noise_pred", torch.stack(step_noise), "per timestep: guided noise fed to scheduler.step", "loop")
    rec.add("step_latents", torch.stack(step_latents), "per timestep: scheduler.step(...).prev_sample", "loop")
    decoded = rec.add(
        "vae_decoded",
        pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0],
        "VAE decoder output before postprocess",
        "pipe.vae.decode(step_latents[-1] / scaling_factor)",
    )
    image = rec.add(
        "image",
        pipe(
            base.PROMPT,
            reference,
            control,
            base.CATEGORY,
            base.CATEGORY,
            guidance_scale=g,
            height=base.HEIGHT,
            width=base.WIDTH,
            num_inference_steps=base.NUM_INFERENCE_STEPS,
            generator=torch.Generator("cpu").manual_seed(base.SEED),
            neg_prompt=base.NEG_PROMPT,
            prompt_strength=base.PROMPT_STRENGTH,
            prompt_reps=base.PROMPT_REPS,
            output_type="np",
        ).images,
        "the pipeline's 3-step ControlNet generation, NHWC in [0, 1]",
        "BlipDiffusionControlNetPipeline(...)(prompt, reference.png, control.png, 'dog', 'dog', guidance_scale=7.5, "
        "height=32, width=32, num_inference_steps=3, generator=manual_seed(0), output_type='np').images",
    )
    # The hand-written loop above must reproduce the pipeline call exactly.
    torch.testing.assert_close(image, (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), rtol=0, atol=1e-6)


def main() -> None:
    torch.manual_seed(base.SEED)
    torch.use_deterministic_algorithms(True)
    with base._working_directory(base.CHECKPOINT_DIR):
        blip = base._LoadablePipeline.from_pretrained(base.CHECKPOINT_DIR, torch_dtype=torch.float32)
    if CONTROLNET_DIR.exists():
        shutil.rmtree(CONTROLNET_DIR)
    build_controlnet(blip).save_pretrained(CONTROLNET_DIR, safe_serialization=True)
    make_control_image().save(CONTROL_IMAGE)

    pipe = BlipDiffusionControlNetPipeline(
        tokenizer=blip.tokenizer,
        text_encoder=blip.text_encoder,
        vae=blip.vae,
        unet=blip.unet,
        scheduler=blip.scheduler,
        qformer=blip.qformer,
        controlnet=ControlNetModel.from_pretrained(CONTROLNET_DIR, torch_dtype=torch.float32),
        image_processor=blip.image_processor,
        ctx_begin_pos=blip.config.ctx_begin_pos,
        mean=blip.config.mean,
        std=blip.config.std,
    )
    pipe.set_progress_bar_config(disable=True)
    rec = base._Recorder()
    reference = Image.open(GOLDEN_DIR / "reference.png").convert("RGB")
    record(pipe, reference, Image.open(CONTROL_IMAGE).convert("RGB"), rec)

    save_file(rec.tensors, GOLDEN_DIR / "golden_controlnet.safetensors")
    golden = {
        "generated_by": "tests/golden/make_golden_controlnet.py (not run by CI)",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
        },
        "checkpoint": "tests/golden/tiny-blipdiffusion",
        "controlnet": "tests/golden/tiny-controlnet",
        "inputs": {
            "reference_image": "tests/golden/reference.png",
            "control_image": {"path": "tests/golden/control.png", "size_wh": list(CONTROL_SIZE_WH), "sha256": base._sha256(CONTROL_IMAGE)},
            "prompt": base.PROMPT,
            "source_subject_category": base.CATEGORY,
            "target_subject_category": base.CATEGORY,
            "neg_prompt": base.NEG_PROMPT,
            "seed": base.SEED,
            "guidance_scale": base.GUIDANCE_SCALE,
            "num_inference_steps": base.NUM_INFERENCE_STEPS,
            "height": base.HEIGHT,
            "width": base.WIDTH,
            "prompt_strength": base.PROMPT_STRENGTH,
            "prompt_reps": base.PROMPT_REPS,
            "conditioning_scale": 1.0,
        },
        "tensors": rec.meta,
    }
    (GOLDEN_DIR / "golden_controlnet.json").write_text(json.dumps(golden, indent=2, default=str) + "\n")
    print(f"wrote {len(rec.tensors)} tensors", file=sys.stderr)


if __name__ == "__main__":
    main()
