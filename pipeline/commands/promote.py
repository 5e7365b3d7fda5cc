"""`subjectforge promote NAME --alias champion`: point a registry alias at a model version.

Without --version the version that --from-alias names (default: finetune.alias, `candidate`)
is promoted; the alias moves off whichever version held it before.
"""

from __future__ import annotations

import argparse

from pipeline.config import Config, ConfigError, check_alias, check_new_alias


def add_arguments(parser: argparse.ArgumentParser, add_common) -> None:
    parser.add_argument("name", help="registered model, e.g. subjectforge-dog")
    parser.add_argument("--alias", required=True, help="alias to set, e.g. champion")
    parser.add_argument("--version", help="model version (default: the one --from-alias names)")
    parser.add_argument("--from-alias", help="promote the version this alias names (default: finetune.alias)")
    add_common(parser)


def run(args: argparse.Namespace, config: Config) -> int:
    from pipeline import tracking

    _check_flags(args)
    uri = tracking.reachable_uri(config.tracking.uri)
    from_alias = None if args.version else (args.from_alias or config.finetune.alias)
    version = tracking.set_alias(uri, args.name, args.alias, args.version, from_alias)
    print(f"{args.name}@{args.alias} -> version {version}")
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    """ConfigError naming the flag the registry would refuse, before any store is opened (MLflow
    refused a malformed alias only at set_alias)."""
    from pipeline import tracking

    for flag, check, value in (
        ("NAME", tracking.check_model_name, args.name),
        ("--alias", check_new_alias, args.alias),
        ("--from-alias", check_alias, args.from_alias),
        ("--version", tracking.check_version_number, args.version),
    ):
        if value is None:
            continue
        try:
            check(value)
        except ValueError as exc:
            raise ConfigError(f"{flag}: {exc}") from None
