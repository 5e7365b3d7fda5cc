"""What every worker process of a Ray that a job starts itself runs first (ray.init's
worker_process_setup_hook, pipeline.raycluster.ensure_ray). Kept free of the pipeline's other
imports: each Ray worker process imports this module before its first task."""

from __future__ import annotations

import logging

# Ray Train's PlacementGroupCleaner (a detached actor of every TorchTrainer run) asks the state
# API whether the run's controller still lives, once a second; the state API is the dashboard's,
# and a Ray started by ensure_ray has no dashboard. Each failed poll was a warning in the job's
# output for as long as the run lasted, and the cleaner cannot do its work there anyway. On a
# cluster with a dashboard the cleaner works and nothing is quieted (the hook is not set).
QUIET_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_worker_logs() -> None:
    """Only errors from QUIET_LOGGERS in this worker process."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
