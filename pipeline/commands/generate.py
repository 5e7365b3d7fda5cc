"""`subjectforge generate`: images of a subject from its reference photos, category and a prompt.

Writes `image_000.png`, ... , `grid.png` and the resolved settings (`generate.yaml`, which lists
the images) to --out; a previous run's images that this one does not write again are removed.
Flags override the config's `generate:` section for this run.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from pipeline.config import MAX_CATEGORY_CHARS, Config, ConfigError, UniqueKeyLoader, check_utf8, dump_config
from pipeline.errors import UserError
from pipeline.paths import check_output_folder, folder_flag, make_output_folder, output_file

log = logging.getLogger(__name__)

_DTYPES = ("float32", "float16", "bfloat16")
_OUTPUT_NAMES = re.compile(r"image_\d{3,}\.png|grid\.png")  # what generate writes into --out

# The sampling flags `generate` and `edit` share (add_sampling_arguments): flag destination ->
# config key (pipeline.cli.flag_overrides).
SAMPLING_FLAGS = {
    "model": "models.blip_diffusion",
    "steps": "generate.steps",
    "guidance_scale": "generate.guidance_scale",
    "negative_prompt": "generate.negative_prompt",
    "height": "generate.height",
    "width": "generate.width",
    "seed": "generate.seed",
    "dtype": "generate.dtype",
}
FLAGS = {
    **SAMPLING_FLAGS,
    "control": "generate.control.kind",
    "control_image": "generate.control.image",
    "control_scale": "generate.control.scale",
    "control_start": "generate.control.start",
    "control_end": "generate.control.end",
    "controlnet": "generate.control.controlnet",
    "control_detector": "generate.control.detector",
}


def add_sampling_arguments(
    parser: argparse.ArgumentParser, steps_help: str = "denoising steps", seed_help: str = "noise seed"
) -> None:
    """--steps ... --dtype (SAMPLING_FLAGS, less --model) and --device."""
    parser.add_argument("--steps", type=int, help=f"{steps_help} (config: generate.steps)")
    parser.add_argument("--guidance-scale", type=float, help="config: generate.guidance_scale")
    parser.add_argument("--negative-prompt", help="config: generate.negative_prompt")
    parser.add_argument("--height", type=int, help="config: generate.height")
    parser.add_argument("--width", type=int, help="config: generate.width")
    parser.add_argument("--seed", type=int, help=f"{seed_help} (config: generate.seed)")
    parser.add_argument("--dtype", choices=("auto", *_DTYPES), help="config: generate.dtype")
    parser.add_argument("--device", default="auto", help="cuda, cpu, cuda:1, ... (default: cuda if available)")


def _positive_int(text: str) -> int:
    """An argparse type for a count of 1 or more (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def tokenizer_flag(text: str) -> str:
    """An argparse type for --qformer-tokenizer, a folder or a Hub id: a path to anything but a
    folder was read by transformers as a vocabulary file, and a photo's bytes ended the run in a
    tokenizers stack trace once the model had loaded."""
    if os.path.lexists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is not a folder: give the folder holding the tokenizer's vocab.txt, or a Hub id")
    return text


def add_arguments(parser: argparse.ArgumentParser, add_common) -> None:
    parser.add_argument(
        "--model",
        help="checkpoint folder, Hub id, or a fine-tuned subject models:/NAME@ALIAS (default: the profile's blip_diffusion)",
    )
    parser.add_argument(
        "--subject-image", nargs="+", metavar="IMG", help="reference photo(s) of the subject (not with a models:/ subject)"
    )
    parser.add_argument("--category", help="the subject's class, e.g. dog (not with a models:/ subject)")
    parser.add_argument(
        "--subject", action="append", metavar="SUBJECT[=WEIGHT]",
        help="a subject to mix or to name in a [slot] of the prompt (repeat it): CATEGORY:IMG,..., CATEGORY alone "
        "(--category's --subject-image photos) or a registered models:/NAME@ALIAS; WEIGHT defaults to 1",
    )
    parser.add_argument(
        "--style-image", nargs="+", metavar="IMG",
        help="stylization: reference photo(s) of the style, drawn through the subject path; the structure comes from "
        "--control canny --control-image SUBJECT_PHOTO and --category names what is drawn",
    )
    parser.add_argument("--style-category", default="style", help="the style image's class noun, e.g. flower (default: style)")
    parser.add_argument("--prompt", required=True, help='what to make, e.g. "on the beach"')
    parser.add_argument("--target-category", help="category written in the prompt (default: --category)")
    parser.add_argument("-n", "--num-images", type=int, default=1, help="images to generate (default: 1)")
    parser.add_argument("--out", required=True, type=folder_flag, help="output folder")
    add_sampling_arguments(parser)
    parser.add_argument("--batch-size", type=_positive_int, help="images per denoising batch (default: all)")
    parser.add_argument(
        "--qformer-tokenizer", type=tokenizer_flag, help="folder of the Q-Former's BERT tokenizer, for offline use"
    )
    control = parser.add_argument_group("structure control (ControlNet)")
    control.add_argument("--control", help="canny, depth, hed, map or none (config: generate.control.kind)")
    control.add_argument("--control-image", help="photo to take the map from, or the map (config: generate.control.image)")
    control.add_argument("--control-scale", type=float, help="ControlNet strength, 0 = off (config: generate.control.scale)")
    control.add_argument(
        "--control-start", type=float, help="fraction of the steps before the ControlNet steers, 0..1 (config: generate.control.start)"
    )
    control.add_argument(
        "--control-end", type=float, help="fraction of the steps after which it stops, 0..1 (config: generate.control.end)"
    )
    control.add_argument("--controlnet", help="ControlNet id or folder (config: generate.control.controlnet)")
    control.add_argument("--control-detector", help="depth/hed detector model (config: generate.control.detector)")
    add_common(parser)


def run(args: argparse.Namespace, config: Config) -> int:
    import torch

    from pipeline.model import DEFAULT_NEGATIVE_PROMPT, BlipDiffusion
    from pipeline.model.control import build_control
    from pipeline.model.image_processing import load_image
    from pipeline.model.prompts import has_subject_slots

    gen = config.generate
    request = _request(args, config)
    check_output_folder(args.out)
    check_text_flags(
        {"--prompt": args.prompt, "--category": args.category,
         "--target-category": args.target_category, "--style-category": args.style_category},
        nouns=("--target-category", "--style-category"),
    )
    for text in args.subject or ():
        parse_subject_flag(text)
    device = resolve_device(args.device)
    dtype_name = gen.dtype if gen.dtype != "auto" else ("float16" if device.type == "cuda" else "float32")
    if args.model and args.model.startswith("models:/"):
        from pipeline import tracking

        tracking.reachable_uri(config.tracking.uri)
        outputs, elapsed = _generate_registered(args, config, request, device, getattr(torch, dtype_name))
        return _write(args, config, outputs, elapsed, device, dtype_name)
    if args.style_image:
        _check_style(args, config)
    elif not args.subject and (not args.subject_image or not args.category):
        raise ConfigError("--subject-image and --category are needed unless --model is a registered subject (models:/...)")
    images = [load_image(path, i) for i, path in enumerate(args.style_image or args.subject_image or [])]
    model = BlipDiffusion.from_pretrained(
        config.model_path("blip_diffusion"),
        qformer_tokenizer=args.qformer_tokenizer,
        dtype=getattr(torch, dtype_name),
        device=device,
    )
    control = None if gen.control.kind == "none" else build_control(
        gen.control, gen.control.controlnet_path(config.profile), model.image_processor,
        request.height, request.width, dtype=model.dtype, device=device, local_files_only=False,
    )
    category, target = args.category, args.target_category
    if args.style_image:  # LAVIS's stylization: the style is the subject, the prompt names --category
        category, target = args.style_category, args.category
    mixed, category, subjects = _subjects(args, config, model, images, category, has_subject_slots(request.prompt))
    start = time.perf_counter()
    outputs = model.generate(
        request.prompt,
        subject_images=None if mixed is not None or subjects is not None else images,
        subject_embeds=mixed,
        subjects=subjects,
        category=category,
        target_category=target,
        num_images=request.num_images,
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        negative_prompt=request.negative_prompt if request.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT,
        height=request.height,
        width=request.width,
        seed=request.seed,
        batch_size=args.batch_size,
        control=control,
    )
    elapsed = time.perf_counter() - start
    return _write(args, config, outputs, elapsed, device, dtype_name)


# The device types generate and edit draw on: torch also reads meta, xpu, hip, lazy, ...,
# which holds no data or is not in this build, and failed deep inside the model.
_DRAWING_DEVICES = ("cpu", "cuda", "mps")


def resolve_device(text: str):
    """--device as a torch.device ("auto": cuda when there is a GPU, else cpu); UserError for a
    name torch does not read, a type outside _DRAWING_DEVICES, or a CUDA or MPS device this
    machine does not have."""
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise UserError(f"--device {text!r}: not a device ({exc})") from None
    if device.type not in _DRAWING_DEVICES:
        raise UserError(f"--device {text!r}: not a device to draw on (cpu, cuda, cuda:N or mps)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {text!r}: no such CUDA device (this machine has {torch.cuda.device_count()})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {text!r}: this machine has no MPS device")
    return device


# Class nouns of generate and edit, held to the server's limit on a request's category.
_CATEGORY_FLAGS = ("--category", "--target-category", "--style-category", "--subject")


def check_text_flags(texts: dict[str, str | None], nouns: tuple[str, ...] = ()) -> None:
    """UserError naming the flag of a text that is not UTF-8 (config.check_utf8), of a word
    in `nouns` (a class noun, edit's --replace) that is blank, or of a class noun longer than
    MAX_CATEGORY_CHARS; refused here, before the model loads, not inside it."""
    for flag, text in texts.items():
        if text is None:
            continue
        check_utf8(text, flag)
        if flag in nouns and not text.strip():
            raise UserError(f"{flag}: must not be empty")
        if flag in _CATEGORY_FLAGS and len(text) > MAX_CATEGORY_CHARS:
            raise UserError(f"{flag}: a class noun of at most {MAX_CATEGORY_CHARS} characters, got {len(text)}")


def _check_style(args: argparse.Namespace, config: Config) -> None:
    """Stylization takes its subject from the style photo and its structure from a control map."""
    if args.subject_image or args.subject:
        raise ConfigError("--style-image is the subject of a stylization: leave out --subject-image and --subject")
    if not args.category:
        raise ConfigError("--style-image needs --category: the class noun of what is drawn, e.g. teapot")
    if config.generate.control.kind == "none":
        raise ConfigError("--style-image needs --control (e.g. canny) with --control-image, the photo whose structure is drawn")


def _subjects(args: argparse.Namespace, config: Config, model, images: list, category: str | None, slotted: bool):
    """What the prompt draws: (mixed (1, Q, D) or None, the category, {slot name: (1, Q, D)} or None).

    Without [slots] in the prompt the --subject entries mix into one subject; with slots, the
    entries of each category mix into that category's slot, and --subject-image/--category
    alone fill the slot named by the category.
    """
    from pipeline.model.blip_diffusion import mix_subjects
    from pipeline.serving.subjects import WEIGHTS_RULE, weights_add_up

    if not args.subject:
        if slotted:
            return None, category, {category: model.encode_subject(images, category)}
        return None, category, None
    entries = [_subject_entry(text, args, config, model) for text in args.subject]
    groups: dict[str, list] = {}
    for name, embeds, weight in entries:
        groups.setdefault(name if slotted else "", []).append((embeds, weight))
    for name, group in groups.items():
        # The server's rule (serving.subjects.weights_add_up): a sum of inf weighed every part 0,
        # and a part far past the sum scaled its subject to inf; both drew a black image.
        if not weights_add_up([w for _, w in group]):
            slot = f" of [{name}]" if name else ""
            raise UserError(f"--subject: the weights{slot} {WEIGHTS_RULE}, got {[w for _, w in group]}")
    try:
        mixed = {name: mix_subjects([e for e, _ in group], [w for _, w in group]) for name, group in groups.items()}
    except ValueError as exc:
        raise UserError(f"--subject: {exc}") from None
    if slotted:
        return None, category, mixed
    return mixed[""], category or entries[0][0], None


def _subject_entry(text: str, args: argparse.Namespace, config: Config, model):
    """One --subject SUBJECT[=WEIGHT] as (its category, its embeddings (1, Q, D), its weight)."""
    from pipeline.model.image_processing import load_image

    category, photos, weight = parse_subject_flag(text)
    if category.startswith("models:/"):
        category, embeds = _registered_embeds(category, config)
        return category, embeds, weight
    if not photos and (category != args.category or not args.subject_image):
        raise ConfigError(f"--subject {text!r}: give its photos (CATEGORY:IMG,...) or --category {category} with --subject-image")
    paths = photos.split(",") if photos else args.subject_image
    return category, model.encode_subject([load_image(p, i) for i, p in enumerate(paths)], category), weight


def parse_subject_flag(text: str) -> tuple[str, str, float]:
    """One --subject SUBJECT[=WEIGHT] as (its category or models:/ URI, its photos' text, its
    weight), with the checks that need no model: a number for a weight, and a class noun as
    --category takes it (check_text_flags)."""
    spec, sep, weight_text = text.rpartition("=")
    if not sep:
        spec, weight_text = text, "1"
    try:
        weight = float(weight_text)
    except ValueError:
        raise UserError(f"--subject {text[:80]!r}: the weight {weight_text[:80]!r} is not a number") from None
    if spec.startswith("models:/"):
        return spec, "", weight
    category, _, photos = spec.partition(":")
    if not category.strip():
        raise ConfigError(f"--subject {text[:80]!r}: expected CATEGORY[:IMG,...][=WEIGHT] or models:/NAME@ALIAS[=WEIGHT], e.g. dog=0.7")
    check_text_flags({"--subject": category})
    return category, photos, weight


def _registered_embeds(model_uri: str, config: Config):
    """(category, subject embeddings (1, Q, D)) of a registered subject, for a mix or a slot.
    Only its embeddings take part: a LoRA or blipd subject's UNet weights are not applied."""
    from safetensors.torch import load_file

    from pipeline import tracking
    from pipeline.model.subject import EMBEDS_FILE, SubjectSpec

    folder = tracking.subject_folder(tracking.reachable_uri(config.tracking.uri), model_uri)
    spec = SubjectSpec.read(folder)
    if not spec.traits.embeds or spec.ti_property is not None:
        what = "a learned word [S], not subject embeddings" if spec.ti_property is not None else "no subject embeddings"
        raise ConfigError(f"--subject {model_uri}: a {spec.method} subject has {what} to mix; draw it alone with --model")
    if spec.traits.unet != "base":
        log.warning("--subject %s: a %s subject mixes by its embeddings only; its fine-tuned UNet is not applied", model_uri, spec.method)
    return spec.category, load_file(str(folder / EMBEDS_FILE))["subject_embeds"]


def _request(args: argparse.Namespace, config: Config):
    """This run's prompt and settings as a GenerationRequest: the checks and `serve.limits` a
    model server applies (pipeline/serving/requests.py). A registered subject draws at its
    training resolution unless --height/--width are given."""
    from pipeline.serving.requests import RequestError, validate_request

    gen = config.generate
    registered = bool(args.model and args.model.startswith("models:/"))
    fields = {
        "prompt": args.prompt, "negative_prompt": gen.negative_prompt, "num_images": args.num_images, "seed": gen.seed,
        "guidance_scale": gen.guidance_scale, "steps": gen.steps,
        "height": args.height if registered else gen.height, "width": args.width if registered else gen.width,
    }
    try:
        return validate_request(fields, config.serve.limits, gen)
    except RequestError as exc:
        flag = "-n" if exc.field == "num_images" else f"--{exc.field.replace('_', '-')}"
        limit = f" (the limit is serve.limits.{exc.limit})" if exc.limit else ""
        raise UserError(f"{flag}: {exc.message}{limit}") from None


def _generate_registered(args: argparse.Namespace, config: Config, request, device, dtype) -> tuple[list, float]:
    """Images of a fine-tuned subject from the registry (the base it names, plus its files)."""
    from pipeline import tracking
    from pipeline.model.subject import SubjectModel

    if args.subject_image:
        raise ConfigError("--subject-image is not used with a registered subject: the subject is in the model")
    if config.generate.control.kind != "none":
        raise ConfigError("--control is not available with a registered subject (models:/...) yet; use --subject-image")
    folder = tracking.subject_folder(tracking.resolve_tracking_uri(config.tracking.uri), args.model)
    subject = SubjectModel.load(folder, _registered_base(folder, config), dtype=dtype, device=device)
    start = time.perf_counter()
    outputs = subject.generate(**asdict(request))
    return outputs, time.perf_counter() - start


def _registered_base(folder: Path, config: Config) -> str | None:
    """The subject's base as a local folder when it is itself a registry URI, else None (its own reference)."""
    from pipeline import tracking
    from pipeline.model.subject import SubjectSpec

    base = SubjectSpec.read(folder).base
    return str(tracking.download_model(tracking.resolve_tracking_uri(config.tracking.uri), base)) if base.startswith("models:/") else None


def _write(args: argparse.Namespace, config: Config, outputs: list, elapsed: float, device, dtype_name: str) -> int:
    out = Path(args.out)
    # The size the images were drawn at: a registered subject's training resolution unless
    # --height/--width were given, so generate.yaml reproduces the run as it was.
    width, height = outputs[0].size
    config = config.model_copy(update={"generate": config.generate.model_copy(update={"height": height, "width": width})})
    make_output_folder(out)
    previous = previous_run(out, "generate.yaml")
    paths = []
    for i, image in enumerate(outputs):
        paths.append(output_file(out / f"image_{i:03d}.png"))
        image.save(paths[-1])
    make_grid(outputs).save(output_file(out / "grid.png"))
    files = [p.name for p in paths] + ["grid.png"]
    remove_stale_outputs(out, previous.get("files"), files, _OUTPUT_NAMES)
    run_info = {
        "model": config.model_path("blip_diffusion"),
        "subject_images": [str(p) for p in args.subject_image or []],
        "style_images": [str(p) for p in args.style_image or []],
        "subjects": args.subject or [],
        "category": args.category,
        "target_category": args.target_category or args.category,
        "prompt": args.prompt,
        "num_images": args.num_images,
        "files": files,
        "device": str(device),
        "dtype": dtype_name,
        "seconds": round(elapsed, 3),
    }
    output_file(out / "generate.yaml").write_text(yaml.safe_dump({"run": run_info}, sort_keys=False) + dump_config(config))
    log.info("wrote %d images and grid.png to %s in %.1f s", len(paths), out, elapsed)
    print(f"wrote {len(paths)} image(s) and {out / 'grid.png'}")
    if config.profile == "tiny" and getattr(args, "_profile_note", True):
        print("note: the tiny profile has random weights, so the images are noise; use --profile real.")
    return 0


def previous_run(out: Path, record: str) -> dict:
    """The `run:` section of the record (generate.yaml, edit.yaml) a previous run left in `out`;
    {} when there is none or it cannot be read, so nothing of it is removed. A link is not read
    (output_file replaces it); UserError for anything else there that is not a regular file:
    reading a FIFO would wait for a writer forever."""
    path = out / record
    if path.is_symlink() or not path.exists():
        return {}
    if not path.is_file():
        raise UserError(f"{path} is not a regular file: remove it or choose another --out")
    try:
        # The config's loader: a record whose aliases expand to 10**8 file names (a few lines of
        # anchors) kept remove_stale_outputs busy for minutes.
        run = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader).get("run")
    except (OSError, ValueError, yaml.YAMLError, AttributeError, RecursionError):
        return {}
    return run if isinstance(run, dict) else {}


def remove_stale_outputs(out: Path, listed: object, written: list[str], names: re.Pattern) -> None:
    """Delete the files of `listed` (the previous run's `files`) that this run did not write
    again, so `out` holds one run's images beside its record. Only plain names that `names`
    matches in full (what the command writes) go: a hand-edited record cannot delete anything
    else, nor a folder."""
    if not isinstance(listed, list):
        return
    for name in listed:
        path = out / str(name)
        if name not in written and names.fullmatch(str(name)) and (path.is_file() or path.is_symlink()):
            path.unlink()


def make_grid(images: list, columns: int | None = None):
    """Tile equally sized PIL images row-major into one image (about square by default)."""
    import PIL.Image

    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = PIL.Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid
