"""DreamBench as data: subjects, their class nouns, the prompt lists and the images to make.

The benchmark's tables live in `datasets/dreambench/` (see its README); the real photos of each
subject in a folder with one subfolder per subject (by default the bundled
`datasets/dreambench-mini/`). Everything here is pure file reading and naming; a problem with
the inputs is a ConfigError that names the file (and line), raised before any worker starts.
"""

from __future__ import annotations

import csv
import io
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError

SUBJECTS_FILE = "subjects.csv"
OBJECT_PROMPTS_FILE = "prompts_object.txt"
LIVE_PROMPTS_FILE = "prompts_live.txt"
CLASS_FIELD = "{class}"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_SLUG_LIMIT = 80


@dataclass(frozen=True)
class Subject:
    """One benchmark subject: its class noun, whether it is live (a pet) and its real photos."""

    subject_id: str
    category: str
    live: bool
    photos: tuple[str, ...]


@dataclass(frozen=True)
class ImageTask:
    """One image to generate and score: image `index` of `prompt` for `subject_id`.

    `path` is relative to the job's output folder; the image exists there exactly when it is done.
    """

    subject_id: str
    category: str
    prompt: str  # the full text with the class noun, e.g. "a dog in the jungle" (what CLIP-T scores)
    index: int
    path: str
    template: str  # the prompt as listed, e.g. "a {class} in the jungle"


def _read_text(path: Path) -> str:
    """A UTF-8 text file's text; ConfigError naming it when it is in another encoding."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_class_table(path: str | Path) -> dict[str, tuple[str, bool]]:
    """`subjects.csv` (subject_id,class,live) -> {subject_id: (class noun, live)}."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"evaluate.benchmark: {path} not found")
    with io.StringIO(_read_text(path), newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"subject_id", "class", "live"} - set(reader.fieldnames or ())
        if missing:
            raise ConfigError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        table = {}
        for line, row in enumerate(reader, start=2):
            live = row["live"].strip().lower()
            if not row["subject_id"].strip() or not row["class"].strip() or live not in ("true", "false"):
                raise ConfigError(f"{path}:{line}: need a subject_id, a class and live=true|false, got {row}")
            table[row["subject_id"].strip()] = (row["class"].strip(), live == "true")
    return table


def read_prompts(path: str | Path) -> list[str]:
    """Prompt templates, one per line, each starting with "a " and holding `{class}`.

    "a " first because BLIP-Diffusion inserts the subject right after it (the place of
    DreamBench's unique token). Blank lines and `#` comments are skipped; templates whose
    file names would clash (same text up to case and punctuation) are an error.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompt file {path} not found")
    prompts, slugs = [], {}
    for line, raw in enumerate(_read_text(path).splitlines(), start=1):
        text = " ".join(raw.split())
        if not text or text.startswith("#"):
            continue
        if CLASS_FIELD not in text or not text.startswith("a "):
            raise ConfigError(f"{path}:{line}: a prompt must start with 'a ' and contain {CLASS_FIELD}, got {text!r}")
        slug = prompt_slug(text)
        if slug in slugs:
            raise ConfigError(f"{path}:{line}: {text!r} repeats line {slugs[slug]}")
        slugs[slug] = line
        prompts.append(text)
    if not prompts:
        raise ConfigError(f"prompt file {path} holds no prompts")
    return prompts


def load_subjects(photos_dir: str | Path, class_table: dict[str, tuple[str, bool]], subject_ids: Sequence[str] | None) -> list[Subject]:
    """The subjects to evaluate, in `subject_ids` order (default: every subject folder in
    `photos_dir` that the class table knows, sorted), each with its sorted photo paths
    (absolute), every one of which must open as an image."""
    photos_dir = Path(photos_dir).expanduser().resolve()  # absolute: workers have their own cwd
    if not photos_dir.is_dir():
        raise ConfigError(f"evaluate.photos: {photos_dir} is not a folder")
    if subject_ids is None:
        subject_ids = sorted(p.name for p in photos_dir.iterdir() if p.is_dir() and p.name in class_table)
        if not subject_ids:
            raise ConfigError(f"evaluate.photos: no folder in {photos_dir} is a subject of the class table")
    if not subject_ids:
        raise ConfigError("evaluate.subjects: the list is empty")
    if len(set(subject_ids)) != len(subject_ids):
        raise ConfigError(f"evaluate.subjects: repeated subject in {list(subject_ids)}")
    subjects = []
    for subject_id in subject_ids:
        if subject_id not in class_table:
            raise ConfigError(f"evaluate.subjects: {subject_id!r} is not in the class table (known: {', '.join(sorted(class_table))})")
        folder = photos_dir / subject_id
        named = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not named:
            raise ConfigError(f"evaluate.subjects: no photos of {subject_id!r} in {folder}")
        # A photo's name on something else (a FIFO, a folder, a dangling link) stops the job like
        # an unreadable photo: the subject would be scored against fewer photos than it has.
        for path in named:
            if not path.is_file():
                raise ConfigError(f"evaluate.photos: {path} is not a regular file")
        photos = [str(p) for p in named]
        for photo in photos:
            _check_image(photo)
        category, live = class_table[subject_id]
        subjects.append(Subject(subject_id, category, live, tuple(photos)))
    return subjects


def _check_image(path: str) -> None:
    """A real photo that cannot be read is a broken benchmark, so it stops the job up front.
    Decoded whole, as the workers read it (workers.load_rgb): a truncated JPEG's header is
    whole, and a header check passed it to fail in a generator actor."""
    from pipeline.model.image_processing import read_rgb

    read_rgb(path, ConfigError, "evaluate.photos:")


def build_tasks(subjects: Sequence[Subject], prompts_for: dict[str, list[str]], images_per_prompt: int) -> list[ImageTask]:
    """Every image of the run, subject by subject, prompt by prompt, in index order.

    prompts_for: {subject_id: templates}; image k of a prompt lives at
    `images/<subject_id>/<prompt slug>/<k>.png`, so it is named by what it shows and a changed
    prompt list never reuses an image made for another prompt.
    """
    tasks = []
    for subject in subjects:
        for template in prompts_for[subject.subject_id]:
            prompt = template.replace(CLASS_FIELD, subject.category)
            folder = f"images/{subject.subject_id}/{prompt_slug(template)}"
            tasks += [ImageTask(subject.subject_id, subject.category, prompt, k, f"{folder}/{k}.png", template) for k in range(images_per_prompt)]
    return tasks


def prompt_slug(text: str) -> str:
    """A file-name-safe name of a prompt: "a {class} in the jungle" -> "a-class-in-the-jungle";
    long ones are cut and end in a checksum of the full text so they stay distinct."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if len(slug) > _SLUG_LIMIT:
        slug = f"{slug[:_SLUG_LIMIT - 9]}-{zlib.crc32(text.encode()):08x}"
    return slug
