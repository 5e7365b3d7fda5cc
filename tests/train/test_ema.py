"""The EMA of the trained weights against hand-computed values."""

import pytest
import torch
from torch import nn

from pipeline.train.ema import EMA, EMA_FOLDER, model_folder


def test_ema_update_swap_and_state_match_hand_computed_values():
    param = nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = EMA([param], decay=0.9)
    with torch.no_grad():
        param.copy_(torch.tensor([3.0, 4.0]))
    ema.update()  # 0.9 * [1, 2] + 0.1 * [3, 4]
    assert torch.allclose(ema.shadow[0], torch.tensor([1.2, 2.2]))
    with torch.no_grad():
        param.copy_(torch.tensor([5.0, 6.0]))
    ema.update()  # 0.9 * [1.2, 2.2] + 0.1 * [5, 6]
    assert torch.allclose(ema.shadow[0], torch.tensor([1.58, 2.58]))

    storage = param.data_ptr()
    with ema.applied():
        assert torch.allclose(param, torch.tensor([1.58, 2.58])) and param.data_ptr() == storage
    assert torch.equal(param.detach(), torch.tensor([5.0, 6.0]))

    resumed = EMA([nn.Parameter(torch.zeros(2))], decay=0.9)
    resumed.load_state_dict(ema.state_dict())
    assert torch.allclose(resumed.shadow[0], torch.tensor([1.58, 2.58]))
    with pytest.raises(ValueError, match="does not match"):
        EMA([nn.Parameter(torch.zeros(3))], decay=0.9).load_state_dict(ema.state_dict())
    with pytest.raises(ValueError, match="decay"):
        EMA([param], decay=1.0)


def test_a_checkpoint_ships_its_averaged_weights_when_it_has_them(tmp_path):
    (tmp_path / "subject").mkdir()
    assert model_folder(tmp_path, "subject") == tmp_path / "subject"
    (tmp_path / EMA_FOLDER / "subject").mkdir(parents=True)
    assert model_folder(tmp_path, "subject") == tmp_path / EMA_FOLDER / "subject"
