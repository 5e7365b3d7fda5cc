import numpy as np
import pytest

from stages.filter import check_matte
from stages.records import Reject


def test_area_is_mean_alpha():
    alpha = np.zeros((10, 10), np.float32)
    alpha[:5] = 1.0
    assert check_matte(alpha) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "fill, match",
    [(0.0, "empty matte"), (0.3, "empty matte"), (1.0, "fills the photo")],
)
def test_unusable_mattes_are_rejected(fill, match):
    with pytest.raises(Reject, match=match) as info:
        check_matte(np.full((10, 10), fill, np.float32))
    assert info.value.stage == "filter"


def test_small_subject_is_rejected():
    alpha = np.zeros((100, 100), np.float32)
    alpha[0, 0] = 1.0
    with pytest.raises(Reject, match="too small"):
        check_matte(alpha, min_area=0.01)
