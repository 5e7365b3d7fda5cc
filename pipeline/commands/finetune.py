"""`subjectforge finetune`: one subject on top of a base model, with a fine-tuning method.

Flags are shorthands for `finetune.*` keys (pipeline/config.py); the training itself is the
shared loop on Ray Train (`train.*` gives resolution, precision, storage). Rerunning the same
fine-tune (same base version, method, subject, data and settings) reuses the version the
registry holds for it: nothing is trained or registered, the alias moves to it.
"""

from __future__ import annotations

import argparse

from pipeline.config import FINETUNE_METHODS, Config
from pipeline.paths import folder_flag

# flag destination -> config key (pipeline.cli.flag_overrides)
FLAGS = {
    "base": "finetune.base",
    "subject": "finetune.subject",
    "subject_id": "finetune.subject_id",
    "category": "finetune.category",
    "method": "finetune.method",
    "steps": "finetune.steps",
    "out": "finetune.out",
    "alias": "finetune.alias",
    "gpu": "train.gpu",
}


def add_arguments(parser: argparse.ArgumentParser, add_common) -> None:
    parser.add_argument("--base", help="base model: folder, Hub id or models:/NAME/VERSION (finetune.base)")
    parser.add_argument("--subject", help="dataset (root or version) or a folder of the subject's photos (finetune.subject)")
    parser.add_argument("--subject-id", help="the subject's id; registered as subjectforge-<id> (finetune.subject_id)")
    parser.add_argument("--category", help="the subject's class noun, e.g. dog (finetune.category)")
    parser.add_argument("--method", choices=FINETUNE_METHODS, help="finetune.method")
    parser.add_argument("--steps", type=int, help="optimizer steps (finetune.steps)")
    parser.add_argument("--out", type=folder_flag, help="folder of the subject artifacts (finetune.out)")
    parser.add_argument("--alias", help="registry alias of the new version (finetune.alias)")
    parser.add_argument("--gpu", action="store_true", default=None, help="train on a GPU (train.gpu)")
    add_common(parser)


def run(args: argparse.Namespace, config: Config) -> int:
    from pipeline import tracking
    from pipeline.train.finetune import finetune_subject

    registered = (config.finetune.base or config.model_path("blip_diffusion")).startswith("models:/")
    if config.tracking.enabled or registered:
        tracking.reachable_uri(config.tracking.uri, optional=not registered)
    result = finetune_subject(config)
    if result.reused:
        print(f"{result.subject_id} ({result.method}): already registered for this base, data and settings; nothing trained")
    else:
        print(f"{result.subject_id} ({result.method}): step {result.step} in {result.seconds:.1f} s")
        print(f"artifact: {result.artifact} ({result.artifact_bytes / 2**20:.2f} MiB)")
    if result.model_version:
        print(f"registered: models:/{result.model_name}/{result.model_version} (alias {config.finetune.alias})")
    return 0
