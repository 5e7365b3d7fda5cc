"""What every worker process of a Ray that a job starts itself runs first (ray.init's
worker_process_setup_hook, pipeline.raycluster.ensure_ray). Kept free of the pipeline's other
imports: each Ray worker process imports this module before its first task."""

from __future__ import annotations

import logging

# Loggers of Ray Train's helpers that have nothing to work with on a Ray that ensure_ray starts
# (one node, no dashboard, no autoscaler); on a cluster they work and nothing is quieted (the
# hook is not set there).
# - The PlacementGroupCleaner (a detached actor of every TorchTrainer run) asks the state API,
#   the dashboard's, whether the run's controller still lives, once a second: each failed poll
#   was a warning in the job's output for as long as the run lasted.
# - The controller's resource request to the autoscaling coordinator waits 5 s for that actor
#   to start; on a busy small machine it does not, and a 20-line warning with its traceback
#   came before every job's first step.
QUIET_LOGGERS = (
    "ray.train.v2._internal.execution.controller.placement_group_cleaner",
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",
)


def quiet_worker_logs() -> None:
    """Only errors from QUIET_LOGGERS in this worker process."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
