import logging
import os

import pytest

# Progress bars and the usage-stats prompt are noise in test logs.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting Ray costs seconds), with 2 CPUs like CI.

    address="local": a bare ray.init() joins a cluster that `ray start` left on this machine
    (tests/test_jobs.py starts one), and then refuses num_cpus.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def pipeline_logs_reach_caplog():
    """An in-process training run sets up worker logging (pipeline.train.loop), which stops the
    `pipeline` logger propagating to the root, where caplog listens: undo it for each test, so a
    test's log assertions do not depend on which tests ran before it in the same process."""
    package = logging.getLogger("pipeline")
    package.propagate = True
    yield
    package.propagate = True
