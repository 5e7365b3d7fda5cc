"""pipeline/serving/subjects.py photo_bytes: a request's base64 photo as its encoded bytes."""

import base64

import pytest

from pipeline.config import load_config
from pipeline.serving.requests import RequestError
from pipeline.serving.subjects import photo_bytes

DECODE = load_config(overrides=["profile=tiny"]).data.decode
DATA = bytes(range(256)) * 3


@pytest.mark.parametrize("text", [
    # GNU `base64 photo.jpg` (without -w0) breaks its output every 76 characters, as MIME does;
    # such a photo was a 400 "is not valid base64".
    "\n".join(base64.encodebytes(DATA).decode().splitlines()),
    base64.encodebytes(DATA).decode().replace("\n", "\r\n"),
    "data:image/png;base64," + base64.encodebytes(DATA).decode(),
    " " + base64.b64encode(DATA).decode() + "\n",
], ids=["lines", "crlf", "data-url-lines", "padded"])
def test_base64_broken_into_lines_reads_as_the_same_bytes(text):
    assert photo_bytes(text, "reference_images[0]", DECODE) == DATA


@pytest.mark.parametrize("text", ["not base64!", "QUJD\n!", "   "])
def test_what_is_not_base64_is_still_a_400_naming_the_field(text):
    with pytest.raises(RequestError, match="reference_images.0.: is (not valid base64|empty)"):
        photo_bytes(text, "reference_images[0]", DECODE)
