"""pipeline.raycluster: how a job's own local Ray is started.

In a fresh process: ensure_ray starts Ray only where none runs yet, and the tests' shared
ray_local would be that one."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_local_ray_quiets_ray_trains_helpers_that_have_nothing_to_work_with():
    """Ray Train's PlacementGroupCleaner asks the state API every second whether the run's
    controller lives, and a Ray started without a dashboard has none to ask: each failed poll
    was a warning in the job's output (an H100 job of 12 minutes logged 640 of them); its
    resource request to an autoscaler that a local Ray lacks warned with a traceback. ensure_ray
    quiets both loggers in every worker of the Ray it starts; their names are the modules'."""
    script = textwrap.dedent(
        """
        import logging, os
        os.environ.pop("RAY_ADDRESS", None)
        import ray
        from ray.train.v2._internal.execution.controller import placement_group_cleaner
        from ray.train.v2._internal.execution.scaling_policy import autoscaling_coordinator_client
        from pipeline.config import RayConfig
        from pipeline.raycluster import ensure_ray

        ensure_ray(RayConfig(address="local", num_cpus=1))

        @ray.remote(num_cpus=0)
        def level(name):
            return logging.getLogger(name).getEffectiveLevel()

        for module in (placement_group_cleaner, autoscaling_coordinator_client):
            print(module.logger.name, ray.get(level.remote(module.logger.name)))
        ray.shutdown()
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    levels = dict(line.split() for line in out.stdout.strip().splitlines()[-2:])
    assert list(levels) == [
        "ray.train.v2._internal.execution.controller.placement_group_cleaner",
        "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",
    ]
    assert all(int(level) >= 40 for level in levels.values())  # logging.ERROR: their warnings are not printed
