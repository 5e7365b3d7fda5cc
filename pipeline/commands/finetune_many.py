"""`subjectforge finetune-many`: fine-tune every subject of a dataset as one Ray job.

Prints a table of subjects with status, attempts, time and artifact size (also written to
<finetune.out>/finetune-many.csv) and exits 1 when any subject failed after its retries.
With `--affected` and no affected subject it says so and exits 0 without starting Ray.
"""

from __future__ import annotations

import argparse

from pipeline.config import FINETUNE_METHODS, Config
from pipeline.paths import folder_flag

# flag destination -> config key (pipeline.cli.flag_overrides)
FLAGS = {
    "base": "finetune.base", "data": "finetune.subject", "subjects": "finetune.subjects", "affected": "finetune.affected_only",
    "method": "finetune.method", "steps": "finetune.steps", "out": "finetune.out", "gpu": "train.gpu",
}


def add_arguments(parser: argparse.ArgumentParser, add_common) -> None:
    parser.add_argument("--base", help="base model: folder, Hub id or models:/NAME/VERSION (finetune.base)")
    parser.add_argument("--data", required=True, help="dataset root or version folder, e.g. OUT/latest (finetune.subject)")
    parser.add_argument("--subjects", type=_ids, help="comma-separated subject ids (finetune.subjects; default: all)")
    parser.add_argument(
        "--affected", action="store_true", default=None,
        help="only subjects whose photos the version's build added, changed or removed (finetune.affected_only)",
    )
    parser.add_argument("--method", choices=FINETUNE_METHODS, help="finetune.method")
    parser.add_argument("--steps", type=int, help="optimizer steps per subject (finetune.steps)")
    parser.add_argument("--out", type=folder_flag, help="folder of the subject artifacts (finetune.out)")
    parser.add_argument("--gpu", action="store_true", default=None, help="train on GPUs (train.gpu; finetune.num_gpus each)")
    add_common(parser)


def _ids(text: str) -> list[str] | None:
    """--subjects a,b: the ids, or None (every subject) when none is named."""
    return [s.strip() for s in text.split(",") if s.strip()] or None


def run(args: argparse.Namespace, config: Config) -> int:
    from pipeline import tracking
    from pipeline.train.many import finetune_many, format_table

    registered = (config.finetune.base or config.model_path("blip_diffusion")).startswith("models:/")
    if config.tracking.enabled or registered:
        tracking.reachable_uri(config.tracking.uri, optional=not registered)
    rows = finetune_many(config)
    if not rows:
        print(f"no affected subjects in {config.finetune.subject}: nothing to fine-tune")
        return 0
    print(format_table(rows))
    failed = [r.subject_id for r in rows if r.status == "failed"]
    done = [r for r in rows if r.status in ("ok", "reused")]
    print(f"{len(done)} of {len(rows)} subjects fine-tuned" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
