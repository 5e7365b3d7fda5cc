"""What the evaluation job writes: score tables (CSV), a markdown summary and image grids."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.ImageOps

from pipeline.evaluation.metrics import METRICS

SCORES_CSV = "scores.csv"  # one row per subject, then "overall"
IMAGES_CSV = "images.csv"  # one row per generated image
SUMMARY_MD = "summary.md"
GRIDS_DIR = "grids"
OVERALL = "overall"
METRIC_TITLES = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}

# DreamBench results as published (BLIP-Diffusion, Li et al., 2023, table 1; DreamBooth, Ruiz
# et al., 2023): (DINO, CLIP-I, CLIP-T). "Real images" compares real photos with each other.
REFERENCE_SCORES: tuple[tuple[str, float, float, float | None], ...] = (
    ("Real images", 0.774, 0.885, None),
    ("DreamBooth (Stable Diffusion)", 0.668, 0.803, 0.305),
    ("Textual Inversion", 0.569, 0.780, 0.255),
    ("BLIP-Diffusion, zero-shot", 0.594, 0.779, 0.300),
    ("BLIP-Diffusion, fine-tuned", 0.670, 0.805, 0.302),
)


def write_image_scores(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """images.csv: subject_id, prompt, index, path, dino, clip_i, clip_t per generated image."""
    fields = ["subject_id", "prompt", "index", "path", *METRICS]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **{m: f"{float(row[m]):.6f}" for m in METRICS}})


def write_subject_scores(path: Path, per_subject: Mapping[str, Mapping[str, float]], overall: Mapping[str, float], images: Mapping[str, int]) -> None:
    """scores.csv: subject_id, images, dino, clip_i, clip_t per subject, then the overall row."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject_id", "images", *METRICS])
        for subject, scores in per_subject.items():
            writer.writerow([subject, images[subject], *(f"{scores[m]:.6f}" for m in METRICS)])
        writer.writerow([OVERALL, sum(images.values()), *(f"{overall[m]:.6f}" for m in METRICS)])


def summary_markdown(
    per_subject: Mapping[str, Mapping[str, float]],
    overall: Mapping[str, float],
    info: Mapping[str, Any],
    tiny: bool,
) -> str:
    """The one-page report: run settings, scores per subject and overall, the published table."""
    lines = ["# DreamBench evaluation", ""]
    lines += [f"- {key}: `{value}`" for key, value in info.items()]
    if tiny:
        lines += ["", "**Tiny profile: random-weight models, so these numbers are meaningless.**"]
    head = "| subject | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " |"
    rule = "| --- |" + " ---: |" * len(METRICS)
    lines += ["", "## Scores", "", head, rule]
    lines += [f"| {s} | " + " | ".join(f"{scores[m]:.3f}" for m in METRICS) + " |" for s, scores in per_subject.items()]
    lines += ["| **overall** | " + " | ".join(f"**{overall[m]:.3f}**" for m in METRICS) + " |"]
    lines += ["", "## Published results (30 subjects x 25 prompts x 4 images)", "", head.replace("subject", "method"), rule]
    for name, *scores in REFERENCE_SCORES:
        lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in scores) + " |")
    lines += [
        "",
        "DINO and CLIP-I: mean cosine between generated and real photos of the subject (subject fidelity);",
        "CLIP-T: cosine between each image and its prompt (prompt fidelity). Grids: `grids/<subject>.png`,",
        "first row the real photos, then one row per prompt in the order of `images.csv`.",
        "",
    ]
    return "\n".join(lines)


def make_subject_grid(real: Sequence[PIL.Image.Image], rows: Sequence[Sequence[PIL.Image.Image]], thumbnail: int) -> PIL.Image.Image:
    """A white sheet of `thumbnail`-px squares: the real photos on top, then one row per prompt
    (its generated images). Each image is scaled to fit its square, keeping its aspect."""
    all_rows = [list(real), *[list(r) for r in rows]]
    columns = max(len(r) for r in all_rows)
    sheet = PIL.Image.new("RGB", (columns * thumbnail, len(all_rows) * thumbnail), "white")
    for y, row in enumerate(all_rows):
        for x, image in enumerate(row):
            cell = PIL.ImageOps.contain(image.convert("RGB"), (thumbnail, thumbnail))
            offset = ((thumbnail - cell.width) // 2, (thumbnail - cell.height) // 2)
            sheet.paste(cell, (x * thumbnail + offset[0], y * thumbnail + offset[1]))
    return sheet
