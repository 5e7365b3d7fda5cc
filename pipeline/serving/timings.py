"""Where a generate request's time goes, and whether the compiled UNet replays as CUDA graphs.

Each answered POST /v1/generate carries its phases (`timings` in the JSON, and a standard
`Server-Timing` header), in seconds, in order:

| phase     | from .. to                                                                                   |
| --------- | -------------------------------------------------------------------------------------------- |
| prepare   | arrival .. joining the batch queue: body read, JSON checked, photos decoded, subject resolved |
| queue     | the batch queue .. its group's start: the batch's wait, earlier batches and groups            |
| condition | its group's subjects made ready (LoRA slots, embeddings) and all its prompts encoded          |
| denoise   | its group's denoising loop (every chunk of serve.max_batch_images)                            |
| decode    | its group's VAE decode, its pixels rounded and copied to the host (pipeline/serving/drawn.py)  |
| encode    | its own images to PNG and base64                                                              |
| total     | arrival .. answer built; total minus the phases is the event loop's hand-offs                 |

condition, denoise and decode are those of the request's whole group: every request of a group
waits for all of it. On a GPU they are read on the GPU's clock (`PhaseClock`): the time its work
ran, from the group's first kernel, which may wait behind an earlier batch's last ones; queue is
the host's, up to when the group's work was queued; the others are the host's, on
time.monotonic. Time outside the replica (Serve's proxy, HTTP, the answer's JSON) is the
client's latency minus `total` (benchmarks/bench_serve.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import NamedTuple

import torch

# Keys of a request's timings, in order; the phases add up to at most "total".
PHASES = ("prepare", "queue", "condition", "denoise", "decode", "encode")
TOTAL = "total"
MAX_SKIP_REASONS = 20  # distinct reasons kept: one per compiled graph at most, a handful in practice


class Mark(NamedTuple):
    """A phase boundary: the host's time.monotonic and, on CUDA, an event recorded there."""

    host: float
    event: torch.cuda.Event | None


class PhaseClock:
    """Marks at a batch's phase boundaries. On CUDA each mark records a timing event on the
    current stream and `seconds` reads the time between two on the GPU's own clock once the
    later one has passed, so no boundary waits for the device: kernels are queued
    asynchronously, and a synchronize at each boundary (as this clock did before) left the GPU
    idle while the host prepared each phase and the next batch (BENCHMARKS.md "Serving": the GPU
    busy 89% at 16 clients). On a CPU marks are host times."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"

    def mark(self) -> Mark:
        event = None
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        return Mark(time.monotonic(), event)

    @staticmethod
    def seconds(start: Mark, end: Mark) -> float:
        """Seconds from `start` to `end`: the device's, waiting for `end` to pass, or the host's."""
        if start.event is None or end.event is None:
            return end.host - start.host
        end.event.synchronize()
        return start.event.elapsed_time(end.event) / 1000


def rounded(timings: Mapping[str, float]) -> dict[str, float]:
    """`timings` in PHASES order then "total", in seconds to the millisecond: phases rounded
    down and the total up, so that the rounded phases still add up to at most the total."""
    out = {name: math.floor(timings[name] * 1000) / 1000 for name in PHASES if name in timings}
    if TOTAL in timings:
        out[TOTAL] = math.ceil(timings[TOTAL] * 1000) / 1000
    return out


def server_timing(timings: Mapping[str, float]) -> str:
    """A Server-Timing header value (W3C Server Timing): `name;dur=MS` per phase, in milliseconds."""
    return ", ".join(f"{name};dur={seconds * 1000:.0f}" for name, seconds in rounded(timings).items())


class CudagraphSkips(logging.Handler):
    """Why graphs of a reduce-overhead compile run without CUDA graphs (kernel by kernel, each
    launched again by the CPU at every step). Inductor counts each skip in
    counters["inductor"]["cudagraph_skips"] and, for a CUDA graph, logs "skipping cudagraphs due
    to REASON" at WARNING on its `cudagraphs` artifact logger (torch 2.13:
    _inductor/cudagraph_utils.py log_cudagraph_skip_and_bump_counter). This handler keeps the
    first MAX_SKIP_REASONS distinct messages; it runs only when a graph is compiled."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()[:500]
        if message not in self.reasons and len(self.reasons) < MAX_SKIP_REASONS:
            self.reasons.append(message)

    @classmethod
    def install(cls) -> CudagraphSkips:
        try:
            from torch._inductor.cudagraph_utils import cudagraphs_log
        except ImportError:  # a private name: a torch that moved it still serves, by the logger's name
            cudagraphs_log = logging.getLogger("torch._inductor.cudagraph_utils.__cudagraphs")
        handler = cls()
        cudagraphs_log.addHandler(handler)
        return handler


def cudagraph_skips() -> int:
    """Graphs Inductor compiled without CUDA graphs in this process (0 when none was)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"].get("cudagraph_skips", 0))
