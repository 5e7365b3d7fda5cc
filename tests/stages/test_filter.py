import numpy as np
import pytest
import torch

from stages.filter import check_excluded, check_matte, prompt_areas
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


def planted_figure_logits(height: int = 40, width: int = 40) -> torch.Tensor:
    """CLIPSeg logits (h, w) of a planted figure: +8 (confidence 0.9997) on a box half the
    height and a quarter of the width (12.5% of the map, for sides divisible by 8), -8 elsewhere."""
    logits = torch.full((height, width), -8.0)
    logits[height // 4 : height // 4 + height // 2, width // 8 : width // 8 + width // 4] = 8.0
    return logits


def test_prompt_areas_count_the_confident_fraction_of_each_map():
    figure = planted_figure_logits()  # 200 of 1,600 pixels
    areas = prompt_areas(torch.stack([figure, torch.full_like(figure, -8.0)])[:, None])  # (P=2, B=1)
    np.testing.assert_allclose(areas, [[0.125], [0.0]])


def test_a_planted_figure_is_rejected_naming_the_prompt():
    area = float(prompt_areas(planted_figure_logits()))  # 12.5% of the photo
    with pytest.raises(Reject, match=r"'person' on 12.5% of the photo > exclude_area 5.0%") as info:
        check_excluded({"dog": 0.0, "person": area}, "dog", exclude_area=0.05)
    assert info.value.stage == "filter"
    check_excluded({"person": area}, "dog", exclude_area=0.2)  # a smaller figure passes
    check_excluded({"person": area}, "Person", exclude_area=0.05)  # a dataset of people keeps them
