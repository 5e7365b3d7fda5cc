"""`subjectforge job status|logs|stop JOB_ID --address URL`: look after a submitted job."""

from __future__ import annotations

import argparse

from pipeline.config import Config
from pipeline.jobs import cluster_errors, connect, follow_logs, read_auth_token


def add_arguments(parser: argparse.ArgumentParser, add_common) -> None:
    parser.add_argument("action", choices=["status", "logs", "stop"])
    parser.add_argument("job_id")
    parser.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://head:8265")
    parser.add_argument("--follow", action="store_true", help="with logs: keep streaming until the job ends")
    parser.add_argument("--auth-token-file", help="token file for a cluster with token authentication")


def run(args: argparse.Namespace, config: Config) -> int:
    client = connect(args.address, read_auth_token(args.auth_token_file))
    with cluster_errors(args.address, args.job_id):
        return _act(client, args)


def _act(client, args: argparse.Namespace) -> int:
    if args.action == "status":
        info = client.get_job_info(args.job_id)
        print(f"{args.job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
    elif args.action == "logs" and args.follow:
        follow_logs(client, args.job_id)
    elif args.action == "logs":
        print(client.get_job_logs(args.job_id), end="")
    else:
        stopped = client.stop_job(args.job_id)
        print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0
