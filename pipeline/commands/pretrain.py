"""`subjectforge pretrain`: subject-representation pretraining on Ray Train.

Flags are shorthands for config keys (`--data` is `train.data`, `--workers` `train.workers`,
`--gpu` `train.gpu`, `--run-name` `train.run_name`); everything else is in the `train:` and
`tracking:` sections (pipeline/config.py).
"""

from __future__ import annotations

import argparse

from pipeline.config import Config

# flag destination -> config key (pipeline.cli.flag_overrides)
FLAGS = {dest: f"train.{dest}" for dest in ("data", "workers", "gpu", "run_name")}


def add_arguments(parser: argparse.ArgumentParser, add_common) -> None:
    parser.add_argument("--data", help="dataset root (its `latest` is used) or version folder, e.g. OUT/latest")
    parser.add_argument("--workers", type=int, help="data-parallel workers (train.workers)")
    parser.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker, NCCL, bf16 (train.gpu)")
    parser.add_argument("--run-name", help="rerun with the same name to resume (train.run_name)")
    add_common(parser)


def run(args: argparse.Namespace, config: Config) -> int:
    from pipeline import tracking
    from pipeline.train.trainer import run_training

    if config.tracking.enabled:
        tracking.reachable_uri(config.tracking.uri, optional=True)
    result = run_training(config)
    print(f"{result.run_name}: step {result.step} on dataset {result.dataset.version} ({result.dataset.digest})")
    print(f"checkpoint: {result.checkpoint}")
    if result.model_version:
        print(f"registered: {config.train.register_as} version {result.model_version} (MLflow run {result.mlflow_run_id})")
    return 0
