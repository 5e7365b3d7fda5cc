"""`subjectforge data build|refresh|verify|backgrounds`: build or incrementally refresh the
dataset, check a version against its manifest, or build a pool of background photos.

Each build or refresh is an MLflow run in `tracking.data_experiment` when a tracking server is
configured (pipeline.data.build.run_data_job); an unreachable one exits 2 before any work. A damaged
parent, an OUT that cannot be written or lies inside the source, and a version that fails
`verify` exit 2 with the reason on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import Config, check_name
from pipeline.data.bgpool import build_background_pool
from pipeline.data.build import run_data_job
from pipeline.data.report import format_summary
from pipeline.data.verify import DamagedVersion, check_version, is_dataset_folder
from pipeline.data.versions import DatasetStore
from pipeline.errors import UserError
from pipeline.paths import folder_flag

# flag destination -> config key (pipeline.cli.flag_overrides)
FLAGS = {"backgrounds": "data.backgrounds.folder"}


def add_arguments(parser: argparse.ArgumentParser, add_common) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, help_text in (
        ("build", "process every photo into a new dataset version"),
        ("refresh", "process only new or changed photos; carry the rest forward from the latest version"),
    ):
        cmd = sub.add_parser(action, help=help_text, description=help_text)
        cmd.add_argument("--source", required=True, type=folder_flag, help="folder with subjects.csv and one subfolder of photos per subject")
        cmd.add_argument("--out", required=True, type=folder_flag, help="dataset root; versions go in OUT/<version>, OUT/latest names the newest")
        cmd.add_argument(
            "--backgrounds", help="a pool built by `data backgrounds`, or a folder of images (default: the bundled procedural set)"
        )
        cmd.add_argument("--no-progress", action="store_true", help="hide Ray Data progress bars")
        if action == "refresh":
            cmd.add_argument(
                "--reprocess-damaged", action="store_true",
                help="process again the photos whose rows in the latest version fail its checksums, instead of stopping",
            )  # fmt: skip
        add_common(cmd)
    help_text = "build a versioned pool of background photos: decoded, cropped, de-duplicated, salient objects dropped"
    cmd = sub.add_parser("backgrounds", help=help_text, description=help_text)
    cmd.add_argument("--source", required=True, type=folder_flag, help="folder of background photos (every file under it is an input)")
    cmd.add_argument("--out", required=True, type=folder_flag, help="pool root; versions go in OUT/<version>, OUT/latest names the newest")
    cmd.add_argument(
        "--categories-from", metavar="SOURCE",
        help="a dataset source whose subjects.csv categories (and 'person') are looked for, when data.backgrounds.reject_prompts is unset",
    )  # fmt: skip
    add_common(cmd)
    help_text = "check a version's files against its manifest's checksums"
    cmd = sub.add_parser("verify", help=help_text, description=help_text)
    cmd.add_argument("out", metavar="OUT", help="a dataset root (its `latest` is checked) or a version folder")
    cmd.add_argument("--version", help="the version under OUT to check, e.g. v0003 (default: latest)")


def run(args: argparse.Namespace, config: Config) -> int:
    if args.action == "verify":
        return verify(Path(args.out), args.version)
    if args.action == "backgrounds":
        pool = build_background_pool(args.source, args.out, config, categories_from=args.categories_from)
        for reject in pool.manifest["rejects"]:
            print(f"rejected {reject['source_uri']}: {reject['reason']}")
        print(pool.message)
        return 0
    result = run_data_job(
        args.source, args.out, config, incremental=args.action == "refresh", progress=not args.no_progress,
        reprocess_damaged=getattr(args, "reprocess_damaged", False),
    )  # fmt: skip
    if result.manifest is not None and result.status != "unchanged":
        print(format_summary(result.manifest, result.path))
    print(result.message)
    if result.status == "failed":
        print(f"subjectforge: error: {result.message}", file=sys.stderr)
        return 1
    return 0


_VERIFY_WHAT = "give a dataset root (its latest is checked), a version folder, or --version"


def verify(out: Path, version: str | None) -> int:
    """Check one version (OUT/<version>, OUT/latest, or OUT itself as a version folder)."""
    if version:
        try:  # a name under OUT: '..' or an absolute path checked a folder elsewhere as OUT's version
            version_dir = out / check_name(version)
        except ValueError as exc:
            raise UserError(f"--version {exc}: give a version under {out}, e.g. v0003") from None
    elif latest := DatasetStore(out).latest_version():  # StoreError when `latest` is a folder or file
        version_dir = out / latest
    elif out.is_dir() and not is_dataset_folder(out):
        raise UserError(f"{out} is not a subjectforge dataset (no manifest.json, version folders or latest link): {_VERIFY_WHAT}")
    else:
        version_dir = out
    if not version_dir.is_dir():
        raise UserError(f"no dataset version at {version_dir}: {_VERIFY_WHAT}")
    check = check_version(version_dir)
    if not check.ok:
        raise DamagedVersion(check.describe())
    m = check.manifest
    what = (
        f"{check.files_checked} files match their checksums" if check.has_checksums
        else "no checksums recorded (an older release built it); its files open and hold the rows its manifest says"
    )  # fmt: skip
    print(f"{version_dir} ({m['version']}): {what}; {m['rows']} rows, {m['inputs']} inputs")
    return 0
