"""Typed configuration: the one source of defaults.

A config is built in three layers, later ones winning: the defaults declared on the models
below, an optional YAML file, then ``--set dotted.key=value`` overrides from the command line.
Everything is validated once, before any worker starts, and unknown keys are errors that name
the key (``extra="forbid"``).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from pipeline.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"
CONFIGS_DIR = PACKAGE_DIR / "configs"
# The bundled sample lives beside the packages in a clone (datasets/ is data, not a package).
REPO_DIR = PACKAGE_DIR.parent
BUNDLED_DATASETS_DIR = REPO_DIR / "datasets"

Profile = Literal["tiny", "real"]

# A count of actors or photos that may be left to the cluster: "auto" is resolved against its GPUs.
CountOrAuto = Annotated[int, Field(ge=1)] | Literal["auto"]


def whole_gpus(cluster_gpus: float) -> int:
    """GPUs to place per-GPU actors on: a fraction of one counts as one, none as 0."""
    return max(1, int(cluster_gpus)) if cluster_gpus > 0 else 0


def check_name(value: str) -> str:
    """`value` if it may name a subject, a run or a registered model; ValueError otherwise.

    Each such name becomes one folder under an output root (<finetune.out>/<subject_id>-<method>,
    <storage_path>/<run_name>) or one segment of models:/NAME/VERSION, so it must be a plain
    folder name: a '/' or '..' would reach outside the root, and an absolute id replaces it. A
    registered name holds no ':' (MLflow refuses it, which a fine-tune met only after training),
    and a control character (a line break, a tab) does not belong in a folder or a log line.
    """
    if not value or "/" in value or ":" in value or value in (".", "..") or any(unicodedata.category(c) == "Cc" for c in value):
        why = "; MLflow's registry refuses ':' in a model name" if ":" in value else ""
        raise ValueError(f"{value!r} must be a plain folder name (not empty, no '/', ':' or control character, not '.' or '..'){why}")
    return value


# A subject id, run name or registered model name (subjects.csv ids follow the same rule).
Name = Annotated[str, AfterValidator(check_name)]


def _once_each(names: list[str]) -> list[str]:
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{', '.join(twice)} named more than once")
    return names


# A list of ids each named once: a subject listed twice was trained twice at once.
UniqueNames = Annotated[list[Name], AfterValidator(_once_each)]


# What MLflow's registry accepts as an alias (mlflow.utils.validation _validate_model_alias_name);
# declared here so a config field is refused at load, before the work that would end in
# set_alias, and reused by pipeline/tracking.py for every registry lookup.
_ALIAS_RE = re.compile(r"[\w-]+")  # \w as Python reads it: letters and digits of any script, '_'
MAX_ALIAS_CHARS = 255


def check_alias(alias: str) -> str:
    """`alias` if the registry accepts it as an alias name; ValueError saying why otherwise."""
    if not _ALIAS_RE.fullmatch(alias) or len(alias) > MAX_ALIAS_CHARS:
        raise ValueError(
            f"{alias[:80]!r} is not an alias name: an MLflow alias is 1..{MAX_ALIAS_CHARS} letters, digits, '_' or '-'"
        )
    return alias


# Aliases MLflow keeps for itself and refuses to set (_validate_model_alias_name_reserved):
# "latest" in any case, and version-like names ("v3").
_RESERVED_ALIAS_RE = re.compile(r"latest|[vV]\d+", re.IGNORECASE)


def check_new_alias(alias: str) -> str:
    """`alias` if the registry accepts setting it (check_alias, and not a reserved name)."""
    check_alias(alias)
    if _RESERVED_ALIAS_RE.fullmatch(alias):
        raise ValueError(f"{alias!r} is reserved by MLflow's registry ('latest' and v<number> cannot be set as aliases)")
    return alias


# The alias a command sets on a registered version (finetune.alias).
Alias = Annotated[str, AfterValidator(check_new_alias)]


# The longest class noun ("dog", "teapot") a request or a command flag may give; CLIP reads only
# a few words of it (pipeline/serving/subjects.py and pipeline/commands/generate.py check it).
MAX_CATEGORY_CHARS = 100


_T = TypeVar("_T")


@dataclass(frozen=True)
class _NotIdentity:
    """Field metadata: identities (the data build's processing digest, the fine-tune key) leave
    the field out. Every field without it counts, so a new setting changes them by default."""

    kind: str


# Where, how fast and on what the work runs, and where its results and logs go; never what it
# produces (resources, actor counts, inference batch sizes, paths, tracking, logging).
Runtime = Annotated[_T, _NotIdentity("runtime")]
# What the work reads, named by a path, model id or selection: an identity records it resolved
# instead (the photos' and backgrounds' digests, the base model's pinned version, the category).
Input = Annotated[_T, _NotIdentity("input")]


def field_identity(field: FieldInfo) -> str:
    """How a field counts in identities: "runtime", "input" or, unmarked, "identity"."""
    marks = [mark.kind for mark in field.metadata if isinstance(mark, _NotIdentity)]
    return marks[0] if marks else "identity"


def identity_settings(model: BaseModel) -> dict[str, Any]:
    """`model`'s settings as JSON values, less the fields marked Runtime or Input, in nested
    sections too; a section left with no setting is dropped."""
    tree = model.model_dump(mode="json")
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if field_identity(field) != "identity":
            del tree[name]
        elif isinstance(value, BaseModel):
            tree[name] = identity_settings(value)
            if not tree[name]:
                del tree[name]
    return tree

# Where each model comes from under each profile. `tiny` points at checkpoints shipped in the
# package (small configs, random weights, real tokenizer/processor files) so tests and the demo
# exercise exactly the `from_pretrained` path that loads the real ids.
PROFILE_MODELS: dict[str, dict[str, str]] = {
    "tiny": {
        "clipseg": str(ASSETS_DIR / "tiny-clipseg"),
        "blip_diffusion": str(ASSETS_DIR / "tiny-blipdiffusion"),
        "dino": str(ASSETS_DIR / "tiny-dino"),
        "clip": str(ASSETS_DIR / "tiny-clip"),
        "captioner": str(ASSETS_DIR / "tiny-captioner"),
    },
    "real": {
        "clipseg": "CIDAS/clipseg-rd64-refined",
        "blip_diffusion": "Salesforce/blipdiffusion",
        "dino": "facebook/dino-vits16",
        "clip": "openai/clip-vit-base-patch32",
        # The paper captioned with BLIP-2 OPT-6.7B; the 2.7B one is half the memory and time.
        "captioner": "Salesforce/blip2-opt-2.7b",
    },
}


# Settings each profile layers under the user's own. A random-weight CLIPSeg's map is speckle
# with no notion of the subject: per-photo min-max scaling and no erosion still give trimaps
# with all three regions, so the tiny profile runs matting end to end (its mattes are noise).
PROFILE_SETTINGS: dict[str, dict[str, Any]] = {
    # Tiny models train at 64 px: the tiny UNet attends at full latent size, and at 512 px
    # (4,096 tokens, head dim 8) one CPU step takes minutes in torch's attention backward.
    # Its CLIPSeg's raw scores for data.filter.exclude_prompts and data.backgrounds.reject_prompts
    # would reject photos at random (about half of every photo reads as 'person'), and its
    # captioner's random text needs no more than a few tokens.
    "tiny": {
        "data": {
            "segment": {"normalize": "minmax"},
            "trimap": {"erode_fg_px": 0, "erode_bg_px": 0},
            "filter": {"exclude_prompts": []},
            "backgrounds": {"reject_prompts": []},
            "caption": {"max_new_tokens": 8},
        },
        "train": {"resolution": 64},
    },
    "real": {},
}


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the offending key."""


class _Strict(BaseModel):
    # allow_inf_nan=False: no setting means infinity or NaN, and a bound such as gt=0 lets
    # inf through (train.lr=inf trained every weight to NaN).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)


class ModelsConfig(_Strict):
    """Model ids or local paths; ``None`` takes the profile's default (see PROFILE_MODELS)."""

    clipseg: Input[str | None] = None
    blip_diffusion: Input[str | None] = None
    dino: Input[str | None] = Field(None, description="DINO ViT-S/16 of the DINO score (evaluate)")
    clip: Input[str | None] = Field(None, description="CLIP ViT-B/32 of the CLIP-I and CLIP-T scores (evaluate)")
    captioner: Input[str | None] = Field(
        None, description="image captioner of the data build's caption stage (transformers image-text-to-text: BLIP-2, BLIP)"
    )


class DecodeConfig(_Strict):
    size: int = Field(512, ge=32, le=4096, description="short side after resizing, px")
    min_side: int = Field(32, ge=1, description="reject photos whose short side is smaller, px")
    max_pixels: int = Field(
        60_000_000, ge=1, description="reject photos whose header claims more pixels (bombs); PIL refuses above 179 MP regardless"
    )
    max_bytes: int = Field(64 * 2**20, ge=1, description="reject files larger than this")
    max_aspect: float = Field(4.0, ge=1.0, description="reject photos with a longer/shorter ratio above this")


SEGMENT_ACTORS_PER_GPU = 3
SEGMENT_BATCH_GPU = 32
SEGMENT_BATCH_CPU = 8


class SegmentConfig(_Strict):
    prompt_template: str = Field("{category}", description="CLIPSeg text prompt; {category} is filled in")
    # CLIPSeg and the trimaps took ~2.5 actors' time at the ~200 photos/s a GPU's matting
    # actors build (BENCHMARKS.md, "Matting actors per GPU"): one actor per GPU would starve them.
    batch_size: Runtime[CountOrAuto] = Field(
        "auto", description=f"photos per CLIPSeg forward; auto = {SEGMENT_BATCH_GPU} with GPUs, {SEGMENT_BATCH_CPU} without"
    )
    num_actors: Runtime[CountOrAuto] = Field(
        "auto", description=f"CLIPSeg actor pool size; auto = {SEGMENT_ACTORS_PER_GPU} per GPU, 1 without GPUs"
    )
    num_gpus: Runtime[float | Literal["auto"]] = Field(
        "auto",
        description="GPUs per CLIPSeg actor; auto = what GPU matting leaves, shared by the CLIPSeg actors (at most 1 each), 0 without GPUs",
    )
    # CLIPSeg's sigmoid is calibrated per prompt; `minmax` rescales each map to [0, 1], which
    # finds *a* foreground in every photo (so it cannot reject subject-less photos).
    normalize: Literal["none", "minmax"] = "none"

    @model_validator(mode="after")
    def _check_template(self) -> SegmentConfig:
        if "{category}" not in self.prompt_template:
            raise ValueError("prompt_template must contain '{category}'")
        return self

    def resolved(self, cluster_gpus: float) -> tuple[int, int]:
        """(num_actors, batch_size) on a cluster with `cluster_gpus` GPUs."""
        gpus = whole_gpus(cluster_gpus)
        actors = self.num_actors if self.num_actors != "auto" else max(1, SEGMENT_ACTORS_PER_GPU * gpus)
        batch = self.batch_size if self.batch_size != "auto" else (SEGMENT_BATCH_GPU if gpus else SEGMENT_BATCH_CPU)
        return actors, batch


class TrimapConfig(_Strict):
    high: float = Field(0.5, ge=0.0, le=1.0, description="confidence >= high is foreground")
    low: float = Field(0.2, ge=0.0, le=1.0, description="confidence <= low is background")
    erode_fg_px: int = Field(3, ge=0, description="shrink the foreground region by this many px (at decode size)")
    erode_bg_px: int = Field(6, ge=0, description="shrink the background region by this many px")

    @model_validator(mode="after")
    def _check_order(self) -> TrimapConfig:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


MATTE_ACTORS_PER_GPU = 3


class MatteConfig(_Strict):
    backend: Literal["auto", "pymatting", "torch"] = Field(
        "auto", description="closed-form matting solver; auto = torch where there is a GPU, else pymatting"
    )
    concurrency: Runtime[int | None] = Field(
        None, ge=1, description="parallel CPU matting tasks (one photo each); None = one per CPU Ray gives the stage"
    )
    num_gpus: Runtime[float] = Field(
        0.2, gt=0.0, lt=1.0, description="GPU share of each torch matting actor on a GPU cluster; CLIPSeg's auto share takes the rest"
    )
    # One actor left the GPU idle while it copied its rows out (~4 MB a photo through Ray's
    # object store): on an H100 node 1, 2 and 3 actors built 106, 177 and 200 photos/s
    # (BENCHMARKS.md, "Matting actors per GPU").
    num_actors: Runtime[CountOrAuto] = Field(
        "auto", description=f"torch matting actors on a GPU cluster; auto = {MATTE_ACTORS_PER_GPU} per GPU"
    )
    batch_size: Runtime[int] = Field(64, ge=1, description="photos per batched torch solve")
    tol: float = Field(
        1e-4, gt=0.0, lt=1.0, description="torch solver's relative CG residual (MAD from pymatting 0.0008 at 512 px, 0.0021 at 1024); 3e-5: 1.4-1.5x the time, 1/3 the error"
    )

    def resolved_actors(self, cluster_gpus: float) -> int:
        """Matting actors on a cluster with `cluster_gpus` (> 0) GPUs."""
        return MATTE_ACTORS_PER_GPU * whole_gpus(cluster_gpus) if self.num_actors == "auto" else self.num_actors


class FilterConfig(_Strict):
    min_area: float = Field(0.01, ge=0.0, le=1.0, description="reject mattes covering less of the photo")
    max_area: float = Field(0.95, ge=0.0, le=1.0, description="reject mattes covering more of the photo")
    # BLIP-Diffusion's pretraining removes human-related images. CLIPSeg (the segment stage's
    # model) scores each prompt too; a prompt equal to the photo's category is not applied.
    exclude_prompts: list[str] = Field(
        ["person"], description="reject a photo where CLIPSeg finds one of these; [] = off (the tiny profile's)"
    )
    exclude_area: float = Field(
        0.05, ge=0.0, le=1.0, description="reject when a prompt's CLIPSeg confidence >= 0.5 covers more of the photo"
    )

    @model_validator(mode="after")
    def _check_order(self) -> FilterConfig:
        if not self.min_area < self.max_area:
            raise ValueError(f"min_area ({self.min_area}) must be below max_area ({self.max_area})")
        return self


CAPTION_BATCH_GPU = 64
CAPTION_BATCH_CPU = 8
# Captioner actors per GPU by the captioner's family (its config.json's model_type; others and
# models named by a hub id: CAPTION_ACTORS_PER_GPU_OTHER), measured on an H100, 16,384 photos:
# - BLIP-2 OPT-2.7B: two, each half the share one had (so CLIPSeg's auto share is unchanged):
#   102 photos/s end to end against 98 for one actor, whose 126 photos/s of captions had capped
#   the build (HISTORY.md, "Caption stage at 91965bd");
# - BLIP (blip-image-captioning-base): one, 138.9 photos/s end to end against 133.0 for two: one
#   is fast enough, and each process on the GPU takes time slices from the matting actors that
#   cap the build (BENCHMARKS.md, "Caption stage").
CAPTION_ACTORS_PER_GPU = {"blip-2": 2, "blip": 1}
CAPTION_ACTORS_PER_GPU_OTHER = 2
CAPTION_GPUS = 0.125


class CaptionConfig(_Strict):
    """The caption stage (stages/caption.py): `models.captioner` writes each accepted photo's
    caption, the text of BLIP-Diffusion's prompted context generation. A photo's own caption
    (captions.csv beside subjects.csv) is kept instead."""

    enabled: bool = Field(True, description="caption photos without a caption of their own; off, they train on train.prompt_template")
    prompt: str = Field(
        "", description="text the captioner continues (BLIP-2: '' captions plainly, 'a photo of' also works); cut from the caption"
    )
    max_new_tokens: int = Field(30, ge=1, le=512, description="caption length limit, tokens (LAVIS's BLIP-2 captions: 30)")
    num_beams: int = Field(1, ge=1, le=16, description="beam search width; 1 = greedy (LAVIS's BLIP-2 captions use 5, at several times the cost)")
    batch_size: Runtime[CountOrAuto] = Field(
        "auto", description=f"photos per captioner generate(); auto = {CAPTION_BATCH_GPU} with GPUs, {CAPTION_BATCH_CPU} without"
    )
    num_actors: Runtime[CountOrAuto] = Field(
        "auto", description="captioner actor pool size; auto = per GPU 1 for a BLIP captioner, 2 for BLIP-2 and others "
        "(pipeline/config.py CAPTION_ACTORS_PER_GPU), 1 without GPUs"
    )
    num_gpus: Runtime[float | Literal["auto"]] = Field(
        "auto", description=f"GPUs per captioner actor; auto = {CAPTION_GPUS} with GPUs (CLIPSeg's auto share takes what is left), 0 without"
    )
    # Runtime, as batch_size: fused attention computes the same attention up to float rounding
    # (stages/caption_attention.py), which at most turns a near-tie of greedy decoding, as another
    # batch size can; it must not build a dataset again.
    attention: Runtime[Literal["sdpa", "eager"]] = Field(
        "sdpa", description="a BLIP captioner's attention: sdpa = torch's fused kernel, eager = transformers' own (BLIP-2 keeps its own)"
    )

    def resolved(self, cluster_gpus: float, family: str | None = None) -> tuple[int, int, float]:
        """(num_actors, batch_size, num_gpus) on a cluster with `cluster_gpus` GPUs, for a
        captioner of `family` (its config's model_type, None when not known)."""
        gpus = whole_gpus(cluster_gpus)
        per_gpu = CAPTION_ACTORS_PER_GPU.get(family or "", CAPTION_ACTORS_PER_GPU_OTHER)
        actors = self.num_actors if self.num_actors != "auto" else max(1, per_gpu * gpus)
        batch = self.batch_size if self.batch_size != "auto" else (CAPTION_BATCH_GPU if gpus else CAPTION_BATCH_CPU)
        share = self.num_gpus if self.num_gpus != "auto" else (CAPTION_GPUS if gpus else 0.0)
        return actors, batch, share


class CompositeConfig(_Strict):
    per_photo: int = Field(2, ge=1, le=64, description="composites (rows) made from each accepted photo")
    scale_min: float = Field(0.4, gt=0.0, le=1.0, description="subject's long side / canvas short side, lower bound")
    scale_max: float = Field(0.9, gt=0.0, le=1.0, description="same, upper bound")
    seed: int = Field(0, ge=0, description="global seed; each photo's own seed derives from it and its hash")

    @model_validator(mode="after")
    def _check_order(self) -> CompositeConfig:
        if self.scale_min > self.scale_max:
            raise ValueError(f"scale_min ({self.scale_min}) must not exceed scale_max ({self.scale_max})")
        return self


class WriteConfig(_Strict):
    image_format: Literal["jpeg", "png"] = Field("jpeg", description="encoding of `image` and `composite`")
    jpeg_quality: int = Field(95, ge=50, le=100)
    rows_per_file: Runtime[int] = Field(
        512, ge=1, description="target rows per Parquet shard; small jobs get smaller shards to use every CPU"
    )


class SourceConfig(_Strict):
    follow_links: Input[bool] = Field(
        False, description="read links that lead outside the source folder; off, each is a reject at `scan`"
    )


class BackgroundsConfig(_Strict):
    """Where the composites' backgrounds come from, and what `data backgrounds` keeps in a pool.
    The reject settings shape the pool, whose digest records them: they are Input to a build."""

    folder: Input[str | None] = Field(
        None, description="a pool built by `data backgrounds` or any folder of images; None = bundled procedural set"
    )
    reject_prompts: Input[list[str] | None] = Field(
        None, description="`data backgrounds` drops photos where CLIPSeg finds one of these; None = the dataset's categories and 'person'"
    )
    reject_threshold: Input[float] = Field(0.5, gt=0.0, lt=1.0, description="CLIPSeg confidence above which a pixel shows the prompt")
    reject_area: Input[float] = Field(0.02, ge=0.0, le=1.0, description="drop a photo where a prompt's pixels cover more than this share")


class DataConfig(_Strict):
    backgrounds: BackgroundsConfig = BackgroundsConfig()
    max_reject_fraction: Runtime[float] = Field(
        0.5, ge=0.0, le=1.0, description="the job fails when more of its inputs are rejected"
    )
    keep_failed: Runtime[int] = Field(
        1, ge=0, description="builds that failed max_reject_fraction kept in OUT/failed/ (the newest); 0 = none"
    )
    # Input, as data.source.follow_links: it decides which photos are inputs, not the rows a photo
    # makes, and the source's digest records its effect (a duplicate's input carries the kept
    # photo's path), so switching it re-judges the copies on the next refresh and nothing else.
    duplicates: Input[Literal["reject", "keep"]] = Field(
        "reject", description="a photo whose bytes equal an earlier one's (path order): reject = a reject at `scan`, keep = a photo of its own"
    )
    source: SourceConfig = SourceConfig()
    decode: DecodeConfig = DecodeConfig()
    segment: SegmentConfig = SegmentConfig()
    trimap: TrimapConfig = TrimapConfig()
    matte: MatteConfig = MatteConfig()
    filter: FilterConfig = FilterConfig()
    caption: CaptionConfig = CaptionConfig()
    composite: CompositeConfig = CompositeConfig()
    write: WriteConfig = WriteConfig()

    @model_validator(mode="before")
    @classmethod
    def _backgrounds_folder(cls, values: Any) -> Any:
        """`data.backgrounds: FOLDER`, the older spelling, means `data.backgrounds.folder: FOLDER`."""
        if isinstance(values, dict) and (isinstance(values.get("backgrounds"), str) or values.get("backgrounds", {}) is None):
            values = {**values, "backgrounds": {"folder": values["backgrounds"]}}
        return values


class RayConfig(_Strict):
    address: Runtime[str | None] = Field(None, description="Ray cluster address; None starts or joins a local one")
    num_cpus: Runtime[int | None] = Field(None, ge=1, description="CPUs of a locally started Ray; None = all")


# What `generate --control` accepts (pipeline/model/control.py makes the maps): none, Canny edges
# (OpenCV), depth or HED soft edges from a detector model, or a map used as is.
CONTROL_KINDS: tuple[str, ...] = ("none", "canny", "depth", "hed", "map")
ControlKind = Literal[CONTROL_KINDS]
# The ControlNet each kind uses when generate.control.controlnet is None. The tiny profile's
# random ControlNet fits the tiny UNet; the real ones are SD 1.5's, which BLIP-Diffusion's UNet
# keeps (LAVIS's blip_diffusion_controlnet_*.yaml). A given map has no default: name its ControlNet.
PROFILE_CONTROLNETS: dict[str, dict[str, str]] = {
    "tiny": {kind: str(ASSETS_DIR / "tiny-controlnet") for kind in CONTROL_KINDS[1:]},
    "real": {
        "canny": "lllyasviel/sd-controlnet-canny",
        "depth": "lllyasviel/sd-controlnet-depth",
        "hed": "lllyasviel/sd-controlnet-hed",
    },
}


class ControlConfig(_Strict):
    """Structure control of `subjectforge generate` by a ControlNet (`--control` and friends)."""

    kind: ControlKind = Field("none", description=", ".join(CONTROL_KINDS))
    image: Input[str | None] = Field(None, description="photo the map is made from (canny, depth, hed) or the map itself (map)")
    scale: float = Field(1.0, ge=0.0, le=10.0, description="multiplies the ControlNet's residuals; 0 = plain generation")
    # The guidance window of diffusers' control_guidance_start/end (not in LAVIS): the steps
    # outside it run the plain UNet, so the last steps can draw detail freely.
    start: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of the steps done before the ControlNet steers; 0 = from the first")
    end: float = Field(1.0, gt=0.0, le=1.0, description="fraction of the steps after which it stops steering; 1 = to the last")
    controlnet: Input[str | None] = Field(None, description="ControlNet id or folder; None = the profile's for the kind")
    detector: Input[str | None] = Field(
        None, description="depth: a transformers depth-estimation model (id or folder); hed: a TorchScript HED file"
    )
    canny_low: int = Field(100, ge=0, le=255, description="Canny hysteresis: weaker gradients are never edges")
    canny_high: int = Field(200, ge=0, le=255, description="Canny hysteresis: stronger gradients are always edges")

    @model_validator(mode="after")
    def _check(self) -> ControlConfig:
        if self.kind != "none" and self.image is None:
            raise ValueError(f"generate.control.image is needed with generate.control.kind={self.kind}")
        if self.canny_low > self.canny_high:
            raise ValueError(f"generate.control.canny_low ({self.canny_low}) is above canny_high ({self.canny_high})")
        if self.start >= self.end:
            raise ValueError(f"generate.control.start ({self.start}) must be below generate.control.end ({self.end})")
        return self

    def controlnet_path(self, profile: str) -> str:
        """The ControlNet of this kind: the explicit setting, else the profile's default."""
        if self.controlnet is not None:
            return self.controlnet
        default = PROFILE_CONTROLNETS[profile].get(self.kind)
        if default is None:
            raise ConfigError(f"generate.control.controlnet (--controlnet) is needed with --control {self.kind}")
        return default


class GenerateConfig(_Strict):
    """Zero-shot generation defaults (`subjectforge generate`); the reference's values."""

    steps: int = Field(50, ge=1, le=1000, description="denoising steps")
    guidance_scale: float = Field(7.5, ge=0.0, description="classifier-free guidance; <= 1 turns it off")
    negative_prompt: str | None = Field(
        None, description="None = the reference's negative prompt (pipeline.model.DEFAULT_NEGATIVE_PROMPT)"
    )
    height: int = Field(512, ge=8, le=2048, multiple_of=8, description="image height, px")
    width: int = Field(512, ge=8, le=2048, multiple_of=8, description="image width, px")
    seed: int = Field(0, ge=0, description="noise seed: the same seed and settings give the same images")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto = float16 on CUDA, float32 on CPU"
    )
    control: ControlConfig = ControlConfig()


class EditConfig(_Strict):
    """`subjectforge edit`: prompt-to-prompt editing (pipeline/model/editing.py), LAVIS's values.
    Steps, guidance, size, seed, negative prompt and dtype are the `generate:` settings."""

    cross_replace_steps: float = Field(
        0.8, ge=0.0, le=1.0, description="share of the steps in which the edited row takes the source's cross-attention"
    )
    self_replace_steps: float = Field(
        0.4, ge=0.0, le=1.0, description="share of the steps in which it takes the source's coarse self-attention (layout)"
    )
    threshold: float = Field(
        0.3, ge=0.0, le=1.0, description="edit region: where the replaced word's attention is above this share of its peak"
    )
    mask_threshold: float = Field(0.5, ge=0.0, le=1.0, description="--mask-prompt: CLIPSeg confidence that counts as inside")
    keep_outside: bool = Field(
        True, description="outside the edit region the result is the source's pixels exactly; false = the decoded edit (LAVIS)"
    )


class ServeLimits(_Strict):
    """What one generation request may ask for, checked before any model work (`mlflow models
    serve`, `subjectforge generate`; pipeline/serving/requests.py). A request's cost grows with
    images x steps x pixels, and a model server runs one at a time: unbounded values let a
    single request hold it for hours."""

    max_num_images: Runtime[int] = Field(8, ge=1, le=64, description="images of one request, all its prompts together")
    max_steps: Runtime[int] = Field(150, ge=1, le=1000, description="denoising steps of a request")
    max_size: Runtime[int] = Field(1024, ge=8, le=2048, multiple_of=8, description="height and width, px (multiples of 8)")
    max_prompt_chars: Runtime[int] = Field(2000, ge=1, le=100_000, description="characters of prompt and negative_prompt")
    max_seed: Runtime[int] = Field(2**32 - 1, ge=0, le=2**63 - 1, description="seeds are 0..max_seed")
    max_guidance_scale: Runtime[float] = Field(30.0, ge=0.0, le=1000.0, description="guidance_scale is 0..max_guidance_scale")
    max_request_pixels: Runtime[int] = Field(
        150_000_000, ge=1, description="pixels of a request's photos together (reference, mix, control and edit photos; "
        "each is within data.decode.max_pixels), read from their headers before any is decoded"
    )


class ServeConfig(_Strict):
    """Serving a model to other programs. The limits are saved with each registered subject
    model, so the model server enforces the values of the config that logged it."""

    limits: ServeLimits = ServeLimits()
    # `subjectforge serve` (pipeline/serving/app.py): one Ray Serve replica per GPU holds the base
    # model (models.blip_diffusion) once and draws zero-shot and registered subjects.
    host: Runtime[str] = Field("127.0.0.1", description="address the HTTP proxy listens on (0.0.0.0 in a pod)")
    port: Runtime[int] = Field(8000, ge=1, le=65535, description="HTTP port of `subjectforge serve`")
    num_replicas: Runtime[int] = Field(1, ge=1, description="model replicas (one per GPU)")
    num_gpus: Runtime[Annotated[float, Field(ge=0)] | Literal["auto"]] = Field(
        "auto", description="GPUs of a replica; auto = 1 when the cluster has GPUs, else 0"
    )
    max_batch_size: Runtime[int] = Field(8, ge=1, le=256, description="requests of one batch, across callers: every request waiting when the model is free, up to this (pipeline/serving/batcher.py)")
    batch_wait_timeout_s: Runtime[float] = Field(0.02, ge=0.0, le=10.0, description="how long the first request at an idle replica waits for others to join its batch, s")
    max_batch_images: Runtime[int] = Field(16, ge=1, le=512, description="images denoised together; a bigger batch runs in parts")
    max_queued_requests: Runtime[int] = Field(64, ge=1, description="requests waiting for a replica; more are answered 503")
    request_timeout_s: Runtime[float] = Field(300.0, gt=0, description="a request not answered by then gets a 5xx (a hung replica)")
    max_request_mb: Runtime[float] = Field(48.0, gt=0, le=1024, description="largest request body, MB (reference photos are base64)")
    max_reference_images: Runtime[int] = Field(6, ge=1, le=32, description="reference photos of a zero-shot request")
    max_subjects: Runtime[int] = Field(512, ge=1, description="registered subjects kept loaded (embeddings on the device)")
    max_lora_adapters: Runtime[int] = Field(128, ge=1, description="LoRA subjects kept loaded in the UNet's LoRA slots (device memory: one slot per subject, of serve.max_lora_rank)")
    max_lora_rank: Runtime[int] = Field(
        16, ge=1, le=256, description="largest LoRA rank the slots hold (finetune.lora_rank); a subject of a higher rank is refused (422)"
    )
    lora_merge: Runtime[bool] = Field(
        True,
        description="a batch whose rows all draw one LoRA subject (or none: zero-shot, embedding subjects) runs the UNet with "
        "that subject merged into a working copy of its LoRA layers' weights, without the per-row LoRA products (2 small "
        "kernels in each of 128 layers per UNet call), and a batch of several subjects runs each row on its own copy with "
        "its row's subject merged (one batched matrix product a layer; merged once a batch, for the rows whose subject "
        "changed); costs device memory of 1 + 2 x serve.max_batch_images copies of those weights (178 MiB each for SD 1.5 "
        "in float16: 5.7 GiB at 16 images) and, with serve.compile, a second set of graphs warmed up at start; "
        "false = per-row products always, no copies",
    )
    full_unet_budget_gb: Runtime[float] = Field(16.0, ge=0, description="host memory for full (blipd, dreambooth) subject UNets, GB")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="auto = float16 on CUDA, float32 on CPU")
    compile: Runtime[bool] = Field(False, description="torch.compile the UNet and VAE decoder; warmed up before the replica is ready")
    compile_mode: Runtime[Literal["auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"]] = Field(
        "auto",
        description="torch.compile mode with serve.compile; reduce-overhead replays the compiled graphs as CUDA graphs "
        "(removes host launch gaps); max-autotune* tune GEMMs and convolutions for minutes more per graph variant at start; "
        "auto = reduce-overhead on a GPU, Inductor's default on a CPU (pipeline/serving/app.py compile_mode_for)",
    )
    warmup_steps: Runtime[int] = Field(2, ge=1, description="steps of the one-image warm-up generation a replica runs before it is ready (with compile or on a GPU)")
    compile_cache: Runtime[str | None] = Field(
        None,
        description="local folder for Inductor's and Triton's compile caches with serve.compile (a volume shared by the "
        "replicas in a cluster), so a restarted or added replica reuses the generated code instead of compiling it again; "
        "None = torch's own per-machine folder under /tmp, which a new pod starts without",
    )

    @model_validator(mode="after")
    def _check_compile_cache(self) -> ServeConfig:
        if self.compile_cache is not None and ("://" in self.compile_cache or not self.compile_cache.strip()):
            raise ValueError(f"compile_cache must be a local folder (a mounted volume), got {self.compile_cache!r}")
        return self


class TrainableConfig(_Strict):
    """Which parts of BLIP-Diffusion learn; the ViT and the VAE are always frozen."""

    qformer: bool = Field(True, description="Q-Former: query tokens, text embeddings, transformer blocks")
    projection: bool = Field(True, description="the Q-Former's projection into the text encoder's space")
    text_encoder: bool = True
    unet: bool = True

    @model_validator(mode="after")
    def _check_any(self) -> TrainableConfig:
        if not any((self.qformer, self.projection, self.text_encoder, self.unet)):
            raise ValueError("at least one part must be trainable")
        return self


class SamplesConfig(_Strict):
    """Sample generations logged to MLflow while training (rank 0, with the in-memory model)."""

    every: Runtime[int] = Field(1000, ge=0, description="generate every this many steps (and at the end); 0 = never")
    subjects: Runtime[int] = Field(4, ge=1, description="fixed subjects: the first in subject_id order, one composite each")
    prompt: Runtime[str] = Field("on the beach", min_length=1, description="what to draw the subjects in")
    steps: Runtime[int] = Field(25, ge=1, le=1000, description="denoising steps")
    guidance_scale: Runtime[float] = Field(7.5, ge=0.0)


@dataclass(frozen=True)
class MethodTraits:
    """What a fine-tuning method learns, and so what its subject folder holds (pipeline/model/subject.py),
    which UNet draws it (pipeline/serving/engine.py) and what trains (pipeline/train/methods.py)."""

    lr: float  # AdamW learning rate when finetune.lr is None
    embeds: bool  # subject embeddings (1, Q, D); without them a rare token (finetune.identifier) names the subject
    unet: Literal["base", "lora", "full"]  # the base UNet as is, LoRA adapters on it, or a full UNet of its own
    class_prior: bool = False  # also trains on class images the base model draws (finetune.prior_*)

    @property
    def text_encoder(self) -> bool:
        """Whether finetune.train_text_encoder applies: the text encoder learns beside a full UNet."""
        return self.unet == "full"


# The fine-tuning methods by name: the one table the config's choices, the CLI's --method,
# pipeline/train/methods.py's METHODS (a class per name), subject folders and serving follow.
# Learning rates: BLIP-Diffusion's fine-tuning recipe (5e-6) where full UNet weights train, the
# usual LoRA and textual-inversion rates otherwise.
FINETUNE_TRAITS: dict[str, MethodTraits] = {
    "blipd": MethodTraits(lr=5e-6, embeds=True, unet="full"),
    "lora": MethodTraits(lr=1e-4, embeds=True, unet="lora"),
    "textual-inversion": MethodTraits(lr=5e-3, embeds=True, unet="base"),
    "dreambooth": MethodTraits(lr=5e-6, embeds=False, unet="full", class_prior=True),
}
FINETUNE_METHODS: tuple[str, ...] = tuple(FINETUNE_TRAITS)
TRAIN_METHODS: tuple[str, ...] = ("pretrain", *FINETUNE_METHODS)
FinetuneMethod = Literal[FINETUNE_METHODS]
TrainMethod = Literal[TRAIN_METHODS]


class TrainConfig(_Strict):
    """`subjectforge pretrain` (Ray Train). Defaults follow BLIP-Diffusion's pretraining: AdamW,
    constant LR 2e-6 after warm-up, subject embeddings dropped 15% of the time, 512 px."""

    method: TrainMethod = Field(
        "pretrain", description="what trains and is saved (pipeline.train.methods); fine-tuning sets it from finetune.method"
    )
    data: Input[str | None] = Field(None, description="dataset version folder, or a dataset root (its `latest` is used)")
    run_name: Runtime[Name | None] = Field(
        None, description="Ray Train run name; rerunning with the same name resumes. None = '<method>-<dataset version>'"
    )
    storage_path: Runtime[str] = Field("subjectforge-runs", description="checkpoints go in <storage_path>/<run_name>/ (local path or URI)")
    workers: int = Field(1, ge=1, description="data-parallel workers (one GPU each with gpu: true)")
    gpu: Runtime[bool] = Field(False, description="one GPU per worker, NCCL, bf16 autocast")
    cpus_per_worker: Runtime[float] = Field(1.0, gt=0.0, description="CPUs Ray reserves per worker (fractions allowed)")
    steps: int = Field(100_000, ge=1, description="optimizer steps in all (a resumed run stops at the same step)")
    batch_size: int = Field(16, ge=1, description="samples per worker per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(2e-6, gt=0.0, description="AdamW learning rate after warm-up (constant), at reference_batch samples per step")
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none", description="scale lr to the run's samples per step (batch_size x workers x grad_accum) / reference_batch: "
        "none = lr as given, linear = times the ratio, sqrt = times its square root (learning_rate())"
    )
    reference_batch: int = Field(16, ge=1, description="samples per step that lr is given for (BLIP-Diffusion's pretraining: 16)")
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_steps: int = Field(1000, ge=0, description="linear warm-up from 0 to lr, in optimizer steps")
    max_grad_norm: float = Field(1.0, ge=0.0, description="gradient clipping; 0 = off")
    resolution: int = Field(512, ge=8, le=2048, multiple_of=8, description="target crop side, px")
    crop: Literal["random", "center"] = Field("random", description="how the target photo is cropped to resolution")
    composite: Literal["auto", "stored", "online"] = Field(
        "auto",
        description="the subject's input image: the build's stored composites, or the row's cutout pasted onto a random "
        "pool background every epoch, seeded by (seed, epoch, row) (train.precompute then encodes the targets only: the "
        "ViT runs in the step); auto = online for pretraining on a dataset with cutouts unless train.precompute is true, "
        "else stored",
    )
    prompt_template: str = Field("a {category}", description="prompt of rows without a caption; {category} is filled in")
    drop_subject_prob: float = Field(0.15, ge=0.0, le=1.0, description="share of samples trained without the subject")
    trainable: TrainableConfig = TrainableConfig()
    precompute: bool | Literal["auto"] = Field(
        "auto",
        description="encode targets (VAE) and composites (ViT) once in Ray Data and train from those (centre crops); "
        "with train.composite online the targets only (the composites are new each epoch); "
        "auto = on GPUs when the run plans 5 epochs or more, or when they are precomputed in train.storage_path already "
        "(pipeline/train/speed.py resolve_precompute)",
    )
    mixed_precision: Literal["auto", "no", "bf16"] = Field("auto", description="auto = bf16 autocast on GPU, fp32 on CPU")
    # Memory (pipeline/train/memory.py) and quality options of the loss and weights (losses.py, ema.py).
    gradient_checkpointing: Runtime[bool] = Field(
        False, description="recompute the UNet's and text encoder's activations in the backward pass: less memory, same gradients"
    )
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="adamw8bit: bitsandbytes' AdamW with 8-bit moments (optional extra subjectforge[gpu])"
    )
    ema_decay: float | None = Field(
        None, gt=0.0, lt=1.0, description="keep an EMA of the trained weights (e.g. 0.9999), saved beside them and used "
        "for sample images and registration; None = off"
    )
    snr_gamma: float | None = Field(None, gt=0.0, description="min-SNR-gamma loss weighting (Hang et al., 2023; 5.0 is usual); None = off")
    noise_offset: float = Field(0.0, ge=0.0, description="noise offset: std of a per-sample, per-channel shift added to the noise (0.05-0.1 is usual); 0 = off")
    compile: Runtime[bool | Literal["auto"]] = Field(
        "auto",
        description="torch.compile the UNet, Q-Former and text encoder (GPU only; minutes at start from a cold cache); "
        "auto = on GPUs for runs of 200 steps or more (pipeline/train/speed.py resolve_compile)",
    )
    compile_mode: Runtime[Literal["auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"]] = Field(
        "auto",
        description="torch.compile mode with train.compile; reduce-overhead replays the compiled graphs as CUDA graphs "
        "(removes host launch gaps; with grad_accum > 1 or several workers it falls back to default, logged); "
        "max-autotune* tune GEMMs and convolutions for minutes more at start; auto = reduce-overhead with one worker "
        "and grad_accum 1, else default",
    )
    cuda_graphs: Runtime[bool | Literal["auto"]] = Field(
        "auto",
        description="replay the eager UNet's forward and backward as CUDA graphs (one GPU worker, no grad_accum); "
        "auto = at batch_size 8 or less, where kernel launches bound the step (pipeline/train/speed.py CUDA_GRAPHS_MAX_BATCH)",
    )
    sdpa_backend: Runtime[Literal["default", "no-cudnn"]] = Field(
        "no-cudnn", description="attention kernels of the Q-Former and text encoder; no-cudnn saves cuDNN's host-side planning"
    )
    unet_sdpa_backend: Runtime[Literal["auto", "flash", "efficient", "cudnn", "no-cudnn", "math"]] = Field(
        "auto",
        description="the UNet's attention kernel in training, also inside a compiled UNet; auto = PyTorch's choice "
        "(cuDNN on H100); flash, efficient, cudnn and math allow that kernel alone (flash needs bf16 autocast on GPU; "
        "efficient and cudnn have no CPU kernel); no-cudnn = flash, efficient or math",
    )
    shuffle_buffer: int = Field(256, ge=0, description="rows in each worker's local shuffle buffer; 0 = file order")
    data_cpus: Runtime[float] = Field(1.0, gt=0.0, description="CPUs per Ray Data decode task")
    checkpoint_every: Runtime[int] = Field(1000, ge=1, description="optimizer steps between checkpoints (and one at the end)")
    keep_checkpoints: Runtime[int] = Field(2, ge=1, description="newest checkpoints kept in storage")
    max_failures: Runtime[int] = Field(2, ge=0, description="worker-group restarts from the newest checkpoint before the run fails")
    log_every: Runtime[int] = Field(10, ge=1, description="steps between progress lines and MLflow metrics")
    samples: SamplesConfig = SamplesConfig()
    seed: int = Field(0, ge=0)
    register_as: Runtime[Name | None] = Field("subjectforge-base", description="MLflow registered model name; None = do not register")
    step_log: Runtime[str | None] = Field(None, description="folder where each rank appends the steps it trained (audits, tests)")
    fail_at_step: Runtime[int | None] = Field(
        None, ge=1, description="fault injection: kill one worker once after this step (tests of resume)"
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if "{category}" not in self.prompt_template:
            raise ValueError("prompt_template must contain '{category}'")
        if self.fail_at_step is not None and self.fail_at_step >= self.steps:
            raise ValueError(f"fail_at_step ({self.fail_at_step}) must be below steps ({self.steps})")
        if self.composite == "online" and self.method != "pretrain":
            raise ValueError(f"composite online is pretraining's; {self.method} trains on the subject's stored composites")
        if not self.gpu and self.unet_sdpa_backend in ("efficient", "cudnn"):
            raise ValueError(f"unet_sdpa_backend {self.unet_sdpa_backend!r} has no CPU kernel (gpu: false)")
        if self.gpu and self.mixed_precision == "no" and self.unet_sdpa_backend in ("flash", "cudnn"):
            raise ValueError(f"unet_sdpa_backend {self.unet_sdpa_backend!r} needs bf16 autocast (mixed_precision: no)")
        return self

    def learning_rate(self) -> float:
        """The AdamW rate after warm-up: `lr`, given for `reference_batch` samples per optimizer
        step, scaled to this run's by `lr_scaling`. At 256 samples per step (32 x 8 workers) and
        lr 2e-6: none 2e-6, sqrt 8e-6, linear 3.2e-5."""
        ratio = self.batch_size * self.workers * self.grad_accum / self.reference_batch
        return self.lr * {"none": 1.0, "linear": ratio, "sqrt": ratio**0.5}[self.lr_scaling]


class FinetuneConfig(_Strict):
    """`subjectforge finetune` / `finetune-many`: one subject on top of a base model, through the
    training loop (`train.*` supplies resolution, crop, precision, workers' CPUs and storage)."""

    method: FinetuneMethod = Field("blipd", description=", ".join(FINETUNE_METHODS))
    base: Input[str | None] = Field(None, description="base model: folder, Hub id or models:/NAME/VERSION; None = models.blip_diffusion")
    subject: Input[str | None] = Field(None, description="a dataset (root or version folder) or a folder of the subject's photos")
    subject_id: Name | None = Field(None, description="the subject's id in the dataset; registered as <register_prefix><subject_id>")
    category: Input[str | None] = Field(
        None, min_length=1, max_length=MAX_CATEGORY_CHARS, description="the subject's class noun; None = the dataset's"
    )
    steps: int = Field(100, ge=1, description="optimizer steps (BLIP-Diffusion: 40-150)")
    batch_size: int = Field(3, ge=1, description="samples per step")
    lr: float | None = Field(None, gt=0.0, description="AdamW learning rate; None = the method's (FINETUNE_TRAITS)")
    weight_decay: float = Field(0.01, ge=0.0)
    init_from: Literal["photos", "composites"] = Field(
        "photos", description="what the subject embedding starts as the mean over: the subject's distinct original photos "
        "(BLIP-Diffusion's fine-tuning) or its first composites (the training inputs)"
    )
    init_photos: int = Field(6, ge=1, description="at most this many photos (or composites) in that mean")
    validate_every: int = Field(
        20, ge=0, description="steps between validations (and one at the end), each a kept checkpoint; 0 = no validation"
    )
    validation_prompts: list[str] | None = Field(
        None, min_length=1, description="DreamBench-style templates ('a {class} in the snow') drawn and scored at each "
        "validation; None = 4 of DreamBench's prompts for the subject's kind (object or live; pipeline/train/validation.py)"
    )
    validation_steps: int = Field(50, ge=1, description="denoising steps of each validation image")
    select: Literal["last", "dino", "clip_i", "clip_t", "balanced"] = Field(
        "balanced", description="the validated checkpoint registered: the last, the best DINO, CLIP-I or CLIP-T, or "
        "balanced = the best DINO among those whose CLIP-T is within 0.01 of the best CLIP-T"
    )
    patience: int | None = Field(
        None, ge=1, description="end the run after this many validations in a row without a new best (by select); None = never"
    )
    train_text_encoder: bool = Field(False, description="blipd/dreambooth: the text encoder learns too (the reference keeps it frozen)")
    lora_rank: int = Field(4, ge=1, description="LoRA rank on the UNet attention projections")
    lora_alpha: float | None = Field(None, gt=0.0, description="LoRA scale numerator; None = lora_rank (scale 1)")
    identifier: str = Field("sks", min_length=1, description="dreambooth: the rare token naming the subject")
    ti_vectors: int = Field(1, ge=1, le=16, description="textual-inversion: embedding vectors of the learned word [S] (the paper: 1)")
    ti_property: Literal["object", "style"] = Field(
        "object", description="textual-inversion: learn the subject (object templates, 'a photo of a [S]') or its style "
        "(style templates, 'a painting in the style of [S]')"
    )
    prior_images: int = Field(100, ge=1, description="dreambooth: class images generated by the base model")
    prior_weight: float = Field(1.0, ge=0.0, description="dreambooth: weight of the class-prior loss")
    prior_steps: int = Field(25, ge=1, description="dreambooth: denoising steps per class image")
    out: Runtime[str] = Field("subjectforge-subjects", description="each subject's artifact goes to <out>/<subject_id>-<method>/")
    register_model: Runtime[bool] = Field(True, description="log the subject as an MLflow pyfunc model and register it")
    register_prefix: Runtime[Name | Literal[""]] = Field("subjectforge-", description="registered model name = prefix + subject_id")
    alias: Runtime[Alias] = Field("candidate", description="alias set on the new registered version")
    subjects: Input[UniqueNames | None] = Field(None, description="finetune-many: subject ids; None = every subject of the dataset")
    affected_only: Input[bool] = Field(False, description="finetune-many: only the subjects the version's refresh added, changed or removed photos of")
    num_gpus: Runtime[float] = Field(1.0, gt=0.0, le=1.0, description="GPUs of a subject's worker with train.gpu; fractions share a GPU")
    concurrency: Runtime[int] = Field(1, ge=1, description="finetune-many: subjects trained at once")
    max_retries: Runtime[int] = Field(1, ge=0, description="finetune-many: retries of a failed subject")

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else FINETUNE_TRAITS[self.method].lr

    @model_validator(mode="after")
    def _check_validation(self) -> FinetuneConfig:
        if self.validate_every == 0 and self.select != "last":
            raise ValueError(f"select {self.select!r} picks among validated checkpoints: set validate_every > 0, or select: last")
        if self.patience is not None and (self.validate_every == 0 or self.select == "last"):
            raise ValueError("patience counts validations without a new best: it needs validate_every > 0 and a select other than last")
        for template in self.validation_prompts or []:
            if not template.startswith("a ") or "{class}" not in template:
                raise ValueError(f"validation_prompts: a prompt must start with 'a ' and contain {{class}}, got {template!r}")
        return self


class TrackingConfig(_Strict):
    """MLflow. pipeline/tracking.py is the only module that talks to it."""

    enabled: Runtime[bool] = True
    uri: Runtime[str | None] = Field(None, description="None = $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db")
    experiment: Runtime[str] = Field("subjectforge", min_length=1)
    data_experiment: Runtime[str] = Field("subjectforge-data", min_length=1, description="experiment of `data build|refresh` runs")
    system_metrics: Runtime[bool] = Field(True, description="CPU/GPU/memory metrics of rank 0's node")


class EvaluateConfig(_Strict):
    """`subjectforge evaluate`: DINO, CLIP-I and CLIP-T on DreamBench (pipeline/evaluation/).
    Images are made with the `generate:` settings; feature models are `models.dino`/`models.clip`."""

    model: Input[str | None] = Field(
        None, description="checkpoint folder, Hub id or models:/NAME@ALIAS; None = models.blip_diffusion"
    )
    photos: Input[str | None] = Field(
        None, description="real photos, one folder per subject; None = the bundled datasets/dreambench-mini"
    )
    benchmark: Input[str | None] = Field(
        None, description="folder with subjects.csv, prompts_object.txt, prompts_live.txt; None = datasets/dreambench"
    )
    prompts: Input[str | None] = Field(None, description="one prompt file for every subject; None = the object/live lists")
    subjects: Input[list[Name] | None] = Field(None, description="subject ids; None = every subject in photos")
    images_per_prompt: int = Field(4, ge=1, le=64, description="images per subject and prompt (DreamBench: 4)")
    out: Runtime[str | None] = Field(None, description="output folder; None = subjectforge-eval/<model name>")
    num_actors: Runtime[CountOrAuto] = Field("auto", description="generator actors; auto = one per GPU, else 1")
    num_gpus: Runtime[float | Literal["auto"]] = Field("auto", description="GPUs per generator actor; auto = 1 with GPUs, else 0")
    batch_size: Runtime[int | None] = Field(None, ge=1, description="images per denoising batch; None = a prompt's images at once")
    score_batch_size: Runtime[int] = Field(32, ge=1, description="images per DINO/CLIP forward pass")
    qformer_tokenizer: Input[str | None] = Field(None, description="folder of the Q-Former's BERT tokenizer (offline use)")
    thumbnail: int = Field(128, ge=16, le=1024, description="side of each image in the per-subject grids, px")
    control: bool = Field(
        False, description="also draw every image steered by the canny ControlNet (generate.control.controlnet or the "
        "profile's) on the Canny edges of one of the subject's real photos, scored as a table of its own (control/)",
    )

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        if self.num_gpus != "auto" and self.num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0 or auto, got {self.num_gpus}")
        return self


class SubmitConfig(_Strict):
    """`subjectforge submit`: the upload of a job's code (pipeline/jobs.py)."""

    max_upload_mb: Runtime[float] = Field(
        100, gt=0, description="refuse an upload larger than this, MB (Ray itself refuses packages over 512 MiB)"
    )


class Config(_Strict):
    # `real` by default, so a production job never quietly runs on random weights.
    profile: Input[Profile] = "real"
    models: ModelsConfig = ModelsConfig()
    data: DataConfig = DataConfig()
    ray: RayConfig = RayConfig()
    generate: GenerateConfig = GenerateConfig()
    edit: EditConfig = EditConfig()
    serve: ServeConfig = ServeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    train: TrainConfig = TrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    tracking: TrackingConfig = TrackingConfig()
    submit: SubmitConfig = SubmitConfig()

    def model_path(self, name: str) -> str:
        """The id or path of model `name`: the explicit setting, else the profile's default."""
        explicit = getattr(self.models, name)
        return explicit if explicit is not None else PROFILE_MODELS[self.profile][name]

    def model_identity(self, name: str) -> str:
        """model_path as the digests count it: a model bundled in pipeline/assets by its path in
        the package, so a copy of the checkout elsewhere (a submitted job's upload) is the same."""
        path = self.model_path(name)
        try:
            return (Path("pipeline/assets") / Path(path).relative_to(ASSETS_DIR)).as_posix()
        except ValueError:
            return path


# ---------------------------------------------------------------------------------------------
# Loading


# Values a YAML document may hold once its aliases are followed: a config has a few hundred, and
# a "billion laughs" of a few lines of anchors expands to 10**9, which every walk of the tree
# (the UTF-8 check, validation) then took minutes over.
MAX_YAML_VALUES = 100_000


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader (plain data only) that refuses a key given twice in one mapping: PyYAML keeps
    the last one, so the first setting was dropped without a word; a document whose aliases
    expand past MAX_YAML_VALUES; and a whole number longer than Python reads.

    A key after ``<<: *anchor`` still overrides the merged one: each mapping's own keys are
    checked once, before flatten_mapping puts the merged keys beside them."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._checked_nodes: set[int] = set()  # ids of mapping nodes, all alive for the load

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise yaml.constructor.ConstructorError(
                None, None, f"its aliases expand to more than {MAX_YAML_VALUES:,} values", node.start_mark
            )
        return self.construct_document(node)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # int() reads at most sys.get_int_max_str_digits() digits
            raise yaml.constructor.ConstructorError(
                None, None, f"a whole number of {len(node.value):,} digits is too long to read", node.start_mark
            ) from None

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        if id(node) not in self._checked_nodes:
            self._checked_nodes.add(id(node))
            self._refuse_duplicate_keys(node)
        super().flatten_mapping(node)

    def _refuse_duplicate_keys(self, node: yaml.MappingNode) -> None:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            try:
                first = first_lines.get(key)
            except TypeError:  # an unhashable key: construct_mapping refuses it, naming it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"found duplicate key {key!r} (first given on line {first})", key_node.start_mark
                )
            first_lines[key] = key_node.start_mark.line + 1


UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", UniqueKeyLoader.construct_yaml_int)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values `node` holds with every alias followed, each shared node counted once
    per use but walked once (`sizes`, by node id). A node inside itself (&a [*a]) counts 1 where
    it recurs; constructing it then fails as nesting too deep (pipeline.cli.resolve_config)."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = 1  # while it is walked: what it holds of itself counts once
    children = node.value if isinstance(node, yaml.SequenceNode) else (
        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
    )
    sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-parsed value (so 0.2 is a float)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    try:
        value = yaml.load(raw, Loader=UniqueKeyLoader) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from exc
    return key.strip().split("."), value


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part!r} is a value, not a section")
        node = child
    node[path[-1]] = value


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        given = err.get("input")
        # The value as given, when it is a plain one: a typo is found faster (cut, so a huge
        # value cannot flood the terminal).
        got = f" (got {given!r:.80})" if isinstance(given, str | int | float | bool) else ""
        lines.append(f"{key}: {err['msg']}{got}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder, not a YAML file")
    if not path.is_file():  # a FIFO would block the read, a device would not end
        raise ConfigError(f"config file {path} is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as exc:  # a regular file whose read fails: /proc/self/mem, a disk error
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        # Bytes, so that a file in another encoding is a YAMLError naming the byte (PyYAML
        # reads UTF-8 and UTF-16 with a BOM), not a UnicodeDecodeError.
        tree = yaml.load(data, Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return tree


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> Config:
    """Build the resolved config: the profile's settings, then the `base` tree, the YAML file
    at `path` and `overrides`, later ones winning.

    Raises ConfigError with every offending key named.
    """
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        tree = _deep_merge(tree, read_yaml(path))
    for text in overrides:
        key_path, value = parse_override(text)
        _set_path(tree, key_path, value)
    profile = tree.get("profile", Config.model_fields["profile"].default)
    tree = _deep_merge(PROFILE_SETTINGS.get(profile, {}), tree)
    _check_utf8(tree)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def is_utf8(text: str) -> bool:
    """Whether `text` can be written as UTF-8: Python keeps the bytes of a terminal, file name or
    file in another encoding (and JSON keeps an escaped lone surrogate, "\\ud800") as surrogates,
    which the tokenizer, MLflow, Parquet and any UTF-8 answer refuse."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_utf8(text: str, name: str) -> None:
    """ConfigError naming `name` (a key or flag) when `text` is not UTF-8 (is_utf8), refused
    here rather than far into a job."""
    if not is_utf8(text):
        shown = text.encode("utf-8", "backslashreplace").decode()
        raise ConfigError(f"{name}: not UTF-8 text ({shown!r}); use a UTF-8 terminal or locale")


def _check_utf8(value: Any, key: str = "") -> None:
    """check_utf8 on every string of a config tree, naming its key; and no NUL in any (YAML's
    "\\0" escape makes one): no setting takes one, and a path with one was os.path's bare
    "embedded null byte" ValueError."""
    if isinstance(value, dict):
        for name, item in value.items():
            _check_utf8(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_utf8(item, f"{key}.{i}")
    elif isinstance(value, str):
        check_utf8(value, key)
        if "\0" in value:
            raise ConfigError(f"{key}: holds a NUL character (\\0), which no setting takes")


def dump_config(config: Config) -> str:
    """The resolved config as YAML, as written next to every output."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
