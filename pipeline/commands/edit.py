"""`subjectforge edit`: put a subject in place of one object of an image, keeping the rest.

Without --image, the source image is generated from --prompt and edited in the same run; with
--image, the photo is DDIM-inverted with --prompt (which should describe it) and edited.
--replace names the prompt's word whose object the subject replaces; the edit region is where
that word's cross-attention is strong (edit.threshold), or where CLIPSeg finds --mask-prompt.

Writes `source.png`, `edited.png`, `mask.png` (white = the region that could change), for a
photo `reconstruction.png` (its inversion denoised again without the edit), and the resolved
settings (`edit.yaml`, which lists those images) to --out; a previous run's images that this one
does not write again are removed. The `generate:` section supplies steps, guidance, size, seed,
negative prompt and dtype; the `edit:` section the attention control.
"""

from __future__ import annotations

import argparse
import logging
import re
import time

import yaml

from pipeline.commands.generate import (
    SAMPLING_FLAGS,
    add_sampling_arguments,
    check_text_flags,
    previous_run,
    remove_stale_outputs,
    resolve_device,
    tokenizer_flag,
)
from pipeline.config import Config, dump_config
from pipeline.errors import UserError
from pipeline.paths import check_output_folder, folder_flag, make_output_folder, output_file

log = logging.getLogger(__name__)

_OUTPUT_NAMES = re.compile(r"(source|edited|mask|reconstruction)\.png")  # what edit writes into --out

# flag destination -> config key (pipeline.cli.flag_overrides)
FLAGS = {
    **SAMPLING_FLAGS,
    "cross_replace_steps": "edit.cross_replace_steps",
    "self_replace_steps": "edit.self_replace_steps",
    "threshold": "edit.threshold",
    "mask_threshold": "edit.mask_threshold",
    "keep_outside": "edit.keep_outside",
}


def add_arguments(parser: argparse.ArgumentParser, add_common) -> None:
    parser.add_argument("--prompt", required=True, help='the source image\'s prompt, e.g. "a dog on the grass"')
    parser.add_argument("--replace", required=True, help="the prompt's word (or words) whose object the subject replaces")
    parser.add_argument("--subject-image", nargs="+", required=True, metavar="IMG", help="reference photo(s) of the subject")
    parser.add_argument("--category", required=True, help="the subject's class, e.g. cat")
    parser.add_argument("--target-category", help="word for the subject in the edited prompt (default: --category)")
    parser.add_argument("--image", help="a photo to edit (default: generate the source from --prompt)")
    parser.add_argument("--mask-prompt", help='edit where CLIPSeg finds this (e.g. "shirt"), not where --replace attends')
    parser.add_argument("--out", required=True, type=folder_flag, help="output folder")
    parser.add_argument("--model", help="checkpoint folder or Hub id (default: the profile's blip_diffusion)")
    add_sampling_arguments(parser, steps_help="denoising (and inversion) steps", seed_help="noise of a generated source")
    parser.add_argument(
        "--qformer-tokenizer", type=tokenizer_flag, help="folder of the Q-Former's BERT tokenizer, for offline use"
    )
    control = parser.add_argument_group("attention control (config: edit.*)")
    control.add_argument("--cross-replace-steps", type=float, help="config: edit.cross_replace_steps")
    control.add_argument("--self-replace-steps", type=float, help="config: edit.self_replace_steps")
    control.add_argument("--threshold", type=float, help="config: edit.threshold")
    control.add_argument("--mask-threshold", type=float, help="config: edit.mask_threshold")
    control.add_argument("--keep-outside", action=argparse.BooleanOptionalAction, default=None, help="config: edit.keep_outside")
    add_common(parser)


def run(args: argparse.Namespace, config: Config) -> int:
    import torch

    from pipeline.model import DEFAULT_NEGATIVE_PROMPT, BlipDiffusion
    from pipeline.model.editing import edit, find_words, fit_photo, segment_mask
    from pipeline.model.image_processing import load_image

    gen, settings = config.generate, config.edit
    request = _request(args, config)
    check_output_folder(args.out)
    check_text_flags({"--prompt": args.prompt, "--replace": args.replace,
                      "--category": args.category, "--target-category": args.target_category, "--mask-prompt": args.mask_prompt},
                     nouns=("--replace", "--category", "--target-category"))
    if args.model and args.model.startswith("models:/"):
        raise UserError("edit takes a base model (folder or Hub id); registered subjects (models:/...) are not supported yet")
    device = resolve_device(args.device)
    dtype_name = gen.dtype if gen.dtype != "auto" else ("float16" if device.type == "cuda" else "float32")
    # Every input is read before the model loads, so a typo costs no loading time.
    find_words(request.prompt, args.replace)
    references = [load_image(path, i) for i, path in enumerate(args.subject_image)]
    photo = fit_photo(args.image, request.height, request.width) if args.image else None
    mask = None
    if args.mask_prompt is not None:
        if photo is None:
            raise UserError("--mask-prompt needs --image: a generated source has no photo to segment yet")
        mask = segment_mask(
            photo, args.mask_prompt, config.model_path("clipseg"), settings.mask_threshold, config.data.segment.normalize
        )
    model = BlipDiffusion.from_pretrained(
        config.model_path("blip_diffusion"),
        qformer_tokenizer=args.qformer_tokenizer,
        dtype=getattr(torch, dtype_name),
        device=device,
    )
    start = time.perf_counter()
    result = edit(
        model,
        request.prompt,
        args.replace,
        subject_images=references,
        category=args.category,
        target_category=args.target_category,
        image=photo,
        mask=mask,
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        negative_prompt=request.negative_prompt if request.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT,
        height=request.height,
        width=request.width,
        seed=request.seed,
        cross_replace_steps=settings.cross_replace_steps,
        self_replace_steps=settings.self_replace_steps,
        threshold=settings.threshold,
        keep_outside=settings.keep_outside,
    )
    elapsed = time.perf_counter() - start
    return _write(args, config, result, elapsed, device, dtype_name)


def _request(args: argparse.Namespace, config: Config):
    """The prompt and the generation settings, checked as a model server checks a request
    (pipeline/serving/requests.py, `serve.limits`)."""
    from pipeline.serving.requests import RequestError, validate_request

    gen = config.generate
    fields = {
        "prompt": args.prompt, "negative_prompt": gen.negative_prompt, "num_images": 1, "seed": gen.seed,
        "guidance_scale": gen.guidance_scale, "steps": gen.steps, "height": gen.height, "width": gen.width,
    }
    try:
        return validate_request(fields, config.serve.limits, gen)
    except RequestError as exc:
        limit = f" (the limit is serve.limits.{exc.limit})" if exc.limit else ""
        raise UserError(f"--{exc.field.replace('_', '-')}: {exc.message}{limit}") from None


def _write(args: argparse.Namespace, config: Config, result, elapsed: float, device, dtype_name: str) -> int:
    import numpy as np
    import PIL.Image

    out = make_output_folder(args.out)
    previous = previous_run(out, "edit.yaml")
    result.source.save(output_file(out / "source.png"))
    result.edited.save(output_file(out / "edited.png"))
    PIL.Image.fromarray((result.mask * 255).astype(np.uint8)).save(output_file(out / "mask.png"))
    files = ["source.png", "edited.png", "mask.png"]
    if result.reconstruction is not None:
        result.reconstruction.save(output_file(out / "reconstruction.png"))
        files.append("reconstruction.png")
    remove_stale_outputs(out, previous.get("files"), files, _OUTPUT_NAMES)
    run_info = {
        "model": config.model_path("blip_diffusion"),
        "prompt": args.prompt,
        "replace": args.replace,
        "subject_images": list(args.subject_image),
        "category": args.category,
        "target_category": args.target_category or args.category,
        "image": args.image,
        "mask_prompt": args.mask_prompt,
        "files": files,
        "edited_share": round(float(result.mask.mean()), 4),
        "device": str(device),
        "dtype": dtype_name,
        "seconds": round(elapsed, 3),
    }
    output_file(out / "edit.yaml").write_text(yaml.safe_dump({"run": run_info}, sort_keys=False) + dump_config(config))
    log.info("edited %s in %.1f s; %.0f%% of the image could change", out / "edited.png", elapsed, 100 * result.mask.mean())
    print(f"wrote {out / 'edited.png'} (source, mask and settings beside it)")
    if config.profile == "tiny":
        print("note: the tiny profile has random weights, so the images are noise; use --profile real.")
    return 0
