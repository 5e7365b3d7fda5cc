"""The replica's running phase and batch means (pipeline/serving/metrics.py), for GET /healthz."""

from pipeline.serving.metrics import BatchMeans, PhaseMeans
from pipeline.serving.timings import PHASES


def test_phase_means_average_the_answered_requests():
    means = PhaseMeans()
    assert means.means() == {"requests": 0}
    means.add(dict.fromkeys(PHASES, 0.1) | {"total": 1.0})
    means.add(dict.fromkeys(PHASES, 0.3) | {"total": 2.0})
    assert means.means() == {"requests": 2, **dict.fromkeys(PHASES, 0.2), "total": 1.5}


def test_batch_means_average_requests_and_images_per_batch():
    means = BatchMeans()
    assert means.means() == {"batches": 0}
    means.add(requests=8, images=8)
    means.add(requests=2, images=5)
    assert means.means() == {"batches": 2, "requests": 5.0, "images": 6.5, "images_drawn": 13}
