"""`subjectforge serve`: the Ray Serve app for zero-shot and registered subjects, until Ctrl-C.

Joins the configured Ray cluster (ray.address) or starts a local one, starts Serve's HTTP
proxy on serve.host:serve.port and runs the app (pipeline/serving/app.py). On a cluster that
runs it for good, deploy infra/rayservice.yaml instead.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from pipeline.config import Config

log = logging.getLogger(__name__)

# flag destination -> config key (pipeline.cli.flag_overrides)
FLAGS = {"host": "serve.host", "port": "serve.port", "replicas": "serve.num_replicas"}


def add_arguments(parser: argparse.ArgumentParser, add_common) -> None:
    parser.add_argument("--host", help="address to listen on (config: serve.host; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, help="HTTP port (config: serve.port)")
    parser.add_argument("--replicas", type=int, help="model replicas, one per GPU (config: serve.num_replicas)")
    add_common(parser)


def run(args: argparse.Namespace, config: Config) -> int:
    from ray import serve

    from pipeline import tracking
    from pipeline.raycluster import ensure_ray
    from pipeline.serving.app import APP_NAME, build_app

    tracking.reachable_uri(config.tracking.uri)  # registered subjects come from it: fail now, not per request
    cfg = config.serve
    ensure_ray(config.ray)
    serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s})
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        print(f"serving on http://{cfg.host}:{cfg.port}/ (POST /v1/generate, GET /v1/subjects, /healthz); Ctrl-C stops")
        stop.wait()
    finally:
        serve.delete(APP_NAME)
    return 0
