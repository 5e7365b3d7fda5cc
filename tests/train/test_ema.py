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


def test_a_fine_tune_with_the_quality_and_memory_options_ships_its_ema(tmp_path):
    """The loop with every option of issue 21 on (EMA, min-SNR, noise offset, gradient
    checkpointing): the checkpoint holds the trained word and its average beside it, the train
    state holds the average for a resume, and the artifact is the average."""
    from safetensors.torch import load_file

    from pipeline.config import load_config
    from pipeline.model.subject import EMBEDS_FILE
    from pipeline.train.finetune import finetune_subject
    from pipeline.train.loop import read_train_state
    from tests.tinydata import publish_dataset

    data = tmp_path / "ds"
    publish_dataset(data, {"dog": "dog"}, per_subject=2, size=(40, 32))
    config = load_config(overrides=[
        "profile=tiny", "train.resolution=32", "tracking.enabled=false", "finetune.method=textual-inversion",
        f"finetune.subject={data}", "finetune.subject_id=dog", "finetune.steps=2", "finetune.validate_every=0",
        "finetune.select=last", f"finetune.out={tmp_path / 'out'}", f"train.storage_path={tmp_path / 'runs'}",
        "train.ema_decay=0.5", "train.snr_gamma=5", "train.noise_offset=0.1", "train.gradient_checkpointing=true",
    ])  # fmt: skip
    result = finetune_subject(config, in_process=True)
    (checkpoint,) = (tmp_path / "runs").glob("*/step-*")
    trained = load_file(checkpoint / "subject" / EMBEDS_FILE)["subject_embeds"]
    averaged = load_file(checkpoint / EMA_FOLDER / "subject" / EMBEDS_FILE)["subject_embeds"]
    assert trained.shape == averaged.shape == (1, 1, trained.shape[-1]) and not torch.equal(trained, averaged)
    assert torch.equal(read_train_state(checkpoint)["ema"]["shadow"][0].cpu(), averaged)
    assert torch.equal(load_file(f"{result.artifact}/{EMBEDS_FILE}")["subject_embeds"], averaged)
