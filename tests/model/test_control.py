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


class _ReplayedBuffers(torch.nn.Module):
    """A ControlNet as CUDA graphs run it: every call writes its outputs into the same buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.down, self.mid = [torch.zeros(1, 4, 8, 8) for _ in range(3)], torch.zeros(1, 4, 4, 4)

    def forward(self, latents, timestep, **kwargs):
        for buffer in (*self.down, self.mid):
            buffer.fill_(float(timestep))
        return self.down, self.mid


def test_residuals_outlive_the_controlnets_next_call():
    """Reproduces 'accessing tensor output of CUDAGraphs that has been overwritten' (the compiled
    ControlNet on an H100): the residuals a step hands to the UNet must be its own tensors."""
    from pipeline.model.control import Control

    control = Control(_ReplayedBuffers(), torch.zeros(1, 3, 64, 64))
    latents, embeds = torch.zeros(1, 4, 8, 8), torch.zeros(1, 77, 32)
    down, mid = control.residuals(latents, torch.tensor(1.0), embeds)
    control.residuals(latents, torch.tensor(2.0), embeds)  # the next step's call replays the graph
    assert all(torch.all(r == 1.0) for r in down) and torch.all(mid == 1.0)
