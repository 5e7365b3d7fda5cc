import logging
import os

import pytest

# Progress bars and the usage-stats prompt are noise in test logs.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Data's Parquet reader (datasource V2, Ray 2.60) asks for 32 FooterReader actors in every
# execution that lists files, and a training run on CPU starts one execution per epoch (one per
# step on the tests' 4 rows). Each actor that starts is a Python process of its own, which the
# 2-core CI box pays for in the Ray Train tests (test_multinode, tests/train/test_trainer.py).
# The tests' datasets are a Parquet file or a few, whose footers one actor reads; the rows read
# are the same.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
# Ray Train starts a PreemptionWatcher actor with every worker group, a process of its own that
# watches the nodes for draining (spot instances); the tests' one local node is never drained,
# and Ray starts 2 worker processes at a time, so it held back the feed's SplitCoordinator.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


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


_session_status: list[int] = []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    _session_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave with pytest's own status once it has reported, without the interpreter's
    finalization. A CI run on 2026-12-06 passed every test, printed its summary and then died
    with a segmentation fault in that finalization (status 139; no Python frame, the rerun was
    clean): native threads of the libraries the session loaded (Ray's core worker, torch's
    compile workers) being torn down after the modules they call into. Every fixture has
    cleaned up by now (Ray is shut down by `ray_local`), so nothing is lost by skipping it.
    SUBJECTFORGE_TEST_FINALIZE=1 keeps the normal exit, to chase such a crash."""
    if _session_status and os.environ.get("SUBJECTFORGE_TEST_FINALIZE") != "1":
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_session_status[-1])
