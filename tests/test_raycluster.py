"""pipeline.raycluster: how a job's own local Ray is started.

In a fresh process: ensure_ray starts Ray only where none runs yet, and the tests' shared
ray_local would be that one."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_local_ray_quiets_ray_trains_state_api_polling_in_its_workers():
    """Ray Train's PlacementGroupCleaner asks the state API every second whether the run's
    controller lives, and a Ray started without a dashboard has none to ask: each failed poll
    was a warning in the job's output (an H100 job of 12 minutes logged 640 of them). ensure_ray
    quiets that logger in every worker of the Ray it starts; its name is the cleaner module's."""
    script = textwrap.dedent(
        """
        import logging, os
        os.environ.pop("RAY_ADDRESS", None)
        import ray
        from ray.train.v2._internal.execution.controller import placement_group_cleaner
        from pipeline.config import RayConfig
        from pipeline.raycluster import ensure_ray

        ensure_ray(RayConfig(address="local", num_cpus=1))

        @ray.remote(num_cpus=0)
        def level(name):
            return logging.getLogger(name).getEffectiveLevel()

        print(placement_group_cleaner.logger.name, ray.get(level.remote(placement_group_cleaner.logger.name)))
        ray.shutdown()
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    name, level = out.stdout.split()[-2:]
    assert name == "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    assert int(level) >= 40  # logging.ERROR: the cleaner's warnings are not printed
