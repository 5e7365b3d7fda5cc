"""`subjectforge submit --address URL [--wait] -- COMMAND...`: run a command as a Ray job."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from pipeline.config import REPO_DIR, Config, ConfigError
from pipeline.errors import UserError
from pipeline.jobs import (
    cluster_errors,
    connect,
    exit_code,
    follow_logs,
    parse_env,
    read_auth_token,
    stage_upload,
    submit,
    wait,
)


def add_arguments(parser: argparse.ArgumentParser, add_common) -> None:
    parser.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://head:8265")
    parser.add_argument("--wait", action="store_true", help="stream the job's log and exit with its exit code")
    parser.add_argument("--no-upload", action="store_true", help="do not upload this checkout; run the installed `subjectforge` on the cluster")
    parser.add_argument(
        "--include", action="append", default=[], metavar="PATH",
        help="also upload this file or folder of the checkout, e.g. a config file (repeatable)",
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY[=VALUE]",
        help="KEY=VALUE: a variable sent with the job; KEY alone: the cluster provides it (secrets) and the job "
        "stops if it is unset (repeatable)",
    )
    parser.add_argument("--submission-id", help="job id to use (default: Ray picks one)")
    parser.add_argument("--auth-token-file", help="token file for a cluster with token authentication (else RAY_AUTH_TOKEN / ~/.ray/auth_token)")
    add_common(parser)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then a subjectforge command, e.g. -- data refresh --source ...")


def validate_command(command: list[str]) -> list[str]:
    """Drop the leading `--` and parse the command with the real parser, so a typo fails here
    (UserError) rather than minutes later on the cluster."""
    from pipeline.cli import build_parser

    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UserError("submit needs a command after --, e.g. subjectforge submit --address URL -- data build ...")
    if command[0] in ("submit", "job"):
        raise UserError(f"`{command[0]}` cannot be submitted as a job")
    try:
        args = build_parser().parse_args(command)
    except SystemExit as exc:
        raise UserError(f"the submitted command is not valid: subjectforge {' '.join(command)}") from exc
    check_config(args)
    return command


def check_config(args: argparse.Namespace) -> None:
    """Resolve the submitted command's configuration as `main` will on the cluster, so that a
    misspelt `--set` key or a value of the wrong type is a ConfigError naming it here, not a
    failed job after the upload. A --config file this machine does not have is the cluster's
    (with --no-upload, or an absolute path on its volume): its --set keys are checked against
    the defaults instead, and the file is left to the job."""
    from pipeline.cli import resolve_config

    if args.config and not Path(args.config).exists():
        args.config = None
    resolve_config(args)


def run(args: argparse.Namespace, config: Config) -> int:
    command = validate_command(args.command)
    env = parse_env(args.env)
    if args.no_upload and args.include:
        raise ConfigError("--include needs the upload; drop --no-upload")
    with tempfile.TemporaryDirectory(prefix="subjectforge-upload-") as staging:
        upload = None
        if not args.no_upload:
            upload = stage_upload(REPO_DIR, args.include, Path(staging), config.submit.max_upload_mb)
            print(f"upload: {upload.describe()} from {REPO_DIR}")
        client = connect(args.address, read_auth_token(args.auth_token_file))
        with cluster_errors(args.address, args.submission_id):
            job_id = submit(client, command, upload=upload, env=env, submission_id=args.submission_id)
    print(f"job: {job_id}")
    if not args.wait:
        print(f"follow it with: subjectforge job logs {job_id} --address {args.address} --follow")
        return 0
    with cluster_errors(args.address, job_id):
        follow_logs(client, job_id)
        status = wait(client, job_id)
        code = exit_code(client, job_id)
    print(f"job {job_id}: {status} (exit {code})")
    return code
