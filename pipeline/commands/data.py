"""`subjectforge data build|refresh`: build or incrementally refresh the dataset.

Each run is an MLflow run in `tracking.data_experiment` when a tracking server is configured
(pipeline.build.run_data_job); an unreachable one exits 2 before any work.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.build import run_data_job
from pipeline.config import Config, ConfigError
from pipeline.report import format_summary
from pipeline.sources import SourceError
from pipeline.tracking import TrackingUnavailable


def add_arguments(parser: argparse.ArgumentParser, add_common) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, help_text in (
        ("build", "process every photo into a new dataset version"),
        ("refresh", "process only new or changed photos; carry the rest forward from the latest version"),
    ):
        cmd = sub.add_parser(action, help=help_text, description=help_text)
        cmd.add_argument("--source", required=True, help="folder with subjects.csv and one subfolder of photos per subject")
        cmd.add_argument("--out", required=True, help="dataset root; versions go in OUT/<version>, OUT/latest names the newest")
        cmd.add_argument("--backgrounds", help="folder of background images (default: the bundled procedural set)")
        cmd.add_argument("--no-progress", action="store_true", help="hide Ray Data progress bars")
        add_common(cmd)


def apply_arguments(args: argparse.Namespace) -> None:
    if getattr(args, "backgrounds", None):
        # JSON is YAML: the path stays a string even if it reads like a number or a boolean.
        args.overrides.append(f"data.backgrounds={json.dumps(args.backgrounds)}")


def run(args: argparse.Namespace, config: Config) -> int:
    try:
        result = run_data_job(args.source, args.out, config, incremental=args.action == "refresh", progress=not args.no_progress)
    except SourceError as exc:
        raise ConfigError(str(exc)) from None
    except TrackingUnavailable as exc:
        raise ConfigError(f"{exc}; set tracking.uri / $MLFLOW_TRACKING_URI to a live server, or --set tracking.enabled=false") from None
    if result.manifest is not None and result.status != "unchanged":
        print(format_summary(result.manifest, result.path))
    print(result.message)
    if result.status == "failed":
        print(f"subjectforge: error: {result.message}", file=sys.stderr)
        return 1
    return 0
