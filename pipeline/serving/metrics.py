"""The serving app's own Prometheus metrics, beside Ray Serve's (ray_serve_*: requests, errors,
latency and queue length per deployment). Ray exports both on each node's metrics port; Serve
adds the deployment, replica and application tags. The running means of each request phase
(serving/timings.py) are the replica's own, for GET /healthz."""

from __future__ import annotations

from collections.abc import Mapping

from ray.serve.metrics import Counter, Histogram

from pipeline.serving.timings import PHASES, TOTAL

_SECONDS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]
_IMAGES = [1, 2, 4, 8, 16, 32, 64, 128]


class PhaseMeans:
    """Mean seconds per phase (and total) of the requests answered since the replica started."""

    def __init__(self) -> None:
        self.requests = 0
        self._sums = dict.fromkeys((*PHASES, TOTAL), 0.0)

    def add(self, timings: Mapping[str, float]) -> None:
        self.requests += 1
        for name in self._sums:
            self._sums[name] += timings.get(name, 0.0)

    def means(self) -> dict[str, float | int]:
        """{"requests": n, phase: mean seconds rounded to the ms, ..., "total": ...}; only n while n is 0."""
        if not self.requests:
            return {"requests": 0}
        return {"requests": self.requests, **{name: round(s / self.requests, 3) for name, s in self._sums.items()}}


class BatchMeans:
    """Batches drawn since the replica started, and their mean requests and images: under load a
    batch should hold up to serve.max_batch_size requests; small batches with a long queue mean
    requests reach the batch queue late (GET /healthz)."""

    def __init__(self) -> None:
        self.batches = self.requests = self.images = 0

    def add(self, requests: int, images: int) -> None:
        self.batches += 1
        self.requests += requests
        self.images += images

    def means(self) -> dict[str, float | int]:
        """{"batches": n, "requests": mean per batch, "images": mean per batch, "images_drawn":
        the total}; only n while n is 0."""
        if not self.batches:
            return {"batches": 0}
        return {"batches": self.batches, "requests": round(self.requests / self.batches, 2), "images": round(self.images / self.batches, 2),
                "images_drawn": self.images}


class ServeMetrics:
    """subjectforge_* metrics of one replica. `subject` is a registered name, "zero-shot", "mix",
    "unregistered" (a name the registry does not hold) or "invalid": names, not versions, and
    never a name only a client gave, so the number of series stays that of the registry."""

    def __init__(self) -> None:
        self.requests = Counter(
            "subjectforge_requests", description="POST /v1/generate answers by subject and HTTP status",
            tag_keys=("subject", "status"),
        )
        self.queue_seconds = Histogram(
            "subjectforge_queue_seconds", description="from a request's arrival in the batch queue to its batch's start",
            boundaries=_SECONDS, tag_keys=("subject",),
        )
        self.batch_images = Histogram(
            "subjectforge_batch_images", description="images of one batch (all its requests and groups)", boundaries=_IMAGES,
        )
        self.image_seconds = Histogram(
            "subjectforge_image_seconds", description="a request's denoising and decoding time per image",
            boundaries=_SECONDS, tag_keys=("subject",),
        )
        self.phase_seconds = Histogram(
            "subjectforge_phase_seconds", description="a request's seconds in each phase (serving/timings.py) and in all",
            boundaries=_SECONDS, tag_keys=("phase",),
        )
        self.phases = PhaseMeans()
        self.batches = BatchMeans()

    def record_batch(self, requests: int, images: int) -> None:
        self.batch_images.observe(images)
        self.batches.add(requests, images)

    def record_request(self, subject: str, status: int) -> None:
        self.requests.inc(tags={"subject": subject, "status": str(status)})

    def record_job(self, subject: str, timings: Mapping[str, float], num_images: int) -> None:
        """One answered request's phases (serving/timings.py): its queue and per-image times by
        subject, each phase's histogram, and the running means."""
        self.queue_seconds.observe(timings["queue"], tags={"subject": subject})
        self.image_seconds.observe((timings["denoise"] + timings["decode"]) / num_images, tags={"subject": subject})
        for name, seconds in timings.items():
            self.phase_seconds.observe(seconds, tags={"phase": name})
        self.phases.add(timings)
