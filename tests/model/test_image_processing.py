"""pipeline/model/image_processing.py: the photos generate and edit read from files."""

import pytest

from pipeline.errors import UserError
from pipeline.model.image_processing import load_image, read_rgb
from tests.imagefiles import tricky_files


@pytest.mark.parametrize("read", [load_image, lambda path: read_rgb(path, UserError, "image")], ids=["load_image", "read_rgb"])
def test_a_photo_is_read_upright_by_its_exif_orientation(tmp_path, read):
    # A phone's portrait photo is stored landscape with orientation 6, as the data build reads it
    # (stages/decode.py) and diffusers' load_image does; read sideways, an edit came back sideways.
    name, data = tricky_files()["rotated.jpg"]
    (tmp_path / name).write_bytes(data)
    assert read(tmp_path / name).size == (150, 200)  # stored 200x150
