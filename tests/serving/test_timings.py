"""Request phase timings and CUDA-graph skip counts (pipeline/serving/timings.py), on the CPU."""

from __future__ import annotations

import logging

import pytest
import torch

from pipeline.serving.timings import PHASES, CudagraphSkips, PhaseClock, cudagraph_skips, rounded, server_timing


def test_rounded_phases_never_add_up_to_more_than_the_rounded_total():
    # Each phase 0.4 ms past the ms: rounded to nearest, six of them would pass the total by 2 ms.
    timings = {phase: 0.1004 for phase in PHASES} | {"total": 0.6024}
    out = rounded(timings)
    assert list(out) == [*PHASES, "total"]
    assert sum(out[p] for p in PHASES) <= out["total"] and out["prepare"] == 0.1 and out["total"] == 0.603


def test_server_timing_gives_each_phase_in_milliseconds_in_order():
    assert server_timing({"total": 0.2501, "queue": 0.0209, "denoise": 0.2}) == "queue;dur=20, denoise;dur=200, total;dur=251"


class FakeEvent:
    """torch.cuda.Event's stand-in on a CPU machine: `record` notes the host time; the device's
    elapsed time is made up (7 ms between any two) so that it cannot be the host's."""

    synchronized = 0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.recorded = False

    def record(self) -> None:
        self.recorded = True

    def synchronize(self) -> None:
        FakeEvent.synchronized += 1

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.recorded and end.recorded
        return 7.0


def test_the_clock_never_waits_for_the_device_at_a_mark_and_reads_its_clock_after(monkeypatch):
    """Marks record CUDA events without synchronizing (a synchronize at each boundary left the GPU
    idle between phases and batches); `seconds` waits for the later event only, and reads the
    GPU's clock. On a CPU, host times."""
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: syncs.append(args))
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    FakeEvent.synchronized = 0
    cpu, cuda = PhaseClock(torch.device("cpu")), PhaseClock(torch.device("cuda", 0))
    first, second = cpu.mark(), cpu.mark()
    assert first.event is None and PhaseClock.seconds(first, second) == second.host - first.host >= 0
    start, end = cuda.mark(), cuda.mark()
    assert syncs == [] and FakeEvent.synchronized == 0
    assert PhaseClock.seconds(start, end) == 0.007 and FakeEvent.synchronized == 1 and syncs == []


@pytest.fixture
def skips():
    from torch._inductor.cudagraph_utils import cudagraphs_log

    handler = CudagraphSkips.install()
    yield handler
    cudagraphs_log.removeHandler(handler)


def test_skip_reasons_are_kept_once_each_and_counted(skips, caplog):
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    before = cudagraph_skips()
    with caplog.at_level(logging.CRITICAL):  # Inductor's own warning is not this test's output
        for _ in range(2):
            log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (1 instances)")
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to cpu device (arg0)")
    assert cudagraph_skips() == before + 3
    assert skips.reasons == ["skipping cudagraphs due to mutated inputs (1 instances)", "skipping cudagraphs due to cpu device (arg0)"]
