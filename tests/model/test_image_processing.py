"""pipeline/model/image_processing.py: the photos generate and edit read from files."""

import os

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.model.image_processing import load_image, read_rgb
from tests.imagefiles import photo, tricky_files


@pytest.mark.parametrize("read", [load_image, lambda path: read_rgb(path, UserError, "image")], ids=["load_image", "read_rgb"])
def test_a_photo_is_read_upright_by_its_exif_orientation(tmp_path, read):
    # A phone's portrait photo is stored landscape with orientation 6, as the data build reads it
    # (stages/decode.py) and diffusers' load_image does; read sideways, an edit came back sideways.
    name, data = tricky_files()["rotated.jpg"]
    (tmp_path / name).write_bytes(data)
    assert read(tmp_path / name).size == (150, 200)  # stored 200x150


@pytest.mark.parametrize("read", [load_image, lambda path: read_rgb(path, UserError, "image")], ids=["load_image", "read_rgb"])
def test_a_sixteen_bit_photo_is_scaled_not_clipped_white(tmp_path, read):
    # PIL's convert("RGB") clips 16-bit values at 255: the subject was a white square.
    name, data = tricky_files()["gray16.png"]
    (tmp_path / name).write_bytes(data)
    gray = np.asarray(read(tmp_path / name).convert("L"))
    assert np.array_equal(gray, np.asarray(photo(3, (200, 150)).convert("L")))


@pytest.mark.parametrize("read", [load_image, lambda path: read_rgb(path, UserError, "image")], ids=["load_image", "read_rgb"])
def test_a_fifo_given_as_a_photo_is_an_error_not_a_hang(tmp_path, read):
    # Opening a FIFO blocks until a writer comes: `generate --subject-image fifo` hung forever.
    os.mkfifo(tmp_path / "photo.jpg")
    with pytest.raises(UserError, match="not a regular file"):
        read(tmp_path / "photo.jpg")


@pytest.mark.parametrize("read", [load_image, lambda path: read_rgb(path, UserError, "image")], ids=["load_image", "read_rgb"])
def test_a_folder_given_as_a_photo_is_an_error(tmp_path, read):
    with pytest.raises(UserError, match="not a regular file"):
        read(tmp_path)
