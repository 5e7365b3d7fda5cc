"""Callbacks of a training job's Ray Train controller, importable without torch.

The controller is a process of its own that unpickles its callbacks (which imports their
module) before it starts the job's workers: a callback class in pipeline.train.trainer made it
import the training loop's torch, transformers and diffusers first (~10 s of CPU, before any
worker started). What a callback needs from the training code it imports when it runs.
"""

from __future__ import annotations

from typing import Any

from ray.train import ControllerError, UserCallback


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
