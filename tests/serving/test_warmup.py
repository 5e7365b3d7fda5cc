"""A replica's warm-up (serving/warmup.py): with serve.compile, every graph variant a request
can need is traced before the replica is ready (edits run eagerly; LoRA subjects alone or mixed,
merged, per-row merged or with per-row products), so no request waits behind a compile; a ControlNet missing from this machine does not keep the replica down. serve.compile_mode
auto is CUDA graphs on a GPU and Inductor's default on a CPU (serving/app.py compile_mode_for)."""

import logging

import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

from pipeline.config import PROFILE_CONTROLNETS, ConfigError, load_config
from pipeline.model import BlipDiffusion
from pipeline.serving.app import compile_mode_for
from pipeline.serving.controls import ControlRequest
from pipeline.serving.edits import EditRequest
from pipeline.serving.engine import Engine, Job
from pipeline.serving.lora_slots import MERGED, ROW_WEIGHTS
from pipeline.serving.requests import GenerationRequest
from pipeline.serving.subjects import ZeroShotSubject, read_subject
from pipeline.serving.warmup import hold_compiled_graphs, warm_up, warm_up_jobs
from tests.serve_subjects import TINY

SIZE = 64
CONFIG = ["profile=tiny", "serve.compile=true", f"generate.height={SIZE}", f"generate.width={SIZE}"]


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def lora_subjects(lora_folders):
    return [read_subject(lora_folders[name], name, "1") for name in "ab"]


def test_the_warm_up_draws_each_lora_mode_it_serves_in():
    """(images, control, per-row): with serve.lora_merge the jobs of both modes of the LoRA
    layers it serves in, merged and per-row merged (Dynamo guards on the mode), without it the
    per-row products' alone (whatever the rows)."""
    jobs = [(j.request.num_images, j.control is not None, rows) for j, rows in warm_up_jobs(load_config(overrides=CONFIG), True)]
    assert jobs == [(1, False, False), (2, False, False), (1, True, False), (1, False, True), (2, False, True)]
    products = warm_up_jobs(load_config(overrides=[*CONFIG, "serve.lora_merge=false"]), True)
    assert [(j.request.num_images, j.control is not None, rows) for j, rows in products] == [(1, False, False), (2, False, False), (1, True, False)]
    assert [rows for _, rows in warm_up_jobs(load_config(overrides=[*CONFIG, "serve.compile=false"]), True)] == [False]


def test_after_the_warm_up_no_request_path_compiles_again(lora_subjects):
    config = load_config(overrides=CONFIG)
    model = BlipDiffusion.from_pretrained(TINY)
    # The server's compile, with a backend that only traces: the graphs are counted.
    torch._dynamo.reset()
    model.compile_for_inference(backend="eager")
    engine = Engine(model, 4, 8, 8, PROFILE_CONTROLNETS["tiny"]["canny"], config.edit)
    warm_up(engine, config)
    traced = _graphs()
    assert engine.lora_merge and not engine.lora_per_row  # as it was before the warm-up's per-row jobs
    layer = next(iter(engine._lora.layers.values()))
    modes: list[str] = []
    engine.model.unet.register_forward_pre_hook(lambda *_: modes.append(layer.mode))

    request = GenerationRequest("a cat on the grass", 1, 7, 3, 5.0, None, SIZE, SIZE)
    subject = ZeroShotSubject((Image.new("RGB", (96, 80), "red"),), "cat")
    photo = Image.new("RGB", (SIZE, SIZE), "blue")
    three = GenerationRequest("a cat on the grass", 3, 7, 3, 5.0, None, SIZE, SIZE)
    jobs = engine.run([
        Job(request, subject, SIZE, SIZE),
        Job(three, subject, SIZE, SIZE),
        Job(request, subject, SIZE, SIZE, edit=EditRequest("a cat on", None)),
        Job(request, subject, SIZE, SIZE, edit=EditRequest("cat", photo)),
        Job(request, subject, SIZE, SIZE, control=ControlRequest(photo, "canny", 0.5)),
    ])
    assert all(job.error is None for job in jobs) and [len(job.images) for job in jobs] == [1, 3, 1, 1, 1]
    a, b = lora_subjects
    for batch, mode in (([Job(request, a, SIZE, SIZE)], MERGED), ([Job(three, a, SIZE, SIZE), Job(request, b, SIZE, SIZE)], ROW_WEIGHTS),
                        ([Job(request, a, SIZE, SIZE), Job(request, b, SIZE, SIZE)], ROW_WEIGHTS), ([Job(three, b, SIZE, SIZE)], MERGED)):
        modes.clear()
        assert all(job.error is None for job in engine.run(batch))
        assert modes and set(modes) == {mode}
    assert _graphs() == traced

    # A size the warm-up did not draw: it would compile a new graph on the compute thread (minutes
    # on a GPU, every request behind it); held, it draws eagerly with the graphs kept.
    bigger = GenerationRequest("a cat on the grass", 1, 7, 3, 5.0, None, 2 * SIZE, 2 * SIZE)
    hold_compiled_graphs()
    try:
        [job] = engine.run([Job(bigger, subject, 2 * SIZE, 2 * SIZE)])
    finally:
        torch.compiler.set_stance("default")
    assert job.error is None and job.images[0].size == (2 * SIZE, 2 * SIZE)
    assert _graphs() == traced


def test_a_path_that_cannot_warm_up_is_logged_and_the_plain_one_must_work(caplog):
    config = load_config(overrides=CONFIG)
    engine = Engine(BlipDiffusion.from_pretrained(TINY), 4, 8, 8, "/nonexistent/controlnet", config.edit)
    with caplog.at_level(logging.WARNING, logger="pipeline.serving.warmup"):
        warm_up(engine, config)  # the ControlNet is missing: the replica still starts
    assert "the ControlNet warm-up failed" in caplog.text

    engine._run_group = lambda group: (_ for _ in ()).throw(RuntimeError("no kernel"))
    with pytest.raises(RuntimeError, match="no kernel"):
        warm_up(engine, config)


@pytest.mark.parametrize(("device", "setting", "mode"), [
    ("cuda", "auto", "reduce-overhead"),
    ("cpu", "auto", None),
    ("cuda", "max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"),
    ("cpu", "default", "default"),
])
def test_serve_compile_mode_auto_is_cuda_graphs_on_a_gpu_and_the_default_on_a_cpu(device, setting, mode):
    assert compile_mode_for(device, setting) == mode


def test_a_bad_serve_compile_mode_is_refused_naming_the_modes():
    assert load_config(overrides=["profile=tiny"]).serve.compile_mode == "auto"
    with pytest.raises(ConfigError, match=r"serve.compile_mode: Input should be 'auto', 'default', 'reduce-overhead'"):
        load_config(overrides=["profile=tiny", "serve.compile_mode=fast"])
