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
