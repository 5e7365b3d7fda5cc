import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from stages.decode import decode_batch, decode_image, read_bytes
from stages.records import HEIGHT, IMAGE, REJECT_REASON, REJECT_STAGE, SOURCE_PATH, SOURCE_URI, WIDTH, Reject
from tests.imagefiles import EXPECTED_REASON, broken_files, jpeg_bytes, photo, png_header_only, tricky_files


@pytest.mark.parametrize("name", sorted(EXPECTED_REASON))
def test_broken_file_is_rejected_with_reason(tmp_path, name):
    file_name, data = broken_files()[name]
    path = tmp_path / file_name
    path.write_bytes(data)
    with pytest.raises(Reject) as info:
        decode_image(read_bytes(str(path), max_bytes=10**8), size=64)
    assert info.value.stage == "decode"
    assert EXPECTED_REASON[name] in info.value.reason


def test_importing_decode_keeps_pils_bomb_guard_for_every_other_reader():
    # The CLI imports this module for every command, and generate/edit read their photos with
    # plain PIL: a 1 MB PNG claiming 40000x40000 px must still be refused there, not decoded.
    code = "import PIL.Image, stages.decode; print(PIL.Image.MAX_IMAGE_PIXELS)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() != "None"


def test_header_beyond_pils_own_limit_is_rejected_as_too_large():
    with pytest.raises(Reject, match="image too large"):
        decode_image(png_header_only(100_000, 100_000), max_pixels=10**12)


def test_file_over_byte_limit_is_rejected(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg_bytes(photo()))
    with pytest.raises(Reject, match="file too large"):
        read_bytes(str(path), max_bytes=100)


@pytest.mark.parametrize("name", sorted(tricky_files()))
def test_tricky_file_decodes_to_rgb_at_size(name):
    _, data = tricky_files()[name]
    image = decode_image(data, size=64)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert min(image.shape[:2]) == 64


def test_short_side_is_resized_keeping_aspect():
    image = decode_image(jpeg_bytes(photo(0, (300, 200))), size=100)
    assert image.shape == (100, 150, 3)


def test_exif_rotation_is_applied():
    # Left half red, right half blue; orientation 6 means "rotate 90 degrees clockwise to view",
    # after which red is on top.
    arr = np.zeros((60, 120, 3), np.uint8)
    arr[:, :60] = (255, 0, 0)
    arr[:, 60:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    image = decode_image(jpeg_bytes(Image.fromarray(arr), exif=exif.tobytes()), size=60)
    assert image.shape == (120, 60, 3)  # portrait now
    assert image[10, 30, 0] > 200 and image[10, 30, 2] < 60  # top is red
    assert image[110, 30, 2] > 200 and image[110, 30, 0] < 60  # bottom is blue


def test_sixteen_bit_gray_is_rescaled_not_clipped():
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    import io

    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    image = decode_image(buf.getvalue(), size=64)
    expected = np.rint(ramp.astype(np.float64) / 257.0)
    assert np.abs(image[..., 0].astype(np.float64) - expected).max() <= 1.0


def test_cmyk_colours_survive():
    import io

    buf = io.BytesIO()
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(buf, format="JPEG", quality=95)
    r, g, b = decode_image(buf.getvalue(), size=64)[32, 32].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_transparency_is_flattened_on_white():
    import io

    buf = io.BytesIO()
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(buf, format="PNG")
    assert (decode_image(buf.getvalue(), size=64) == 255).all()


def test_aspect_limit():
    with pytest.raises(Reject, match="aspect ratio"):
        decode_image(jpeg_bytes(photo(0, (500, 100))), size=64, max_aspect=4.0)


def test_batch_adapter_marks_rejects_and_keeps_good_rows(tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg_bytes(photo()))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    batch = {
        SOURCE_URI: np.array(["good.jpg", "bad.jpg"], dtype=object),
        SOURCE_PATH: np.array([str(good), str(bad)], dtype=object),
        REJECT_STAGE: np.array(["", ""], dtype=object),
        REJECT_REASON: np.array(["", ""], dtype=object),
    }
    out = decode_batch(batch, size=48, min_side=8, max_pixels=10**7, max_bytes=10**7, max_aspect=4.0)
    assert list(out[REJECT_STAGE]) == ["", "decode"]
    assert "empty" in out[REJECT_REASON][1]
    assert out[IMAGE][0].shape == (48, 64, 3) and out[IMAGE][1].shape == (1, 1, 3)
    assert list(out[WIDTH]) == [64, 0] and list(out[HEIGHT]) == [48, 0]
    assert out["t_decode"].shape == (2,)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_cut_or_damaged_bytes_are_rejects_never_crashes(fmt):
    # A file cut inside its header used to raise OSError from Image.open ("Truncated File Read",
    # WebP's "could not create decoder object") and fail the whole task.
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, fmt)
    data = buf.getvalue()
    rng = np.random.default_rng(1)
    cases = [data[:cut] for cut in range(1, len(data), max(1, len(data) // 150))]
    for _ in range(150):
        damaged = bytearray(data)
        for pos in rng.integers(0, min(len(data), 600), size=rng.integers(1, 12)):
            damaged[pos] = rng.integers(0, 256)
        cases.append(bytes(damaged))
    outcomes = {"ok": 0, "reject": 0}
    for case in cases:
        try:
            decode_image(case, size=32)
            outcomes["ok"] += 1
        except Reject as reject:
            assert reject.stage == "decode" and reject.reason
            outcomes["reject"] += 1
    assert outcomes["ok"] + outcomes["reject"] == len(cases) and outcomes["reject"] > 0
