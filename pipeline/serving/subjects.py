"""The subjects a serving replica draws: registered ones from the MLflow registry, or zero-shot
ones from the reference photos of a request.

A request names a registered subject as `models:/NAME@ALIAS`, `models:/NAME/VERSION` or
{"name": NAME, "version": V} / {"name": NAME, "alias": A}. The alias is resolved once per
request; the subject's files are fetched on first use and kept in host memory (an LRU counted
in subjects, and one counted in bytes for the full UNets of blipd and dreambooth subjects).
What goes onto the device is the engine's business (pipeline/serving/engine.py).
"""

from __future__ import annotations

import io
import logging
import math
import re
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from pipeline.config import MAX_CATEGORY_CHARS, DecodeConfig, check_alias, check_name
from pipeline.serving.cache import LruBudget
from pipeline.serving.requests import RequestError, finite_number
from pipeline.tracking import check_model_name

log = logging.getLogger(__name__)

SUBJECT_FIELD = "subject"
REFERENCE_FIELD = "reference_images"
CATEGORY_FIELD = "category"
MIX_FIELD = "mix"
MAX_MIX_PARTS = 4  # subjects of one mix: each costs a fetch or a Q-Former pass
# |weight| / the sum of a mix's weights: LAVIS's weights are fractions of 1, and a negative part
# (pushing away from a subject) needs some room past them (weights_add_up).
MAX_MIX_SCALE = 10.0
WEIGHTS_RULE = f"must add up to a positive number, none more than {MAX_MIX_SCALE:g} times that sum in size"
MAX_VERSION = 2**31 - 1  # registries keep a version in a 32-bit integer column (MLflow's SQL stores)


class SubjectNotFound(LookupError):
    """A registered subject, version or alias that does not resolve (HTTP 404)."""


class RegistryUnavailable(RuntimeError):
    """The registry did not answer, or failed, while a subject was looked up (HTTP 503): the
    subject may well exist, so this is never reported as an unknown subject."""


class SubjectUnusable(ValueError):
    """A registered model this server cannot draw (not a subject, or beyond the memory budget; HTTP 422)."""


@dataclass(frozen=True)
class SubjectRef:
    """A registered subject as a request names it: an alias or a version of `name`."""

    name: str
    alias: str | None = None
    version: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias is not None else f"models:/{self.name}/{self.version}"


@dataclass
class RegisteredSubject:
    """One registered subject version's tensors in host memory (CPU, float32 as saved).

    key: "NAME/VERSION", unique per version, also the key of its LoRA slot (engine.py);
    embeds: (1, Q, D) or None (dreambooth); lora: peft's adapter state dict (lora);
    unet / text_encoder: full state dicts (blipd, dreambooth; a text encoder only when trained).
    """

    key: str
    name: str
    version: str
    spec: Any  # pipeline.model.subject.SubjectSpec
    embeds: torch.Tensor | None
    lora: dict[str, torch.Tensor] | None
    unet: dict[str, torch.Tensor] | None
    text_encoder: dict[str, torch.Tensor] | None

    @property
    def full_bytes(self) -> int:
        """Bytes of the full weights this subject holds (0 for embeddings and LoRA)."""
        return sum(t.numel() * t.element_size() for part in (self.unet, self.text_encoder) if part for t in part.values())


@dataclass(frozen=True)
class ZeroShotSubject:
    """Reference photos (PIL, as decoded) and the class noun of a zero-shot request."""

    images: tuple[PIL.Image.Image, ...]
    category: str


@dataclass(frozen=True)
class OwnSubject:
    """A mix part that names no subject: the one a subject pyfunc was fine-tuned for (a pyfunc
    has no registry to fetch others from)."""


@dataclass(frozen=True)
class MixedSubject:
    """Subjects mixed into one by weight (LAVIS `forward_ctx_embeddings(ratio=...)`): each part a
    registered subject (a SubjectRef until it is resolved) or a zero-shot one, or in a subject
    pyfunc its own subject; the prompt names the first part's category. Drawn by the base UNet
    with the mixed embeddings only (a pyfunc's by its own UNet)."""

    parts: tuple[Any, ...]  # SubjectRef | RegisteredSubject | ZeroShotSubject | OwnSubject (pyfunc)
    weights: tuple[float, ...]

    @property
    def category(self) -> str:
        first = self.parts[0]
        return first.category if isinstance(first, ZeroShotSubject) else first.spec.category


def parse_mix(value: Any, decode: DecodeConfig, max_images: int, own: bool = False) -> MixedSubject:
    """The request's `mix` field: a list of 1..MAX_MIX_PARTS objects, each {"subject": a registered
    subject, "weight": w} or {"reference_images": [...], "category": c, "weight": w}; the weights
    are finite and add up to a positive number. With `own` (a subject pyfunc), a part is
    {"weight": w}, the model's own subject, or reference photos, never a registered subject.
    RequestError naming the field otherwise."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_MIX_PARTS:
        raise RequestError(MIX_FIELD, f"must be a list of 1..{MAX_MIX_PARTS} weighted subjects")
    parts, weights = [], []
    for i, entry in enumerate(value):
        field = f"{MIX_FIELD}[{i}]"
        if not isinstance(entry, Mapping):
            raise RequestError(field, 'must be an object {"subject", "weight"} or {"reference_images", "category", "weight"}')
        unknown = sorted(set(entry) - {SUBJECT_FIELD, REFERENCE_FIELD, CATEGORY_FIELD, "weight"})
        if unknown:
            raise RequestError(f"{field}.{str(unknown[0])[:40]}", "unknown field; a part is a subject or reference_images with category, and a weight")
        weight = finite_number(entry.get("weight", 1.0))
        if weight is None:
            raise RequestError(f"{field}.weight", "must be a finite number")
        if own and entry.get(SUBJECT_FIELD) is not None:
            raise RequestError(f"{field}.{SUBJECT_FIELD}", f"this model cannot fetch registered subjects: leave {SUBJECT_FIELD} "
                               f"out for its own subject, or give {REFERENCE_FIELD} with {CATEGORY_FIELD}")
        if not own and (entry.get(SUBJECT_FIELD) is None) == (entry.get(REFERENCE_FIELD) is None):
            raise RequestError(field, f"give {SUBJECT_FIELD} or {REFERENCE_FIELD} with {CATEGORY_FIELD}")
        if entry.get(REFERENCE_FIELD) is None and entry.get(CATEGORY_FIELD) is not None:
            whose = "the model's own subject" if own else "a registered subject"
            raise RequestError(f"{field}.{CATEGORY_FIELD}", f"goes with {REFERENCE_FIELD}; {whose} has its own")
        try:
            if entry.get(REFERENCE_FIELD) is not None:
                parts.append(decode_reference_images(entry[REFERENCE_FIELD], entry.get(CATEGORY_FIELD), decode, max_images))
            else:
                parts.append(OwnSubject() if own else parse_subject_ref(entry[SUBJECT_FIELD]))
        except RequestError as exc:
            raise RequestError(f"{field}.{exc.field}", exc.message) from None
        weights.append(weight)
    if not weights_add_up(weights):
        raise RequestError(MIX_FIELD, f"the weights {WEIGHTS_RULE}, got {weights}")
    return MixedSubject(tuple(parts), tuple(weights))


def weights_add_up(weights: list[float]) -> bool:
    """Whether mix weights add up to a positive, finite number (WEIGHTS_RULE) that no weight
    outweighs more than MAX_MIX_SCALE times. pipeline.model.blip_diffusion.mix_subjects scales
    each subject by its weight over the sum: 1e308 + 1e308 is inf, and every part would weigh 0
    in it; [1e300, -1e300, 1] add up to 1, and scaled the first subject to inf, inf - inf a NaN
    subject drawn as a black image (a float16 replica's inf is 65504)."""
    total = sum(weights)
    return math.isfinite(total) and total > 0 and all(abs(w) <= MAX_MIX_SCALE * total for w in weights)


def parse_subject_ref(value: Any) -> SubjectRef:
    """`value` of the request's `subject` field as a SubjectRef; RequestError naming it otherwise."""
    if isinstance(value, str):
        if not value.startswith("models:/"):
            raise RequestError(SUBJECT_FIELD, f"must be models:/NAME@ALIAS or models:/NAME/VERSION, got {value[:80]!r}")
        rest = value[len("models:/"):]
        name, at, alias = rest.partition("@")
        if at:
            return _ref(name, alias=alias)
        name, slash, version = rest.rpartition("/")
        return _ref(name if slash else rest, version=version if slash else None)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"name", "alias", "version"})
        if unknown:
            raise RequestError(f"{SUBJECT_FIELD}.{unknown[0][:40]}", "unknown field; a subject is {name, version} or {name, alias}")
        version = value.get("version")
        if isinstance(version, int) and not isinstance(version, bool):
            version = str(version)
        return _ref(value.get("name"), alias=value.get("alias"), version=version)
    raise RequestError(SUBJECT_FIELD, "must be a models:/ URI or an object {name, version} or {name, alias}")


def _ref(name: Any, alias: Any = None, version: Any = None) -> SubjectRef:
    for field, text in (("name", name), ("alias", alias), ("version", version)):
        if text is not None and (not isinstance(text, str) or len(text) > 256):
            raise RequestError(f"{SUBJECT_FIELD}.{field}", "must be a string of at most 256 characters")
    try:
        check_model_name(check_name(name or ""))
    except ValueError as exc:
        raise RequestError(f"{SUBJECT_FIELD}.name", str(exc)) from None
    if (alias is None) == (version is None):
        raise RequestError(SUBJECT_FIELD, "give an alias or a version (models:/NAME@ALIAS or models:/NAME/VERSION)")
    if version is not None and not (version.isascii() and version.isdigit() and 1 <= int(version) <= MAX_VERSION):
        raise RequestError(f"{SUBJECT_FIELD}.version", f"must be a version number 1..{MAX_VERSION}, got {version[:40]!r}")
    if alias is not None and not alias:
        raise RequestError(f"{SUBJECT_FIELD}.alias", "must not be empty")
    if alias is not None:
        # Checked here, not by the registry: MLflow's "Invalid alias name" (models:/x@a@b) was
        # answered as a 404, as if the subject were unknown.
        try:
            check_alias(alias)
        except ValueError as exc:
            raise RequestError(f"{SUBJECT_FIELD}.alias", str(exc)) from None
    return SubjectRef(name, alias, version)


def decode_reference_images(values: Any, category: Any, decode: DecodeConfig, max_images: int) -> ZeroShotSubject:
    """The zero-shot subject of a request: `values`, a list of 1..max_images base64 photos, each
    within the dataset's decode limits (bytes, header pixels, short side, aspect, format), and
    `category`, a short class noun. RequestError naming the field and photo otherwise."""
    if not isinstance(values, list) or not 1 <= len(values) <= max_images:
        got = f"{len(values)} photos" if isinstance(values, list) else type(values).__name__
        raise RequestError(REFERENCE_FIELD, f"must be a list of 1..{max_images} base64 photos, got {got}")
    if not isinstance(category, str) or not category.strip() or len(category) > MAX_CATEGORY_CHARS:
        raise RequestError(CATEGORY_FIELD, f"must be a class noun of 1..{MAX_CATEGORY_CHARS} characters (e.g. dog) with reference_images")
    images = [decode_photo(value, f"{REFERENCE_FIELD}[{i}]", decode) for i, value in enumerate(values)]
    return ZeroShotSubject(tuple(images), category.strip())


def decode_photo(value: Any, field: str, decode: DecodeConfig) -> PIL.Image.Image:
    """One base64 photo of a request (a data: URL too) as decoded RGB, at its own size, within
    the dataset's decode limits (bytes, header pixels, short side, aspect, format); RequestError
    naming `field` otherwise."""
    from stages.decode import decode_image
    from stages.records import Reject

    data = photo_bytes(value, field, decode)
    try:
        return PIL.Image.fromarray(decode_image(
            data, size=_short_side(data), min_side=decode.min_side, max_pixels=decode.max_pixels, max_aspect=decode.max_aspect,
        ))
    except Reject as exc:
        raise RequestError(field, exc.reason) from None


def photo_bytes(value: Any, field: str, decode: DecodeConfig) -> bytes:
    """The encoded bytes of one base64 photo of a request (a data: URL too), within
    data.decode.max_bytes; RequestError naming `field` otherwise."""
    import base64
    import binascii

    from stages.decode import check_segments
    from stages.records import Reject

    if not isinstance(value, str):
        raise RequestError(field, "must be a base64 string")
    text = value.partition(",")[2] if value.startswith("data:") else value
    # Line breaks and spaces dropped: GNU `base64 photo.jpg` and MIME break the text into lines.
    # The request body's own limit (serve.max_request_mb) bounds this copy.
    text = "".join(text.split())
    if len(text) > decode.max_bytes * 4 // 3 + 4:  # before decoding: base64 is 4 characters per 3 bytes
        raise RequestError(field, f"is larger than {decode.max_bytes} bytes (data.decode.max_bytes)")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, "is not valid base64") from None
    if not data:
        raise RequestError(field, "is empty")
    try:
        check_segments(data)  # before any header is read: PIL parses every PNG chunk before the pixels
    except Reject as exc:
        raise RequestError(field, exc.reason) from None
    return data


def header_pixels(data: bytes) -> int:
    """The pixels an encoded photo's header claims (width x height), or 0 when the header is
    unreadable (decode_photo then names the damage)."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            return img.size[0] * img.size[1]
    except Exception:  # any damage is decode_image's to name
        return 0


def _short_side(data: bytes) -> int:
    """The photo's short side from its header (so decode_image keeps its size), or 1 when the
    header is unreadable (decode_image then rejects it with its own reason)."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            return max(1, min(img.size))
    except Exception:  # any damage is decode_image's to name
        return 1


class SubjectLibrary:
    """Registered subjects fetched from the registry at `uri` and kept in host memory.

    Thread-safe: request handlers call `resolve` and `load` from worker threads.
    """

    def __init__(self, uri: str, max_subjects: int, full_budget_bytes: float) -> None:
        self.uri = uri
        self._light = LruBudget(max_subjects)
        self._full = LruBudget(full_budget_bytes)
        # "NAME/VERSION" -> why it cannot be drawn. A version's files never change, and without
        # this each request for a registered model that is no subject (a base model of several GB
        # in the same registry) or a full UNet past the budget downloaded the version again.
        self._unusable = LruBudget(max_subjects)
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def resolve(self, ref: SubjectRef) -> str:
        """The version `ref` names now (an alias is read once, here). SubjectNotFound when the
        registry holds no such subject, RegistryUnavailable when it did not answer."""
        from pipeline import tracking

        try:
            return tracking.registered_version(self.uri, ref.name, alias=ref.alias, version=ref.version)
        except tracking.RegistryNotFound as exc:
            raise SubjectNotFound(f"{ref.uri} is not registered: {exc}") from None
        except tracking.RegistryError as exc:
            raise RegistryUnavailable(_unavailable(exc)) from None

    def load(self, name: str, version: str) -> RegisteredSubject:
        """The subject's tensors, fetched from the registry on first use. SubjectUnusable for a
        version that is no subject or past the budget, found by its one download."""
        key = f"{name}/{version}"
        with self._lock:
            found = self._kept(key)
            if found is not None:
                return found
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one download per version, however many requests ask at once
            with self._lock:
                found = self._kept(key)
            if found is not None:
                return found
            try:
                subject = _fetch(self.uri, name, version)
                with self._lock:
                    self._keep(key, subject)
            except SubjectUnusable as exc:
                with self._lock:
                    self._unusable.put(key, str(exc))
                raise
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            log.info("loaded subject models:/%s (%s, %s)", key, subject.spec.method, subject.spec.category)
            return subject

    def _kept(self, key: str) -> RegisteredSubject | None:
        """The subject of `key` in memory, or None; SubjectUnusable again for one found unusable.
        Under the lock."""
        refused = self._unusable.get(key)
        if refused is not None:
            raise SubjectUnusable(refused)
        return self._light.get(key) or self._full.get(key)

    def _keep(self, key: str, subject: RegisteredSubject) -> None:
        """`subject` into its LRU: a full UNet counted in bytes, SubjectUnusable past the budget. Under the lock."""
        if not subject.full_bytes:
            self._light.put(key, subject)
            return
        try:
            self._full.put(key, subject, subject.full_bytes)
        except ValueError:
            raise SubjectUnusable(
                f"models:/{key} holds a full UNet of {subject.full_bytes / 1e9:.2f} GB, more than "
                f"serve.full_unet_budget_gb ({self._full.budget / 1e9:g} GB)"
            ) from None


def _fetch(uri: str, name: str, version: str) -> RegisteredSubject:
    """Download version `version` of `name` and read its subject folder's tensors."""
    from pipeline import tracking

    key = f"{name}/{version}"
    with tempfile.TemporaryDirectory(prefix="subjectforge-serve-") as tmp:
        try:
            root = tracking.download_model_version(uri, name, version, Path(tmp))
        except tracking.RegistryNotFound as exc:
            raise SubjectNotFound(str(exc)) from None
        except tracking.RegistryError as exc:
            raise RegistryUnavailable(_unavailable(exc)) from None
        folders = sorted(p.parent for p in root.glob("artifacts/*/subject.json"))
        if not folders:
            raise SubjectUnusable(f"models:/{key} is not a fine-tuned subject (no subject.json in its artifacts)")
        return read_subject(folders[0], name, version)


def _unavailable(exc: Exception) -> str:
    return f"the subject registry could not be read; retry later ({without_passwords(str(exc))[:300]})"


# user:password@ in a URL. tracking.uri may hold one (http://user:password@mlflow,
# postgresql://user:password@db/mlflow): registry errors name that URI, MLflow's messages the
# URL they called, and the answer to a request holds its error's message.
_URL_PASSWORD = re.compile(r"(\w[\w+.-]*://[^/\s:@]*):[^/\s@]*@")


def without_passwords(text: str) -> str:
    """`text` with the password of each URL in it as ***; before any cut, which could leave a
    password without the @ that marks it."""
    return _URL_PASSWORD.sub(r"\1:***@", text)


def read_subject(folder: Path, name: str, version: str) -> RegisteredSubject:
    """The tensors of the subject folder `folder` (pipeline/model/subject.py's layout) in memory."""
    from safetensors.torch import load_file

    from pipeline.model.checkpoint import CheckpointError
    from pipeline.model.subject import (
        EMBEDS_FILE,
        LORA_FILE,
        TEXT_ENCODER_FILE,
        UNET_FILE,
        SubjectSpec,
    )

    key = f"{name}/{version}"
    try:
        spec = SubjectSpec.read(folder)

        def read(filename: str, wanted: bool) -> dict[str, torch.Tensor] | None:
            return load_file(str(Path(folder) / filename)) if wanted else None

        embeds = read(EMBEDS_FILE, spec.traits.embeds)
        return RegisteredSubject(
            key=key, name=name, version=version, spec=spec,
            embeds=embeds["subject_embeds"] if embeds else None,
            lora=read(LORA_FILE, spec.traits.unet == "lora"),
            unet=read(UNET_FILE, spec.traits.unet == "full"),
            text_encoder=read(TEXT_ENCODER_FILE, spec.text_encoder),
        )
    except (CheckpointError, OSError, TypeError, KeyError) as exc:
        raise SubjectUnusable(f"models:/{key} cannot be read: {exc}") from None
