"""The `subjectforge` command line: thin subcommands around one function each.

Each command module exposes ``add_arguments(parser)`` and ``run(args, config) -> int`` and is
listed in COMMANDS; a module's ``FLAGS`` maps its flags to the config keys they set
(`flag_overrides`). This module only parses, loads and validates the config, sets up logging and
maps failures to exit codes, so every command can also be called from a test as ``main(argv)``.

Exit codes: 0 success; 1 the job ran and failed (its own check, e.g. too many rejects, or
pipeline.errors.JobFailed, or Ray Train's TrainingFailedError); 2 bad usage, invalid
configuration or another pipeline.errors.UserError (a missing input, a server that does not
answer), with the message on stderr.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import logging
import os
import re
import sys
from collections.abc import Mapping

from pipeline import __version__
from pipeline.config import FINETUNE_METHODS, Config, ConfigError, load_config
from pipeline.errors import JobFailed, UserError

# (name, module, help): the subcommands, in the order `--help` lists them.
COMMANDS: list[tuple[str, str, str]] = [
    ("data", "pipeline.commands.data", "build or refresh the prompted-context dataset"),
    ("demo", "pipeline.commands.demo", "run the pipeline offline on the bundled sample"),
    ("generate", "pipeline.commands.generate", "generate images of a subject from reference photos"),
    ("edit", "pipeline.commands.edit", "put a subject in place of an object of a generated image or a photo"),
    ("evaluate", "pipeline.commands.evaluate", "DreamBench scores (DINO, CLIP-I, CLIP-T) of a model"),
    ("pretrain", "pipeline.commands.pretrain", "subject-representation pretraining on Ray Train"),
    ("finetune", "pipeline.commands.finetune", f"fine-tune one subject ({', '.join(FINETUNE_METHODS)})"),
    ("finetune-many", "pipeline.commands.finetune_many", "fine-tune every subject of a dataset as one Ray job"),
    ("promote", "pipeline.commands.promote", "point a registry alias (e.g. champion) at a model version"),
    ("serve", "pipeline.commands.serve", "serve zero-shot and registered subjects over HTTP (Ray Serve)"),
    ("submit", "pipeline.commands.submit", "run a subjectforge command as a job on a Ray cluster"),
    ("job", "pipeline.commands.job", "status, logs or stop of a submitted job"),
]

log = logging.getLogger("subjectforge")


def _add_common(parser: argparse.ArgumentParser) -> None:
    # The profile a run without --profile gets: the command's own config base (the demo's is
    # tiny) or the config's default.
    profile = (parser.get_default("_config_base") or {}).get("profile", Config.model_fields["profile"].default)
    group = parser.add_argument_group("configuration")
    group.add_argument("--config", metavar="FILE", help="YAML config file (layered over defaults)")
    group.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one config key, e.g. --set data.trimap.low=0.2 (repeatable)",
    )
    group.add_argument(
        "--profile",
        choices=["tiny", "real"],
        help=(
            "model profile: real (published ids or local paths) or tiny (random-weight models shipped "
            f"in the package). Default: {profile}"
        ),
    )
    group.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="subjectforge",
        description="Data and training pipeline for subject-driven text-to-image generation.",
    )
    parser.add_argument("--version", action="version", version=f"subjectforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name, help_text in COMMANDS:
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(cmd, _add_common)
        cmd.set_defaults(_module=module)
    return parser


def flag_overrides(args: argparse.Namespace, flags: Mapping[str, str]) -> list[str]:
    """`--set` overrides for the flags given: `flags` maps an argument's dest to its config key.
    Values are written as JSON, which is YAML, so a string stays a string (a subject named `123`
    or `yes`, a folder named `null`)."""
    given = {key: getattr(args, dest, None) for dest, key in flags.items()}
    return [f"{key}={_yaml_json(value)}" for key, value in given.items() if value is not None]


# An escaped backslash, or a character beyond the BMP as JSON escapes it (a surrogate pair);
# matched left to right, so the "\\ud83d" of a backslash and "ud83d" is never read as a pair.
_JSON_ESCAPED_PAIR = re.compile(r"\\\\|\\u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})")


def _yaml_json(value: object) -> str:
    """`value` as JSON that YAML reads back the same: YAML does not join JSON's surrogate pair
    escapes, so an emoji became two lone surrogates (refused as not UTF-8 text); each pair is
    written as YAML's one 8-digit escape instead."""

    def join(match: re.Match[str]) -> str:
        if match.group(1) is None:
            return match.group(0)
        code = 0x10000 + ((int(match.group(1), 16) - 0xD800) << 10) + (int(match.group(2), 16) - 0xDC00)
        return f"\\U{code:08x}"

    return _JSON_ESCAPED_PAIR.sub(join, json.dumps(value))


def resolve_config(args: argparse.Namespace) -> Config:
    """The parsed command's configuration: --config over the command's base, then --set, then
    the command's flags (its module's FLAGS), then --profile. `main` runs with it, and `submit`
    checks a job's command with it before the upload."""
    module = getattr(args, "_module", None)
    overrides = [*getattr(args, "overrides", []), *flag_overrides(args, getattr(module, "FLAGS", {}))]
    if getattr(args, "profile", None):
        overrides.append(f"profile={args.profile}")
    try:
        return load_config(getattr(args, "config", None), overrides, base=getattr(args, "_config_base", None))
    except RecursionError:
        # A YAML alias inside its own anchor (&a [*a]) is a value that holds itself; a value
        # nested thousands deep is as bad: every walk of the tree recursed until Python stopped it.
        raise ConfigError(
            "the configuration nests too deeply (a YAML alias inside its own anchor, such as &a [*a]?): "
            "check --config and --set"
        ) from None


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    try:
        config = resolve_config(args)
        return int(args._module.run(args, config) or 0)
    except UserError as exc:
        print(f"subjectforge: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        failure = _job_failure(exc)
        if failure is None:
            raise
        print(f"subjectforge: error: {failure}", file=sys.stderr)
        return 1


_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # a full disk, a quota, a read-only mount


def _job_failure(exc: Exception) -> str | None:
    """What to say of a job that ran and failed (JobFailed, a disk that is full or read-only, or
    Ray Train's TrainingFailedError, looked up only where a command loaded ray.train: importing it
    takes seconds); None for any other exception, a bug that keeps its stack trace."""
    if isinstance(exc, JobFailed):
        return str(exc)
    cause = getattr(exc, "cause", exc)  # a Ray task's error carries the worker's exception
    if isinstance(cause, OSError) and cause.errno in _NO_ROOM:
        # Jobs write into staging first, so what was published stays as it was.
        where = f": {cause.filename}" if cause.filename else ""
        return f"cannot write{where}: {os.strerror(cause.errno)}"  # Ray's wording buries it in retry advice
    train = sys.modules.get("ray.train")
    if train is not None and isinstance(exc, train.TrainingFailedError):
        return f"training failed: {exc}"
    return None


if __name__ == "__main__":
    raise SystemExit(main())
