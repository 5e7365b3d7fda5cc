"""`subjectforge evaluate`: DreamBench scores (DINO, CLIP-I, CLIP-T) of a model.

Flags are shorthands for `evaluate:` config keys (`--model` is `evaluate.model`, ...); images
are made with the `generate:` settings (`--set generate.steps=25`). Rerunning the same command
resumes: images already in the output folder are not made again.
"""

from __future__ import annotations

import argparse
import logging

from pipeline.config import Config
from pipeline.paths import folder_flag

log = logging.getLogger(__name__)

# flag destination -> config key (pipeline.cli.flag_overrides)
FLAGS = {dest: f"evaluate.{dest}" for dest in ("model", "subjects", "prompts", "images_per_prompt", "photos", "out")}


def add_arguments(parser: argparse.ArgumentParser, add_common) -> None:
    parser.add_argument(
        "--model", help="checkpoint folder or Hub id, or a fine-tuned subject models:/NAME@ALIAS (evaluate.model)"
    )
    parser.add_argument("--subjects", nargs="+", metavar="ID", help="subject ids (evaluate.subjects; default: all with photos)")
    parser.add_argument("--prompts", metavar="FILE", help="one prompt file for every subject (evaluate.prompts)")
    parser.add_argument("--images-per-prompt", type=int, metavar="N", help="evaluate.images_per_prompt (default: 4)")
    parser.add_argument("--photos", metavar="DIR", help="real photos, a folder per subject (evaluate.photos)")
    parser.add_argument("--out", metavar="DIR", type=folder_flag, help="output folder (evaluate.out; default: subjectforge-eval/<model>)")
    add_common(parser)


def run(args: argparse.Namespace, config: Config) -> int:
    from pipeline import tracking
    from pipeline.evaluation.job import log_to_mlflow, run_evaluation
    from pipeline.evaluation.report import METRIC_TITLES

    registered = (config.evaluate.model or config.model_path("blip_diffusion")).startswith("models:/")
    if config.tracking.enabled or registered:
        tracking.reachable_uri(config.tracking.uri, optional=not registered)
    result = run_evaluation(config, logger=log_to_mlflow if config.tracking.enabled else None)
    print(f"{result.out}: {result.generated} image(s) generated, {result.reused} reused")
    if result.mlflow_run_id:
        print(f"MLflow run {result.mlflow_run_id}")
    print("  ".join(f"{METRIC_TITLES[m]} {v:.3f}" for m, v in result.overall.items()) + f"  ({result.out / 'summary.md'})")
    if config.profile == "tiny":
        print("note: the tiny profile has random weights, so these numbers are meaningless; use --profile real.")
    return 0
