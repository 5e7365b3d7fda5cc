"""The replica's batch queue (pipeline/serving/batcher.py), on asyncio without Ray or a model.

The bug it fixes: Ray Serve's @serve.batch sealed the next batch while the previous one still
drew, so requests that arrived during a batch were split into small batches (5 of 16 waiting
requests a batch on the CPU load test). Here every request waiting when the model is free
joins the next batch, up to max_requests.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from pipeline.serving.batcher import BatchQueue
from pipeline.serving.engine import Job


def job(num_images: int = 1) -> Job:
    return Job(SimpleNamespace(num_images=num_images), None, 64, 64)


class Drawer:
    """Engine.run's stand-in: records each batch's jobs; each draw takes `seconds` (on the
    executor's thread, like the model) and can be held until `release` is set."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds, self.batches = seconds, []
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()

    def __call__(self, jobs: list[Job]) -> list[Job]:
        self.started.set()
        self.release.wait(10)
        time.sleep(self.seconds)
        self.batches.append(list(jobs))
        for j in jobs:
            j.images = ["image"] * j.request.num_images
        return jobs


def queue(drawer, max_requests=8, wait_s=0.01, on_batch=None):
    return BatchQueue(drawer, ThreadPoolExecutor(1), max_requests, wait_s, on_batch)


def test_requests_arriving_during_a_batch_are_drawn_together_in_the_next():
    """The reproduction: one request starts a batch; seven more arrive one by one while it
    draws, each further apart than the wait. They are one batch, not seven."""
    drawer = Drawer()
    drawer.release.clear()
    batches = queue(drawer, max_requests=8, wait_s=0.01)

    async def main():
        first = asyncio.create_task(batches.submit(job()))
        while not drawer.started.is_set():
            await asyncio.sleep(0.005)
        later = []
        for _ in range(7):
            later.append(asyncio.create_task(batches.submit(job())))
            await asyncio.sleep(0.03)  # 3x the wait apart
        drawer.release.set()
        await asyncio.gather(first, *later)

    asyncio.run(main())
    assert [len(b) for b in drawer.batches] == [1, 7]


def test_a_batch_holds_at_most_max_requests_and_every_job_is_answered():
    drawer = Drawer()
    drawer.release.clear()
    seen = []
    batches = queue(drawer, max_requests=8, on_batch=lambda requests, images: seen.append((requests, images)))

    async def main():
        jobs = [job(num_images=2) for _ in range(21)]
        tasks = [asyncio.create_task(batches.submit(j)) for j in jobs]
        await asyncio.sleep(0.05)
        drawer.release.set()
        await asyncio.gather(*tasks)
        return jobs

    jobs = asyncio.run(main())
    assert [len(b) for b in drawer.batches] == [8, 8, 5]
    assert seen == [(8, 16), (8, 16), (5, 10)]
    assert all(j.images == ["image", "image"] for j in jobs)
    assert [j for b in drawer.batches for j in b] == jobs  # first come, first drawn


def test_an_idle_queue_waits_for_the_batch_to_fill_up_to_the_wait():
    drawer = Drawer()
    batches = queue(drawer, max_requests=8, wait_s=0.3)

    async def main():
        tasks = [asyncio.create_task(batches.submit(job()))]
        await asyncio.sleep(0.05)  # well inside the first job's wait
        tasks.append(asyncio.create_task(batches.submit(job())))
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert [len(b) for b in drawer.batches] == [2]


def test_a_caller_that_leaves_while_waiting_is_never_drawn():
    """Serve cancels the task of a request whose client disconnected: a waiting job leaves the
    queue, marked; one already drawing is marked for the Engine (stop_when_all_cancelled)."""
    drawer = Drawer()
    drawer.release.clear()
    batches = queue(drawer, max_requests=8, wait_s=0.0)

    async def main():
        drawing, waiting, staying = job(), job(), job()
        first = asyncio.create_task(batches.submit(drawing))
        while not drawer.started.is_set():
            await asyncio.sleep(0.005)
        leaving = asyncio.create_task(batches.submit(waiting))
        kept = asyncio.create_task(batches.submit(staying))
        await asyncio.sleep(0.01)
        leaving.cancel()
        first.cancel()
        for task in (leaving, first):
            with pytest.raises(asyncio.CancelledError):
                await task
        drawer.release.set()
        await kept
        return drawing, waiting, staying

    drawing, waiting, staying = asyncio.run(main())
    assert drawing.cancelled.is_set() and waiting.cancelled.is_set() and not staying.cancelled.is_set()
    assert [b for b in drawer.batches] == [[drawing], [staying]]


def test_a_draw_that_raises_answers_its_jobs_with_the_error_and_the_queue_goes_on():
    calls = []

    def draw(jobs):
        calls.append(len(jobs))
        if len(calls) == 1:
            raise RuntimeError("the engine broke outside its groups")
        for j in jobs:
            j.images = ["image"]

    batches = queue(draw, wait_s=0.0)

    async def main():
        failed, answered = job(), job()
        await batches.submit(failed)
        await batches.submit(answered)
        return failed, answered

    failed, answered = asyncio.run(main())
    assert isinstance(failed.error, RuntimeError) and failed.images is None
    assert answered.error is None and answered.images == ["image"]


def test_the_queue_serves_a_second_event_loop():
    """A queue whose loop ended (a test's asyncio.run, a restarted event loop) draws again on the next one."""
    drawer = Drawer()
    batches = queue(drawer, wait_s=0.0)
    first, second = job(), job()
    asyncio.run(batches.submit(first))
    asyncio.run(asyncio.wait_for(batches.submit(second), 5))
    assert drawer.batches == [[first], [second]]


class Finisher:
    """drawn.finish_jobs' stand-in: the draw leaves each job without images (`Drawer` with
    `leave_images`); this fills them, held until `release` is set, and records the order."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.finished: list[list[Job]] = []

    def __call__(self, jobs: list[Job]) -> list[Job]:
        self.release.wait(10)
        for j in jobs:
            j.images = ["image"] * j.request.num_images
        self.finished.append(list(jobs))
        return jobs


class QueuingDrawer(Drawer):
    """Engine.draw's stand-in: records the batch and leaves its images to the finisher."""

    def __call__(self, jobs: list[Job]) -> list[Job]:
        self.started.set()
        self.batches.append(list(jobs))
        return jobs


def test_with_a_finisher_the_next_batch_draws_before_the_last_is_answered():
    """The overlap drawn.py is for: while one batch's images are held in the finisher (its GPU
    tail), the compute thread draws the next batch; each batch is answered, in order, only
    with its images."""
    drawer, finisher, seen = QueuingDrawer(), Finisher(), []
    batches = BatchQueue(drawer, ThreadPoolExecutor(1), 8, 0.01, lambda requests, images: seen.append(requests),
                         finish=finisher, finisher=ThreadPoolExecutor(1))

    async def main():
        first = [asyncio.create_task(batches.submit(job())) for _ in range(2)]
        while len(drawer.batches) < 1:
            await asyncio.sleep(0.005)
        second = [asyncio.create_task(batches.submit(job())) for _ in range(3)]
        while len(drawer.batches) < 2:
            await asyncio.sleep(0.005)
        assert not any(task.done() for task in first + second)  # drawn, not answered: the finisher holds them
        finisher.release.set()
        await asyncio.gather(*first, *second)
        return first, second

    asyncio.run(main())
    assert [len(b) for b in drawer.batches] == [2, 3]
    assert [len(b) for b in finisher.finished] == [2, 3] and seen == [2, 3]
    assert all(j.images == ["image"] for b in drawer.batches for j in b)


def test_a_finish_that_raises_answers_its_jobs_with_the_error_and_the_queue_goes_on():
    calls = []

    def finish(jobs):
        calls.append(len(jobs))
        if len(calls) == 1:
            raise RuntimeError("CUDA error: device lost")
        for j in jobs:
            j.images = ["image"]

    drawer = QueuingDrawer()
    batches = BatchQueue(drawer, ThreadPoolExecutor(1), 8, 0.01, finish=finish, finisher=ThreadPoolExecutor(1))

    async def main():
        failed = job()
        await batches.submit(failed)
        served = job()
        await batches.submit(served)
        return failed, served

    failed, served = asyncio.run(main())
    assert failed.images is None and "device lost" in str(failed.error)
    assert served.error is None and served.images == ["image"]


def test_a_batch_whose_bookkeeping_raises_is_still_answered():
    """`on_batch` (the metrics) raised before the batch's callers were answered: they waited
    until serve.request_timeout_s. Each caller is answered first; the queue goes on."""
    finisher = Finisher()
    finisher.release.set()

    def on_batch(requests, images):
        raise ValueError("a metrics tag the backend refuses")

    batches = BatchQueue(QueuingDrawer(), ThreadPoolExecutor(1), 8, 0.01, on_batch, finish=finisher, finisher=ThreadPoolExecutor(1))

    async def main():
        for _ in range(2):  # each answered at once, not after the wait_for's 5 s
            await asyncio.wait_for(batches.submit(job()), 5)

    asyncio.run(main())
    assert [len(b) for b in finisher.finished] == [1, 1]
