"""`subjectforge demo`: the pipeline, offline, on the bundled sample with the tiny models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.build import build_dataset
from pipeline.config import BUNDLED_DATASETS_DIR, Config, ConfigError
from pipeline.report import format_summary, make_contact_sheet

SAMPLE = BUNDLED_DATASETS_DIR / "dreambench-mini"

# Embedded defaults, layered under --config/--set: offline, on the shipped tiny models.
DEMO_DEFAULTS = {"profile": "tiny"}


def add_arguments(parser: argparse.ArgumentParser, add_common) -> None:
    parser.add_argument("--out", default="subjectforge-demo", help="where the demo writes (default: ./subjectforge-demo)")
    parser.add_argument("--source", default=str(SAMPLE), help="photos to use (default: the bundled DreamBench sample)")
    add_common(parser)
    parser.set_defaults(_config_base=DEMO_DEFAULTS)


def run(args: argparse.Namespace, config: Config) -> int:
    if not Path(args.source).is_dir():
        raise ConfigError(f"demo source {args.source} not found (the bundled sample ships in a clone of the repo)")
    out = Path(args.out)
    result = build_dataset(args.source, out / "dataset", config, incremental=True)
    print()
    print(format_summary(result.manifest, result.path))
    print(result.message)
    if result.status == "failed":
        print(f"subjectforge: error: {result.message}", file=sys.stderr)
        return 1
    sheet = make_contact_sheet(result.path, out / "contact_sheet.png")
    print(f"\ndataset: {result.path} (latest: {out / 'dataset' / 'latest'})")
    if sheet:
        print(f"contact sheet: {sheet}")
    if config.profile == "tiny":
        print("note: the tiny profile uses random-weight models; run with --profile real for meaningful mattes.")
    return 0
