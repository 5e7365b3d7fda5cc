"""Structure control (pipeline/model/control.py) and `subjectforge generate --control`, tiny profile."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.model.control import ControlError, canny_map, make_control_map, prepare_control_image
from pipeline.model.image_processing import SubjectImageProcessor

SIZE = 64
BASE = ["generate", "--profile", "tiny", "--category", "dog", "--prompt", "on the grass", "--steps", "2"]
BASE += ["--height", str(SIZE), "--width", str(SIZE), "--seed", "3", "--dtype", "float32", "--device", "cpu"]


def _shapes(width: int = 80, height: int = 60) -> Image.Image:
    """Synthetic shapes on a dark ground: a filled square, a circle outline, a line, a soft ramp."""
    image = Image.new("RGB", (width, height), (20, 30, 40))
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 8, 30, 30), fill=(230, 200, 10))
    draw.ellipse((40, 10, 70, 40), outline=(255, 255, 255), width=2)
    draw.line((5, 50, 75, 45), fill=(0, 200, 255), width=1)
    for x in range(40, 80):  # a shallow ramp: no edge at the default thresholds
        draw.line((x, 48, x, 59), fill=(20 + (x - 40), 30, 40))
    return image


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("control") / "shapes.png"
    _shapes().save(path)
    return path


def test_canny_of_shapes_matches_opencv():
    image = np.asarray(_shapes())
    edges = canny_map(image, 100, 200)
    assert edges.shape == (*image.shape[:2], 3) and edges.dtype == np.uint8
    assert (edges[:, :, 0] == edges[:, :, 1]).all() and (edges[:, :, 1] == edges[:, :, 2]).all()
    np.testing.assert_array_equal(edges[:, :, 0], cv2.Canny(image, 100, 200))
    # Edges where the shapes are, none inside the square or on the ramp.
    assert edges[8:31, 6:11, 0].any() and edges[6:11, 8:31, 0].any()
    assert not edges[12:27, 12:27].any()
    assert not edges[50:58, 45:78].any()
    assert set(np.unique(edges)) == {0, 255}


def test_canny_rejects_bad_arrays_and_thresholds():
    with pytest.raises(ControlError, match="uint8"):
        canny_map(np.zeros((8, 8), np.uint8))
    with pytest.raises(ControlError, match="low <= high"):
        canny_map(np.zeros((8, 8, 3), np.uint8), 200, 100)


def test_control_map_of_another_size_is_resized_to_the_output():
    small = _shapes(40, 30)
    canny = make_control_map("canny", small, SIZE, SIZE)
    assert canny.size == (SIZE, SIZE)  # photo resized (bicubic) before the edges are found
    given = make_control_map("map", small, SIZE, SIZE)
    assert given is small  # a map is used as is ...
    tensor = prepare_control_image(given, SubjectImageProcessor(), SIZE, 48)
    assert tensor.shape == (1, 3, SIZE, 48) and 0 <= tensor.min() and tensor.max() <= 1  # ... then resized
    expected = np.asarray(small.resize((48, SIZE), Image.Resampling.BICUBIC), dtype=np.float64) / 255
    np.testing.assert_allclose(tensor[0].permute(1, 2, 0).numpy(), expected, atol=1e-7)


def test_detector_kinds_need_a_model_that_loads(tmp_path):
    with pytest.raises(ControlError, match="needs a detector"):
        make_control_map("depth", _shapes(), SIZE, SIZE)
    with pytest.raises(ControlError, match="no-such-depth-model"):
        make_control_map("depth", _shapes(), SIZE, SIZE, detector=str(tmp_path / "no-such-depth-model"))
    with pytest.raises(ControlError, match="HED model .*hed.pt"):
        make_control_map("hed", _shapes(), SIZE, SIZE, detector=str(tmp_path / "hed.pt"))


def test_unknown_control_kind_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="generate.control.kind"):
        load_config(None, ["profile=tiny", "generate.control.kind=sobel", "generate.control.image=x.png"])


def _images(out: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("image_*.png"))])


def test_scale_zero_equals_plain_generation_and_scale_one_differs(tmp_path, photo):
    args = [*BASE, "--subject-image", str(photo), "-n", "2"]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    control = ["--control", "canny", "--control-image", str(photo)]
    assert main([*args, *control, "--control-scale", "0", "--out", str(tmp_path / "zero")]) == 0
    assert main([*args, *control, "--out", str(tmp_path / "one")]) == 0
    plain = _images(tmp_path / "plain")
    np.testing.assert_array_equal(_images(tmp_path / "zero"), plain)
    assert np.abs(_images(tmp_path / "one").astype(int) - plain).max() > 0
    settings = (tmp_path / "one" / "generate.yaml").read_text()
    assert "kind: canny" in settings


def test_scale_zero_equals_plain_in_tensors():
    """The same check below PNG rounding: the ControlNet runs, and adds exact zeros."""
    from pipeline.config import PROFILE_CONTROLNETS, PROFILE_MODELS
    from pipeline.model import BlipDiffusion
    from pipeline.model.control import Control, load_controlnet

    model = BlipDiffusion.from_pretrained(PROFILE_MODELS["tiny"]["blip_diffusion"])
    controlnet = load_controlnet(PROFILE_CONTROLNETS["tiny"]["canny"], dtype=torch.float32, device="cpu")
    image = prepare_control_image(make_control_map("canny", _shapes(), SIZE, SIZE), model.image_processor, SIZE, SIZE)
    kwargs = {"subject_images": [_shapes()], "category": "dog", "steps": 2, "height": SIZE, "width": SIZE}
    kwargs |= {"seed": 1, "output_type": "pt", "progress": False}
    plain = model.generate("on the grass", **kwargs)
    assert torch.equal(model.generate("on the grass", control=Control(controlnet, image, 0.0), **kwargs), plain)


def test_bad_control_input_exits_2(tmp_path, capsys, photo):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    args = [*BASE, "--subject-image", str(photo), "--out", str(tmp_path / "o")]
    assert main([*args, "--control", "canny", "--control-image", str(notes)]) == 2
    assert "notes.txt is not a readable image" in capsys.readouterr().err
    assert main([*args, "--control", "sobel", "--control-image", str(photo)]) == 2
    err = capsys.readouterr().err
    assert "generate.control.kind" in err and "sobel" in err
    assert main([*args, "--control", "canny"]) == 2
    assert "generate.control.image is needed" in capsys.readouterr().err
    assert main([*args, "--control", "canny", "--control-image", str(photo), "--controlnet", str(tmp_path / "none")]) == 2
    assert "cannot load the ControlNet" in capsys.readouterr().err
    assert main([*args, "--control", "canny", "--control-image", str(photo), "--control-scale", "-1"]) == 2
    assert "generate.control.scale" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def tiny():
    """The tiny profile's model and canny ControlNet, float32 on the CPU."""
    from pipeline.config import PROFILE_CONTROLNETS, PROFILE_MODELS
    from pipeline.model import BlipDiffusion
    from pipeline.model.control import load_controlnet

    model = BlipDiffusion.from_pretrained(PROFILE_MODELS["tiny"]["blip_diffusion"])
    return model, load_controlnet(PROFILE_CONTROLNETS["tiny"]["canny"], dtype=torch.float32, device="cpu")


def _with_config(controlnet, **changes):
    """A copy of `controlnet` with config `changes` (weights that still fit are kept)."""
    from diffusers import ControlNetModel

    model = ControlNetModel.from_config({**controlnet.config, **changes})
    model.load_state_dict(controlnet.state_dict(), strict=False)
    return model.eval()


@torch.no_grad()
@pytest.mark.parametrize("order", ["rgb", "bgr"])
def test_controlnet_step_with_the_cached_embedding_equals_diffusers_forward(tiny, order):
    """`controlnet_residuals` with the map embedded once, at batch 1, against diffusers'
    ControlNetModel.forward on the map expanded to the batch: two rows at different timesteps."""
    from pipeline.model.control import Control, controlnet_residuals

    controlnet = tiny[1] if order == "rgb" else _with_config(tiny[1], controlnet_conditioning_channel_order=order)
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, SIZE, SIZE, generator=generator)
    latents = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=generator)
    embeds = torch.randn(2, 77, 32, generator=generator)
    timesteps = torch.tensor([10, 700])
    control = Control(controlnet, image, 0.7).prepared()
    assert control.embedding.shape[0] == 1
    down, mid = controlnet_residuals(controlnet, latents, timesteps, embeds, control.embedding, 0.7)
    want_down, want_mid = controlnet(
        latents, timesteps, encoder_hidden_states=embeds, controlnet_cond=image.expand(2, -1, -1, -1),
        conditioning_scale=0.7, return_dict=False,
    )
    assert len(down) == len(want_down) == 8  # conv_in, then 4 resnets and 3 downsamplers
    for ours, theirs in zip([*down, mid], [*want_down, want_mid], strict=True):
        assert ours.shape == theirs.shape
        # The float32 parity bound: the map is embedded at batch 1 here and at batch 2 by
        # diffusers, and the convolutions' rounding at each batch size depends on the CPU's
        # kernels (one CPU differed by 1.1e-6).
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert not torch.allclose(down[0][0], down[0][1])  # the timesteps differ per row


@pytest.mark.parametrize(
    "change",
    [{"class_embed_type": "timestep"}, {"num_class_embeds": 3}, {"global_pool_conditions": True}],
    ids=lambda change: next(iter(change)),
)
def test_unsupported_controlnet_config_is_a_control_error_naming_it(tiny, change):
    """A ControlNet whose config needs inputs we never pass, or that pools its residuals, is
    refused before any step rather than run with a part of it left out."""
    from pipeline.model.control import Control

    controlnet = _with_config(tiny[1], **change)
    key = next(iter(change))
    with pytest.raises(ControlError, match=f"{key}={change[key]!r} are not supported"):
        Control(controlnet, torch.zeros(1, 3, SIZE, SIZE)).prepared()


def test_the_map_is_embedded_once_per_generation(tiny):
    """Once for a generation of two batches of three guided steps (it was every UNet call), and
    once per denoising loop for a caller that hands `_denoise` a Control as it is (the server)."""
    from pipeline.model.control import Control
    from pipeline.model.schedulers import fresh_scheduler

    model, controlnet = tiny
    control = Control(controlnet, torch.rand(1, 3, SIZE, SIZE), 1.0)
    calls: list[int] = []
    handle = controlnet.controlnet_cond_embedding.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        model.generate(
            "on the grass", subject_embeds=torch.zeros(1, 16, 32), category="dog", num_images=2, batch_size=1,
            steps=3, height=SIZE, width=SIZE, seed=0, output_type="pt", progress=False, control=control,
        )
        assert len(calls) == 1
        scheduler = fresh_scheduler(model.scheduler)
        scheduler.set_timesteps(3)
        cond = torch.zeros(1, 77, 32)
        model._denoise(torch.randn(1, 4, SIZE // 8, SIZE // 8), cond, cond, scheduler, 7.5, False, control=control)
        assert len(calls) == 2
    finally:
        handle.remove()


@torch.no_grad()
def test_controlnet_and_unet_trace_as_one_graph(tiny):
    """What `compile_for_inference(control=True)` relies on: the ControlNet step and the UNet
    trace into one graph with no break, so under CUDA graphs no residual leaves it."""
    from pipeline.model.control import Control

    model, controlnet = tiny
    control = Control(controlnet, torch.rand(1, 3, SIZE, SIZE), 0.5).prepared()
    latents, embeds, t = torch.randn(2, 4, SIZE // 8, SIZE // 8), torch.randn(2, 77, 32), torch.tensor(500)
    step = torch.compile(model._controlled_noise, backend="eager", fullgraph=True)
    args = (latents, t, embeds, controlnet, control.embedding, control.scale)
    torch.testing.assert_close(step(*args), model._controlled_noise(*args), rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("latent_side", [SIZE // 8, 10])  # 10: not a multiple of the tiny UNet's 8, upsample sizes given
def test_the_unets_two_halves_with_residuals_equal_its_forward(tiny, latent_side):
    """control_step.unet_encode then unet_decode, the split the ControlNet's side stream runs
    beside, is UNet2DConditionModel.forward with the ControlNet's residuals, bit for bit."""
    from pipeline.model.control import Control, controlnet_residuals
    from pipeline.model.control_step import supports_unet, unet_decode, unet_encode

    model, controlnet = tiny
    assert supports_unet(model.unet)
    control = Control(controlnet, torch.rand(1, 3, latent_side * 8, latent_side * 8), 0.7).prepared()
    latents, embeds, t = torch.randn(2, 4, latent_side, latent_side), torch.randn(2, 77, 32), torch.tensor(321)
    down, mid = controlnet_residuals(controlnet, latents, t, embeds, control.embedding, control.scale)
    expected = model.unet(latents, t, encoder_hidden_states=embeds, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
    hidden, skips, time = unet_encode(model.unet, latents, t, embeds)
    assert torch.equal(unet_decode(model.unet, hidden, skips, time, embeds, down, mid), expected)


@torch.no_grad()
def test_a_controlled_step_gives_the_one_call_steps_noise(tiny):
    """ControlledStep (compiled, its parts traced with Dynamo's eager backend; on a CPU they run
    one after another) returns what `_controlled_noise`, the ControlNet and UNet in one call, does."""
    from pipeline.model.control import Control
    from pipeline.model.control_step import ControlledStep

    model, controlnet = tiny
    control = Control(controlnet, torch.rand(1, 3, SIZE, SIZE), 0.5).prepared()
    args = (torch.randn(2, 4, SIZE // 8, SIZE // 8), torch.tensor(500), torch.randn(2, 77, 32), controlnet, control.embedding, 0.5)
    torch._dynamo.reset()
    try:
        step = ControlledStep(model.unet, lambda fn: torch.compile(fn, backend="eager", fullgraph=True))
        assert torch.equal(step(*args), model._controlled_noise(*args))
    finally:
        torch._dynamo.reset()


def test_a_unet_the_halves_do_not_follow_keeps_the_one_call_step(tiny):
    """A UNet with a class embedding (not SD 1.5's layout) is not split: compile_for_inference
    compiles the one-call step instead of a ControlledStep."""
    from pipeline.config import PROFILE_MODELS
    from pipeline.model import BlipDiffusion
    from pipeline.model.control_step import ControlledStep, supports_unet

    model = BlipDiffusion.from_pretrained(PROFILE_MODELS["tiny"]["blip_diffusion"])
    model.unet.register_to_config(class_embed_type="timestep")
    assert not supports_unet(model.unet)
    torch._dynamo.reset()
    try:
        model.compile_for_inference(control=True, backend="eager")
        assert not isinstance(model._controlled_noise, ControlledStep)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_a_step_that_reuses_its_output_buffer_gives_the_same_images(tiny, monkeypatch, guidance):
    """The compiled ControlNet+UNet step under CUDA graphs ("reduce-overhead") hands out its
    graph's output buffer, which the next step's replay overwrites (the residuals between two
    graphs hit this on an H100: 'accessing tensor output of CUDAGraphs that has been
    overwritten'). PNDM keeps past noise predictions: the loop must keep copies."""
    from pipeline.model.control import Control

    model, controlnet = tiny
    buffer = torch.zeros(2 if guidance > 1 else 1, 4, SIZE // 8, SIZE // 8)

    def fresh(latents, t, embeds, *args):
        return torch.sin(latents * 3 + float(t) / 100)

    def replayed(latents, t, embeds, *args):  # as a CUDA graph replay: the same buffer every step
        return buffer.copy_(fresh(latents, t, embeds))

    kwargs = {"subject_embeds": torch.zeros(1, 16, 32), "category": "dog", "steps": 4, "height": SIZE, "width": SIZE}
    kwargs |= {"seed": 2, "output_type": "pt", "progress": False, "guidance_scale": guidance}
    control = Control(controlnet, torch.rand(1, 3, SIZE, SIZE), 1.0)
    monkeypatch.setattr(model, "_controlled_noise", fresh)
    expected = model.generate("on the grass", control=control, **kwargs)
    monkeypatch.setattr(model, "_controlled_noise", replayed)
    assert torch.equal(model.generate("on the grass", control=control, **kwargs), expected)


def _diffusers_keep(num_steps: int, start: float, end: float) -> list[float]:
    """diffusers' StableDiffusionControlNetPipeline.__call__, "7.2 Create tensor stating which
    controlnets to keep" (0.42.1), for one ControlNet, as written there."""
    return [1.0 - float(i / num_steps < start or (i + 1) / num_steps > end) for i in range(num_steps)]


@pytest.mark.parametrize("steps", [1, 3, 5, 10, 50, 51])
@pytest.mark.parametrize("window", [(0.0, 1.0), (0.0, 0.5), (0.2, 0.8), (0.5, 1.0), (0.0, 0.6), (0.3, 0.7), (0.0, 0.1)])
def test_the_window_steers_the_steps_diffusers_keeps(steps, window):
    from pipeline.model.control import steered_steps

    assert [float(kept) for kept in steered_steps(steps, *window)] == _diffusers_keep(steps, *window)


def test_the_window_by_example():
    from pipeline.model.control import steered_steps

    assert steered_steps(10, 0.0, 0.5) == [True] * 5 + [False] * 5
    assert steered_steps(10, 0.2, 0.8) == [False] * 2 + [True] * 6 + [False] * 2
    assert steered_steps(4) == [True] * 4


def _windowed(tiny, start: float = 0.0, end: float = 1.0, scale: float = 1.0):
    from pipeline.model.control import Control

    image = prepare_control_image(make_control_map("canny", _shapes(), SIZE, SIZE), tiny[0].image_processor, SIZE, SIZE)
    return Control(tiny[1], image, scale, start=start, end=end)


# Four steps of PNDM are five UNet calls (its first step twice): the window counts calls, as
# diffusers' len(timesteps) does, so end=0.6 keeps 3 of 5 (2 of 4 if it counted steps).
WINDOW_KWARGS = {"subject_embeds": torch.zeros(1, 16, 32), "category": "dog", "steps": 4,
                 "height": SIZE, "width": SIZE, "seed": 5, "output_type": "pt", "progress": False}


def _count_controlnet_calls(monkeypatch, scales: list[float] | None = None) -> list[torch.Tensor]:
    """Wrap the loop's ControlNet step: the timesteps it runs at are recorded; with `scales`,
    call k runs at scales[k] instead of the control's scale."""
    import pipeline.model.blip_diffusion as blip_diffusion

    calls: list[torch.Tensor] = []
    original = blip_diffusion.controlnet_residuals

    def counted(controlnet, latents, timestep, embeds, embedding, scale):
        if scales is not None:
            scale = scales[len(calls)]
        calls.append(timestep)
        return original(controlnet, latents, timestep, embeds, embedding, scale)

    monkeypatch.setattr(blip_diffusion, "controlnet_residuals", counted)
    return calls


@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_the_default_window_runs_the_controlnet_every_step(tiny, monkeypatch, guidance):
    calls = _count_controlnet_calls(monkeypatch)
    kwargs = {**WINDOW_KWARGS, "guidance_scale": guidance}
    steered = tiny[0].generate("on the grass", control=_windowed(tiny), **kwargs)
    assert len(calls) == 5
    assert torch.equal(tiny[0].generate("on the grass", control=_windowed(tiny, 0.0, 1.0), **kwargs), steered)


@pytest.mark.parametrize("window", [(0.0, 0.6), (0.2, 0.7)])
def test_a_window_equals_scale_zero_outside_it_and_skips_the_controlnet_there(tiny, monkeypatch, window):
    """Outside its window the loop calls the plain UNet: the same noise as the ControlNet at
    scale 0 (diffusers' way), without the ControlNet's cost."""
    from pipeline.model.control import steered_steps
    from pipeline.model.schedulers import fresh_scheduler

    model = tiny[0]
    keep = steered_steps(5, *window)
    scheduler = fresh_scheduler(model.scheduler)
    scheduler.set_timesteps(4)
    calls = _count_controlnet_calls(monkeypatch)
    windowed = model.generate("on the grass", control=_windowed(tiny, *window), **WINDOW_KWARGS)
    assert [int(t) for t in calls] == [int(t) for t, kept in zip(scheduler.timesteps, keep, strict=True) if kept]
    assert 0 < len(calls) < 5
    monkeypatch.undo()
    _count_controlnet_calls(monkeypatch, scales=[1.0 if kept else 0.0 for kept in keep])
    zeroed = model.generate("on the grass", control=_windowed(tiny), **WINDOW_KWARGS)
    assert torch.equal(windowed, zeroed)
    monkeypatch.undo()
    full = model.generate("on the grass", control=_windowed(tiny), **WINDOW_KWARGS)
    plain = model.generate("on the grass", **WINDOW_KWARGS)
    assert not torch.equal(windowed, full) and not torch.equal(windowed, plain)


def test_a_window_that_keeps_no_step_is_plain_generation(tiny, monkeypatch):
    calls = _count_controlnet_calls(monkeypatch)
    windowed = tiny[0].generate("on the grass", control=_windowed(tiny, 0.0, 0.1), **WINDOW_KWARGS)
    assert not calls
    assert torch.equal(windowed, tiny[0].generate("on the grass", **WINDOW_KWARGS))


@pytest.mark.parametrize("window", [(0.5, 0.5), (0.7, 0.3), (-0.1, 1.0), (0.0, 1.5), (float("nan"), 1.0)])
def test_a_bad_window_is_a_control_error(window):
    with pytest.raises(ControlError, match=r"0 <= start < end <= 1"):
        from pipeline.model.control import Control

        Control(None, torch.zeros(1, 3, SIZE, SIZE), 1.0, start=window[0], end=window[1])


@pytest.mark.parametrize("flags, key", [
    (["--control-start", "0.6", "--control-end", "0.3"], "generate.control.start (0.6) must be below generate.control.end (0.3)"),
    (["--control-start", "0.5", "--control-end", "0.5"], "generate.control.start (0.5) must be below"),
    (["--control-end", "1.5"], "generate.control.end"),
    (["--control-end", "0"], "generate.control.end"),
    (["--control-start", "-0.1"], "generate.control.start"),
    (["--control-start", "nan"], "generate.control.start"),
])
def test_a_bad_window_exits_2_naming_it(tmp_path, capsys, photo, flags, key):
    args = [*BASE, "--subject-image", str(photo), "--out", str(tmp_path / "o"), "--control", "canny", "--control-image", str(photo)]
    assert main([*args, *flags]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_window_that_is_not_a_number_exits_2(tmp_path, capsys, photo):
    args = [*BASE, "--subject-image", str(photo), "--out", str(tmp_path / "o"), "--control", "canny", "--control-image", str(photo)]
    with pytest.raises(SystemExit) as info:
        main([*args, "--control-start", "late"])
    assert info.value.code == 2 and "--control-start: invalid float value: 'late'" in capsys.readouterr().err


def test_the_cli_window_reaches_the_loop(tmp_path, photo, monkeypatch):
    """`--control-end` is the Control's end: with 2 steps (3 UNet calls) 0.3 keeps none of them,
    which draws what plain generate draws."""
    calls = _count_controlnet_calls(monkeypatch)
    args = [*BASE, "--subject-image", str(photo)]
    control = ["--control", "canny", "--control-image", str(photo)]
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    assert main([*args, *control, "--control-end", "0.3", "--out", str(tmp_path / "none")]) == 0
    assert not calls
    np.testing.assert_array_equal(_images(tmp_path / "none"), _images(tmp_path / "plain"))
    assert main([*args, *control, "--control-start", "0.3", "--out", str(tmp_path / "late")]) == 0
    assert len(calls) == 2  # 1/3 < 0.3 is false: calls 1 and 2
    assert "start: 0.3" in (tmp_path / "late" / "generate.yaml").read_text()


def test_a_compiled_model_runs_both_graphs_in_one_window(tiny):
    """compile_for_inference(control=True): a window alternates the compiled ControlNet+UNet
    step and the compiled plain UNet in one loop, and draws what the eager model draws."""
    from pipeline.config import PROFILE_MODELS
    from pipeline.model import BlipDiffusion

    model = BlipDiffusion.from_pretrained(PROFILE_MODELS["tiny"]["blip_diffusion"])
    control = _windowed(tiny, 0.2, 0.7)
    eager = model.generate("on the grass", control=control, **WINDOW_KWARGS)
    torch._dynamo.reset()
    try:
        model.compile_for_inference(control=True, backend="eager")
        compiled = model.generate("on the grass", control=control, **WINDOW_KWARGS)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


@torch.no_grad()
def test_a_controlnet_takes_the_channels_last_layout_of_a_compiled_unet():
    """compile_for_inference makes the UNet channels-last; a ControlNet loaded later (the server,
    the pyfunc) ran in the other layout, a layout copy at every residual. Its first generation
    now converts it, and draws what it drew before within float rounding."""
    from pipeline.config import PROFILE_CONTROLNETS, PROFILE_MODELS
    from pipeline.model import BlipDiffusion
    from pipeline.model.control import Control, load_controlnet

    model = BlipDiffusion.from_pretrained(PROFILE_MODELS["tiny"]["blip_diffusion"])
    controlnet = load_controlnet(PROFILE_CONTROLNETS["tiny"]["canny"], dtype=torch.float32, device="cpu")
    args = {"subject_embeds": torch.zeros(1, 16, 32), "category": "dog", "steps": 2, "height": SIZE, "width": SIZE, "seed": 0,
            "output_type": "pt", "progress": False}
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    before = model.generate("on the grass", control=Control(controlnet, image, 1.0), **args)
    weight = controlnet.conv_in.weight
    assert weight.is_contiguous() and not weight.is_contiguous(memory_format=torch.channels_last)
    model.unet.to(memory_format=torch.channels_last)
    after = model.generate("on the grass", control=Control(controlnet, image, 1.0), **args)
    assert controlnet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_a_captured_controlled_step_is_reused_only_for_the_same_nets_at_the_same_addresses(tiny, monkeypatch):
    """ControlledStep's CUDA-graph cache (its GPU path, with the capture recorded, not run): one
    capture per input shape and ControlNet; a ControlNet whose weights moved (converted, moved
    to another device) or a new one given a dead one's id is captured anew, since a graph
    replays the addresses it was captured with."""
    import gc
    import weakref
    from types import SimpleNamespace

    from pipeline.model import control_step

    model, controlnet = tiny
    captures = []

    class Recorded:
        def __init__(self, step, inputs):
            captures.append(inputs)

        def __call__(self, inputs):
            return "noise"

    monkeypatch.setattr(control_step, "_Captured", Recorded)
    cuda = torch.device("cuda", 0)  # a descriptor only: nothing runs on it
    inputs = [SimpleNamespace(shape=(2, 4, 8, 8), dtype=torch.float16, device=cuda) for _ in range(4)]
    step = control_step.ControlledStep(model.unet, lambda fn: fn, cuda_graphs=True)
    assert step(*inputs[:3], controlnet, inputs[3], 1.0) == "noise"
    step(*inputs[:3], controlnet, inputs[3], 1.0)
    assert len(captures) == 1
    first = next(controlnet.parameters())
    first.data = first.data.clone()  # the weights at another address, as .to() leaves them
    step(*inputs[:3], controlnet, inputs[3], 1.0)
    assert len(captures) == 2
    for key, (captured, _) in list(step._captured.items()):  # as if the ControlNet of the entry had died
        dead = torch.nn.Linear(1, 1)
        ref = weakref.ref(dead)
        del dead
        gc.collect()
        step._captured[key] = (captured, ref)
    step(*inputs[:3], controlnet, inputs[3], 1.0)
    assert len(captures) == 3


def test_a_folder_that_is_not_a_controlnet_is_named(tmp_path):
    # --controlnet at the checkpoint's unet/ folder: diffusers left the ControlNet's own
    # weights on the meta device and .to(device) ended in a NotImplementedError stack trace.
    import shutil

    from pipeline.config import ASSETS_DIR
    from pipeline.model.control import load_controlnet

    unet = ASSETS_DIR / "tiny-blipdiffusion" / "unet"
    with pytest.raises(ControlError, match="not a whole ControlNet"):
        load_controlnet(unet, dtype=torch.float32, device="cpu")
    shutil.copytree(unet, tmp_path / "deep")
    (tmp_path / "deep" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ControlError, match="deep"):
        load_controlnet(tmp_path / "deep", dtype=torch.float32, device="cpu")
