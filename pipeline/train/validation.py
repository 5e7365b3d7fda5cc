"""Validation while fine-tuning, and the choice of the checkpoint that is registered.

The paper fine-tunes a few dozen steps and picks the checkpoint by looking at the images; here a
fine-tune looks for itself. Every `finetune.validate_every` steps (and at the end) the hook
`hooks.Validation` draws the validation prompts with fixed seeds from the in-memory model,
scores them the way DreamBench does (pipeline/evaluation: DINO and CLIP-I against the subject's
own photos, CLIP-T against each prompt), and appends a record to <run_folder>/RECORDS_FILE. The
records survive a restart, so the driver (pipeline/train/finetune.py) picks from all of them.

Pure parts, each testable on planted scores:
- `rank_records(records, rule)`: the validations best first under `finetune.select`;
- `validations_since_best`: what `finetune.patience` counts;
- `checkpoints_to_keep`: which checkpoint folders stay within `train.keep_checkpoints` (the
  newest, for resuming, and the best ones, so the one selected at the end still exists).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from pipeline.config import Config
from pipeline.evaluation.benchmark import CLASS_FIELD, SUBJECTS_FILE, read_class_table
from pipeline.evaluation.metrics import METRICS, mean_pairwise_cosine, text_similarity
from pipeline.model.prompts import DEFAULT_NEGATIVE_PROMPT
from pipeline.paths import remove_tree

log = logging.getLogger(__name__)

RECORDS_FILE = "validation.jsonl"  # one JSON line per validation: step, checkpoint, dino, clip_i, clip_t
STEP, CHECKPOINT = "step", "checkpoint"

# Four of DreamBench's prompts per kind (datasets/dreambench/prompts_*.txt): two new scenes, then
# what tells the kinds apart, a property change for objects and an accessory or outfit for pets.
DEFAULT_PROMPTS: dict[bool, tuple[str, ...]] = {  # live subject? -> templates
    False: ("a {class} in the jungle", "a {class} with a city in the background", "a {class} floating on top of water", "a red {class}"),
    True: ("a {class} in the jungle", "a {class} with a city in the background", "a {class} wearing a red hat", "a {class} in a chef outfit"),
}
GUIDANCE_SCALE = 7.5  # BLIP-Diffusion's, as `generate` and DreamBench evaluation use by default
# `balanced`: the best DINO among checkpoints whose CLIP-T is this close to the best CLIP-T.
# Fine-tuning trades prompt fidelity for subject fidelity, and the papers report the checkpoint
# that gains DINO while CLIP-T stays within about a hundredth of its best.
BALANCED_CLIP_T_MARGIN = 0.01
_FLOAT_SLACK = 1e-9  # 0.30 - 0.01 is 0.29000000000000004 in floats: a CLIP-T of 0.29 is within


@dataclass
class ValidationPlan:
    """What the driver resolved for the Validation hook (plain values, so Ray can ship it)."""

    templates: list[str]  # as listed, e.g. "a {class} in the snow"
    prompts: list[str]  # with the class noun: what is drawn and what CLIP-T scores
    photos: str  # folder of the subject's own photos (PNG): what DINO and CLIP-I compare with
    steps: int  # denoising steps per image
    size: int  # image side, px (the training resolution)
    select: str  # finetune.select
    patience: int | None
    keep: int  # checkpoint folders kept (train.keep_checkpoints, at least the newest and the best)


def is_live(category: str) -> bool:
    """Whether DreamBench counts a subject of this class noun as live (a pet: cat, dog)."""
    from pipeline.evaluation.job import DEFAULT_BENCHMARK

    table = read_class_table(DEFAULT_BENCHMARK / SUBJECTS_FILE)
    return category.strip().lower() in {noun.lower() for noun, live in table.values() if live}


def plan_validation(config: Config, category: str, photos: Path) -> ValidationPlan:
    """The validation of a fine-tune of a `category` subject whose photos are in `photos`."""
    ft = config.finetune
    templates = list(ft.validation_prompts or DEFAULT_PROMPTS[is_live(category)])
    return ValidationPlan(
        templates=templates, prompts=[t.replace(CLASS_FIELD, category) for t in templates], photos=str(photos),
        steps=ft.validation_steps, size=config.train.resolution, select=ft.select, patience=ft.patience,
        keep=config.train.keep_checkpoints,
    )


@torch.no_grad()
def draw_images(method: Any, plan: ValidationPlan) -> list[PIL.Image.Image]:
    """One image per prompt from the fine-tuning `method` (pipeline/train/methods.py) as it is
    now, drawn as DreamBench evaluation draws a fine-tuned subject; prompt i from seed i."""
    from pipeline.evaluation.workers import draw_prompt

    spec = method.spec()
    settings = {"steps": plan.steps, "guidance_scale": GUIDANCE_SCALE, "negative_prompt": DEFAULT_NEGATIVE_PROMPT,
                "height": plan.size, "width": plan.size, "batch_size": None}
    was_training = method.training
    method.eval()
    try:
        with method.averaged():  # the EMA weights when the run keeps them: what would be registered
            embeds = method.subject_embeds.detach() if method.subject_embeds is not None else None
            return [
                image
                for seed, (prompt, template) in enumerate(zip(plan.prompts, plan.templates, strict=True))
                for image in draw_prompt(
                    method.model, embeds, spec.identifier, spec.category, prompt, template, [seed], settings, spec.ti_property
                )
            ]
    finally:
        method.train(was_training)


class Scorer:
    """DINO and CLIP (models.dino, models.clip) loaded once, the subject's photos encoded once;
    `score(images, prompts)` -> {"dino", "clip_i", "clip_t"}, each a mean cosine in [-1, 1]."""

    def __init__(self, config: Config, photos: Sequence[PIL.Image.Image], device: torch.device) -> None:
        from pipeline.evaluation.features import ClipFeatures, DinoFeatures

        self.dino = DinoFeatures(config.model_path("dino"), device)
        self.clip = ClipFeatures(config.model_path("clip"), device)
        self.real_dino, self.real_clip = self.dino.encode_images(photos), self.clip.encode_images(photos)

    def score(self, images: Sequence[PIL.Image.Image], prompts: Sequence[str]) -> dict[str, float]:
        clip = self.clip.encode_images(images)  # (N, P)
        return {
            "dino": mean_pairwise_cosine(self.dino.encode_images(images), self.real_dino),
            "clip_i": mean_pairwise_cosine(clip, self.real_clip),
            "clip_t": float(text_similarity(clip, self.clip.encode_texts(prompts)).mean()),
        }


def read_photos(folder: str | Path) -> list[PIL.Image.Image]:
    return [PIL.Image.open(p).convert("RGB") for p in sorted(Path(folder).glob("*.png"))]


# ---------------------------------------------------------------------------------------------
# Records and the rules over them

def read_records(run_folder: str | Path) -> list[dict[str, Any]]:
    """The validations recorded in the run folder, in step order ([] when none)."""
    path = Path(run_folder) / RECORDS_FILE
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(records, key=lambda r: r[STEP])


def write_records(run_folder: str | Path, records: Sequence[dict[str, Any]]) -> None:
    """Replace the run's records (a restart drops those of the steps it replays)."""
    path = Path(run_folder) / RECORDS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def rank_records(records: Sequence[dict[str, Any]], rule: str) -> list[dict[str, Any]]:
    """The validations best first under `rule` (finetune.select); ties go to the earlier step
    (fewer steps, less drift from the base).

    last: newest first. dino, clip_i, clip_t: that score. balanced: the checkpoints whose CLIP-T
    is within BALANCED_CLIP_T_MARGIN of the best CLIP-T, by DINO; then the others by CLIP-T."""
    if rule == "last":
        return sorted(records, key=lambda r: -r[STEP])
    if rule in METRICS:
        return sorted(records, key=lambda r: (-r[rule], r[STEP]))
    if rule != "balanced":
        raise ValueError(f"unknown selection rule {rule!r}")
    best_t = max((r["clip_t"] for r in records), default=0.0)

    def key(r: dict[str, Any]) -> tuple:
        eligible = best_t - r["clip_t"] <= BALANCED_CLIP_T_MARGIN + _FLOAT_SLACK
        return (not eligible, -(r["dino"] if eligible else r["clip_t"]), r[STEP])

    return sorted(records, key=key)


def validations_since_best(records: Sequence[dict[str, Any]], rule: str) -> int:
    """Validations after the one `rule` picks now (0 when the newest is the best)."""
    if not records:
        return 0
    best = rank_records(records, rule)[0][STEP]
    return sum(r[STEP] > best for r in records)


def checkpoints_to_keep(records: Sequence[dict[str, Any]], rule: str, keep: int, newest: str) -> set[str]:
    """Checkpoint names to keep: `newest` (a restart resumes from it) and the best validated
    ones under `rule`, `keep` in all but never fewer than those two."""
    kept = {newest}
    for rank, record in enumerate(rank_records(records, rule)):
        if rank > 0 and len(kept) >= keep:
            break
        kept.add(record[CHECKPOINT])
    return kept


def prune_checkpoints(run_folder: str | Path, kept: set[str]) -> list[str]:
    """Delete the run's checkpoint folders (step-*) not in `kept`; returns the names deleted."""
    deleted = []
    for folder in sorted(Path(run_folder).glob("step-*")):
        if folder.is_dir() and folder.name not in kept:
            remove_tree(folder, run_folder)
            deleted.append(folder.name)
    return deleted
