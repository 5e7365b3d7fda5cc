"""Training methods: what trains, the prompt, and a checkpoint that reloads as the same model."""

import pytest
import torch

from pipeline.cli import build_parser
from pipeline.config import FINETUNE_METHODS, TRAIN_METHODS, ConfigError, load_config
from pipeline.model import BlipDiffusion
from pipeline.train.losses import add_noise, diffusion_target
from pipeline.train.methods import METHODS, Pretrain, get_method

TINY = ["profile=tiny"]


def _names(method, params):
    ids = {id(p) for p in params}
    return {name.split(".")[1] for name, p in method.named_parameters() if id(p) in ids}


def test_pretrain_trains_the_configured_parts_and_never_the_vit_or_vae():
    method = Pretrain.load(load_config(overrides=TINY))
    params = method.trainable_parameters()
    assert _names(method, params) == {"qformer", "text_encoder", "unet"}
    named = dict(method.named_parameters())
    assert not any(p.requires_grad for n, p in named.items() if ".visual_encoder." in n or n.startswith("model.vae."))
    assert named["model.qformer.query_tokens"].requires_grad and named["model.qformer.proj_layer.dense1.weight"].requires_grad

    frozen = Pretrain.load(load_config(overrides=[*TINY, "train.trainable.unet=false", "train.trainable.qformer=false"]))
    params = frozen.trainable_parameters()
    assert _names(frozen, params) == {"qformer", "text_encoder"}
    named = dict(frozen.named_parameters())
    trainable_qformer = {n for n, p in named.items() if n.startswith("model.qformer.") and p.requires_grad}
    assert trainable_qformer and all(".proj_layer." in n for n in trainable_qformer)  # the projection alone


def test_prompts_use_the_caption_or_the_template():
    method = Pretrain.load(load_config(overrides=[*TINY, "train.prompt_template=a photo of {category}"]))
    assert method.build_prompts(["dog", "cat"], ["", "on a sofa"]) == ["a photo of dog", "a cat on a sofa"]


def test_frozen_encoders_stay_in_eval_mode():
    method = Pretrain.load(load_config(overrides=TINY)).train()
    assert method.model.unet.training and method.model.qformer.training
    assert not method.model.vae.training and not method.model.qformer.visual_encoder.training


def test_checkpoint_reloads_with_the_same_outputs(tmp_path):
    """A few optimizer steps in memory, then save: from_pretrained gives the same predictions."""
    torch.manual_seed(0)
    method = Pretrain.load(load_config(overrides=TINY))
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=1e-2)
    alphas = method.model.scheduler.alphas_cumprod
    pixels, latents = torch.randn(2, 3, 224, 224), torch.randn(2, 4, 8, 8)
    categories, prompts = ["dog", "cat"], ["a dog", "a cat"]
    for _ in range(3):
        noise, t = torch.randn_like(latents), torch.randint(0, 1000, (2,))
        prediction = method(pixels, categories, prompts, add_noise(latents, noise, t, alphas), t, torch.tensor([False, True]))
        loss = method.loss(prediction, diffusion_target(latents, noise, t, alphas, "epsilon"))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    method.eval()
    method.save(tmp_path)
    reloaded = BlipDiffusion.from_pretrained(tmp_path / Pretrain.MODEL_FOLDER)
    base = BlipDiffusion.from_pretrained(load_config(overrides=TINY).model_path("blip_diffusion"))
    noisy, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        trained = method(pixels, categories, prompts, noisy, t, torch.tensor([False, False]))
        assert torch.equal(reloaded.predict_noise(pixels, categories, prompts, noisy, t), trained)
        assert not torch.allclose(base.predict_noise(pixels, categories, prompts, noisy, t), trained)


def test_methods_are_chosen_by_name():
    assert get_method("pretrain") is Pretrain and "pretrain" in METHODS
    with pytest.raises(ConfigError, match="train.method"):
        get_method("nonsense")


def test_method_names_come_from_one_list():
    assert tuple(METHODS) == TRAIN_METHODS == ("pretrain", *FINETUNE_METHODS)
    commands = build_parser()._subparsers._group_actions[0].choices
    for command in ("finetune", "finetune-many"):
        (method,) = [a for a in commands[command]._actions if a.dest == "method"]
        assert tuple(method.choices) == FINETUNE_METHODS, command

