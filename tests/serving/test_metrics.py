"""The replica's running phase means (pipeline/serving/metrics.py PhaseMeans), for GET /healthz."""

from pipeline.serving.metrics import PhaseMeans
from pipeline.serving.timings import PHASES


def test_phase_means_average_the_answered_requests():
    means = PhaseMeans()
    assert means.means() == {"requests": 0}
    means.add(dict.fromkeys(PHASES, 0.1) | {"total": 1.0})
    means.add(dict.fromkeys(PHASES, 0.3) | {"total": 2.0})
    assert means.means() == {"requests": 2, **dict.fromkeys(PHASES, 0.2), "total": 1.5}
