"""Callbacks of a training job's Ray Train controller, importable without torch.

The controller is a process of its own that unpickles its callbacks (which imports their
module) before it starts the job's workers: a callback class in pipeline.train.trainer made it
import the training loop's torch, transformers and diffusers first (~10 s of CPU, before any
worker started). What a callback needs from the training code it imports when it runs.
"""

from __future__ import annotations

from typing import Any

from ray.train import ControllerError, UserCallback

# A worker's CUDA out-of-memory error within this many optimizer steps of an attempt's start
# comes from the run's shapes and settings, and recurs at every restart; a later one (memory
# fragmented over a long run, another process on the GPU) may not, and Ray Train retries it.
EARLY_OOM_STEPS = 2


class OutOfGPUMemory(RuntimeError):
    """A worker ran out of GPU memory within EARLY_OOM_STEPS steps of its attempt's start: the
    batch (`batch_key`, the setting that holds it) does not fit the GPU with these settings.
    Raised by the loop in place of torch's OutOfMemoryError (pipeline.train.memory
    early_out_of_memory_is_final); picklable without torch."""

    def __init__(self, detail: str, step: int, batch_key: str, batch_size: int) -> None:
        super().__init__(detail, step, batch_key, batch_size)
        self.detail, self.step, self.batch_key, self.batch_size = detail, step, batch_key, batch_size

    def __reduce__(self) -> tuple[type, tuple[str, int, str, int]]:
        return type(self), (self.detail, self.step, self.batch_key, self.batch_size)

    def __str__(self) -> str:
        first = self.detail.strip().splitlines()[0] if self.detail.strip() else "out of memory"
        return (
            f"the GPU ran out of memory at step {self.step + 1} with {self.batch_size} samples per worker ({first}); "
            f"lower {self.batch_key}, or set train.gradient_checkpointing=true or train.optimizer=adamw8bit "
            "(README, memory options). Not retried: a run that fails this way at its start fails so at every restart"
        )


def find_error(error: object, kind: type[BaseException]) -> Any:
    """The exception of type `kind` (exactly) in `error`: itself, a Ray task error's `cause`, Ray
    Train's worker_failures (a {rank: error} map too) and controller_failure, a worker error's
    wrapped exception (_base_exc), or the exceptions chained to any of them; None if none is."""
    todo, seen = [error], set()
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if type(item) is kind:  # not Ray's RayTaskError(kind) subclass, whose `cause` holds it
            return item
        if isinstance(item, dict):
            todo += item.values()
            continue
        todo += [getattr(item, name, None) for name in ("cause", "_base_exc", "controller_failure", "worker_failures")]
        todo += [getattr(item, "__cause__", None), getattr(item, "__context__", None)]
    return None


class StopAtUndecodableRows(UserCallback):
    """Ends a run whose worker met image bytes that do not decode (UndecodableImage) at the first
    attempt: Ray Train restarts the workers for any worker error (train.max_failures), and the
    same rows fail the same way each time. Runs in Ray Train's controller; an exception raised
    here ends the run as a ControllerError, which its failure policy does not retry, and the
    driver's undecodable_rows_refused names the row. Raised as a ControllerError already: Ray
    Train's callback manager logs the whole traceback of any other exception a callback raises,
    one more copy of it before the driver's one-line message."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        from pipeline.train.data import find_undecodable

        bad = find_undecodable(worker_exceptions)
        if bad is not None:
            raise ControllerError(bad)


class StopAtEarlyOutOfMemory(UserCallback):
    """Ends a run whose worker ran out of GPU memory at its attempt's start (OutOfGPUMemory):
    Ray Train would restart the workers train.max_failures times, each loading the model to
    fail at the same step. A ControllerError, as StopAtUndecodableRows raises; the driver's
    out_of_memory_explained says what to change."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        oom = find_error(worker_exceptions, OutOfGPUMemory)
        if oom is not None:
            raise ControllerError(oom)
