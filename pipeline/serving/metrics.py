"""The serving app's own Prometheus metrics, beside Ray Serve's (ray_serve_*: requests, errors,
latency and queue length per deployment). Ray exports both on each node's metrics port; Serve
adds the deployment, replica and application tags."""

from __future__ import annotations

from ray.serve.metrics import Counter, Histogram

_SECONDS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120]
_IMAGES = [1, 2, 4, 8, 16, 32, 64, 128]


class ServeMetrics:
    """subjectforge_* metrics of one replica. `subject` is a registered name or "zero-shot"
    (names, not versions, so the number of series stays that of the registry)."""

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

    def record_request(self, subject: str, status: int) -> None:
        self.requests.inc(tags={"subject": subject, "status": str(status)})

    def record_job(self, subject: str, queue_s: float, image_s: float) -> None:
        self.queue_seconds.observe(queue_s, tags={"subject": subject})
        self.image_seconds.observe(image_s, tags={"subject": subject})
