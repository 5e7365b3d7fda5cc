"""The evaluation job's Ray Data plans; the only place in it that declares resources.

generate: one row per (subject, prompt) with missing images -> ImageGenerator actors (one GPU
each, one actor per GPU of the cluster; one CPU actor when it has none).
score: one row per image -> ImageScorer actors (DINO and CLIP; a GPU each when there are GPUs).
The driver follows both with a progress bar counted in images.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path
from typing import Any

import ray
from ray.data import ActorPoolStrategy, DataContext
from tqdm.auto import tqdm

from pipeline.config import PROFILE_CONTROLNETS, Config, ControlConfig, EvaluateConfig
from pipeline.evaluation.benchmark import ImageTask
from pipeline.evaluation.workers import (
    CATEGORY,
    INDEX,
    INDICES,
    PATH,
    PATHS,
    PROMPT,
    SUBJECT_ID,
    TEMPLATE,
    ImageGenerator,
    ImageScorer,
)

log = logging.getLogger(__name__)


def absolute_if_local(path_or_id: str) -> str:
    """A local folder as an absolute path (actors have their own working directory); a Hub id as it is."""
    local = Path(path_or_id).expanduser()
    return str(local.resolve()) if local.exists() else path_or_id


def _cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def _resources(gpus: float) -> dict[str, float]:
    """An actor's reservation: its GPUs, or one CPU when it has none (Ray Data warns that
    asking for both is experimental)."""
    return {"num_gpus": gpus} if gpus else {"num_cpus": 1}


def _actor_resources(ev: EvaluateConfig, rows: int) -> tuple[int, float]:
    """(actors, GPUs per actor) for the generators: `auto` is one actor per GPU with one GPU
    each, or a single CPU actor when the cluster has no GPU; never more actors than rows."""
    gpus = _cluster_gpus()
    per_actor = float(ev.num_gpus) if ev.num_gpus != "auto" else (1.0 if gpus else 0.0)
    actors = ev.num_actors if ev.num_actors != "auto" else (max(1, int(gpus // per_actor)) if per_actor else 1)
    return max(1, min(actors, rows)), per_actor


def group_missing(tasks: Sequence[ImageTask]) -> list[dict[str, Any]]:
    """Images to make, grouped into one row per (subject, prompt), so each prompt's images are
    denoised together (a fuller GPU batch) and the subject embedding is shared."""
    rows = []
    for (subject_id, category, prompt, template), group in groupby(tasks, key=lambda t: (t.subject_id, t.category, t.prompt, t.template)):
        group = list(group)
        rows.append(
            {
                SUBJECT_ID: subject_id,
                CATEGORY: category,
                PROMPT: prompt,
                TEMPLATE: template,
                INDICES: [t.index for t in group],
                PATHS: [t.path for t in group],
            }
        )
    return rows


def generation_settings(config: Config) -> dict[str, Any]:
    """What decides the pixels of an image besides its subject, prompt and index."""
    from pipeline.model import DEFAULT_NEGATIVE_PROMPT

    gen = config.generate
    return {
        "steps": gen.steps,
        "guidance_scale": gen.guidance_scale,
        "negative_prompt": gen.negative_prompt if gen.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT,
        "height": gen.height,
        "width": gen.width,
        "seed": gen.seed,
        "dtype": gen.dtype,
        "batch_size": config.evaluate.batch_size,
    }


def control_settings(config: Config) -> dict[str, Any]:
    """The ControlNet of `evaluate.control`: the canny one of generate.control, and its settings.
    `window` holds the bounds of generate.control.start/end that are not their defaults (Control's
    keyword arguments), and is left out for the default window, so that a folder fingerprinted
    before the window existed still matches its settings."""
    ctl = config.generate.control
    controlnet = ctl.controlnet if ctl.controlnet is not None else PROFILE_CONTROLNETS[config.profile]["canny"]
    settings = {"controlnet": absolute_if_local(controlnet), "scale": ctl.scale, "canny_low": ctl.canny_low, "canny_high": ctl.canny_high}
    window = {key: getattr(ctl, key) for key in ("start", "end") if getattr(ctl, key) != ControlConfig.model_fields[key].default}
    return {**settings, "window": window} if window else settings


def generate_images(
    missing: Sequence[ImageTask],
    subject_photos: dict[str, list[str]],
    config: Config,
    model_path: str,
    out_dir: str,
    subject_folder: str | None = None,
    progress: bool = True,
    control: dict[str, Any] | None = None,
) -> int:
    """Make the `missing` images under `out_dir` on Ray with the model at `model_path` (and the
    fine-tuned subject in `subject_folder` applied to it); returns how many were written.
    `control` (control_settings) steers every image with a ControlNet."""
    if not missing:
        return 0
    rows = group_missing(missing)
    actors, gpus = _actor_resources(config.evaluate, len(rows))
    log.info("generating %d images (%d prompts) on %d actor(s), %g GPU each", len(missing), len(rows), actors, gpus)
    with _own_progress_bar():
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        ds = ds.map_batches(
            ImageGenerator,
            batch_size=1,
            compute=ActorPoolStrategy(size=actors),
            **_resources(gpus),
            fn_constructor_kwargs={
                "model_path": model_path,
                "out_dir": out_dir,
                "subject_photos": subject_photos,
                "settings": {**generation_settings(config), "control": control},
                "qformer_tokenizer": config.evaluate.qformer_tokenizer,
                "subject_folder": subject_folder,
            },
        )
        return len(_collect(ds, len(missing), "generating", progress))


def score_images(
    tasks: Sequence[ImageTask], subject_photos: dict[str, list[str]], config: Config, out_dir: str, progress: bool = True
) -> list[dict[str, Any]]:
    """Per-image DINO, CLIP-I and CLIP-T of every image of `tasks` (all present under
    `out_dir`), in task order."""
    ev = config.evaluate
    gpus = 1.0 if _cluster_gpus() else 0.0
    items = [{SUBJECT_ID: t.subject_id, PROMPT: t.prompt, INDEX: t.index, PATH: t.path} for t in tasks]
    with _own_progress_bar():
        ds = ray.data.from_items(items)
        ds = ds.map_batches(
            ImageScorer,
            batch_size=ev.score_batch_size,
            compute=ActorPoolStrategy(size=1),
            **_resources(gpus),
            fn_constructor_kwargs={
                "dino_path": absolute_if_local(config.model_path("dino")),
                "clip_path": absolute_if_local(config.model_path("clip")),
                "out_dir": out_dir,
                "subject_photos": subject_photos,
                "batch_size": ev.score_batch_size,
            },
        )
        scored = {row[PATH]: row for row in _collect(ds, len(items), "scoring", progress)}
    return [scored[t.path] for t in tasks]


@contextmanager
def _own_progress_bar():
    """Ray Data's bars off while a plan is built and run (a Dataset keeps the context it was
    made with): the driver shows one bar per plan, counted in images."""
    context = DataContext.get_current()
    previous, context.enable_progress_bars = context.enable_progress_bars, False
    try:
        yield
    finally:
        context.enable_progress_bars = previous


def _collect(ds: ray.data.Dataset, total: int, desc: str, progress: bool) -> list[dict[str, Any]]:
    """Run `ds` and return its rows, following them with a bar of `total` images."""
    rows = []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for row in ds.iter_rows():
            rows.append(row)
            bar.update(1)
    return rows
