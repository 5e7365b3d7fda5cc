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


def test_the_clock_synchronizes_cuda_once_per_reading_and_never_on_a_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: calls.append(args))
    cpu, cuda = PhaseClock(torch.device("cpu")), PhaseClock(torch.device("cuda", 0))
    first = cpu.now()
    assert calls == [] and cuda.now() >= first and len(calls) == 1


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
