"""The replica's batch queue: requests from any caller, drawn together when the model is free.

A request's Job waits here until the compute thread is free; then every waiting job (up to
`serve.max_batch_size` requests) is drawn as one batch. From an idle replica, the first job
waits up to `serve.batch_wait_timeout_s` for others to join it.

Why not Ray Serve's `@serve.batch`: its loop seals the next batch as soon as that batch's wait
ends, and only then waits for the running batch to finish (ray/serve/batching.py
`_process_batches`: `wait_for_batch`, then the `max_concurrent_batches` semaphore). Requests that
arrive while a batch draws, which under load is nearly all of them, are split into batches
of whatever arrived within `batch_wait_timeout_s` of each other. With 16 clients on the CPU load
test (benchmarks/bench_serve.py) batches held 5 of 16 requests while each request queued for
two batches; on an H100 the replica stayed at 2 images/s from 4 to 16 clients.

No Ray, HTTP or model here: `draw` (Engine.draw) runs on the given one-thread executor. With
`finish` (drawn.finish_jobs) and its own one-thread executor, `draw` returns once the batch's
work is queued on the device, and the batch is answered after `finish` has its images: the next
batch is drawn meanwhile (drawn.py says why).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor

from pipeline.serving.engine import Job

log = logging.getLogger(__name__)


class BatchQueue:
    """Jobs waiting for the model. `submit(job)` returns once `draw` filled the job (its
    images, or its error); `on_batch(requests, images)` is called after each batch."""

    def __init__(self, draw: Callable[[list[Job]], object], executor: Executor, max_requests: int, wait_s: float,
                 on_batch: Callable[[int, int], None] | None = None,
                 finish: Callable[[list[Job]], object] | None = None, finisher: Executor | None = None) -> None:
        self._draw, self._executor = draw, executor
        self._finish, self._finisher = finish, finisher
        self._finishing: set[asyncio.Task] = set()  # batches drawn and not yet answered (kept: the loop holds tasks weakly)
        self.max_requests, self.wait_s = max_requests, wait_s
        self._on_batch = on_batch
        self._waiting: list[tuple[Job, asyncio.Future]] = []
        self._arrived: asyncio.Event | None = None  # made on the event loop of the first submit
        self._loop_task: asyncio.Task | None = None

    async def submit(self, job: Job) -> None:
        """Wait until `job` is drawn. When the caller is cancelled (its client left), the job is
        marked cancelled: taken out of the queue if it still waits, or left to the Engine, which
        stops a batch whose requests have all left (engine.py stop_when_all_cancelled)."""
        loop = asyncio.get_running_loop()
        if self._loop_task is None or self._loop_task.done() or self._loop_task.get_loop() is not loop:
            self._arrived = asyncio.Event()
            self._loop_task = loop.create_task(self._run(), name="subjectforge-batches")
        done = loop.create_future()
        self._waiting.append((job, done))
        self._arrived.set()
        try:
            await asyncio.shield(done)  # cancelling the caller must not cancel the batch's bookkeeping
        except asyncio.CancelledError:
            job.cancelled.set()
            self._waiting = [(j, f) for j, f in self._waiting if j is not job]
            raise

    async def _run(self) -> None:
        """Draw batches for as long as the replica runs: take what waits, draw it, answer it."""
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            await self._fill()
            batch, self._waiting = self._waiting[: self.max_requests], self._waiting[self.max_requests :]
            if batch:  # empty when every waiting caller left during the fill
                await self._draw_batch(batch)

    async def _fill(self) -> None:
        """Wait until `max_requests` jobs wait, or until the oldest has waited `wait_s`. Jobs that
        waited through an earlier batch have waited long enough: they go at once."""
        while 0 < len(self._waiting) < self.max_requests:
            left = self._waiting[0][0].enqueued + self.wait_s - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    async def _draw_batch(self, batch: list[tuple[Job, asyncio.Future]]) -> None:
        """Draw the batch; answer it now, or, with a finisher, once `finish` has its images, while
        the loop goes on to the next batch."""
        jobs = [job for job, _ in batch]
        await self._run_step(self._executor, self._draw, jobs, "drawing")
        if self._finish is None:
            self._answer(batch)
            return
        task = asyncio.get_running_loop().create_task(self._finish_batch(batch))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _finish_batch(self, batch: list[tuple[Job, asyncio.Future]]) -> None:
        await self._run_step(self._finisher, self._finish, [job for job, _ in batch], "finishing")
        self._answer(batch)

    @staticmethod
    async def _run_step(executor: Executor, step: Callable[[list[Job]], object], jobs: list[Job], what: str) -> None:
        """`step(jobs)` on `executor`; an exception it raises becomes the error of each job it left
        without images or error (the engine answers each group's own failure itself)."""
        try:
            await asyncio.get_running_loop().run_in_executor(executor, step, jobs)
        except Exception as exc:
            log.error("%s a batch of %d request(s) failed outside its groups", what, len(jobs), exc_info=exc)
            for job in jobs:
                if job.images is None and job.error is None:
                    job.error = exc

    def _answer(self, batch: list[tuple[Job, asyncio.Future]]) -> None:
        """Answer each caller, then count the batch: bookkeeping that raises must not leave
        its callers waiting until serve.request_timeout_s."""
        for _, done in batch:
            if not done.done():
                done.set_result(None)
        if self._on_batch is not None:
            jobs = [job for job, _ in batch]
            try:
                self._on_batch(len(jobs), sum(job.request.num_images for job in jobs))
            except Exception as exc:
                log.error("recording a batch of %d request(s) failed", len(jobs), exc_info=exc)
