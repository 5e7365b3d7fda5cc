"""Memory options: gradient checkpointing changes no loss or gradient, and 8-bit AdamW without
bitsandbytes is a config error naming the extra."""

import importlib.util

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.config import ConfigError, TrainConfig, load_config
from pipeline.model import BlipDiffusion
from pipeline.train.losses import add_noise, diffusion_loss
from pipeline.train.memory import build_optimizer, enable_gradient_checkpointing


def _loss_and_grads(model, embeds):
    """One training forward and backward of the tiny model (subject embeddings spliced into the
    prompt, text encoder and UNet learning): the loss and every gradient by name."""
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    hidden = model.encode_prompts(["a dog on the beach", "a dog"], embeds.expand(2, -1, -1))
    noisy = add_noise(latents, noise, t, model.scheduler.alphas_cumprod)
    loss = diffusion_loss(model.unet(noisy, t, encoder_hidden_states=hidden).sample, noise)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    grads["embeds"] = embeds.grad.clone()
    model.zero_grad(set_to_none=True)
    embeds.grad = None
    return loss.detach(), grads


def _calls(module: nn.Module) -> list[int]:
    """How often `module` starts a forward pass (a pre-hook: a checkpointed recomputation stops
    as soon as it has the tensors the backward pass needs, before forward hooks would run)."""
    count = [0]
    module.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = BlipDiffusion.from_pretrained(load_config(overrides=["profile=tiny"]).model_path("blip_diffusion"))
    model.requires_grad_(False)
    model.unet.requires_grad_(True)
    model.text_encoder.requires_grad_(True)
    model.unet.train()
    model.text_encoder.train()
    embeds = torch.randn(1, model.num_query_tokens, model.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    embeds.requires_grad_(True)
    loss, grads = _loss_and_grads(model, embeds)

    enable_gradient_checkpointing(model.unet, model.text_encoder)
    text_attention = _calls(model.text_encoder.text_model.encoder.layers[0].self_attn)
    unet_resnet = _calls(model.unet.down_blocks[0].resnets[0])
    checkpointed_loss, checkpointed = _loss_and_grads(model, embeds)
    # Checkpointing is on: each layer ran again in the backward pass.
    assert text_attention[0] == 2 and unet_resnet[0] == 2
    assert torch.allclose(checkpointed_loss, loss, atol=1e-5, rtol=0)
    assert checkpointed.keys() == grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        assert torch.allclose(checkpointed[name], grad, atol=1e-5, rtol=1e-5), name


def _subject_gradient(model, embeds, compiled: bool = False):
    """The gradient of the subject embeddings through the text encoder, whose forward runs with
    the math SDPA kernel alone, as `attention_kernels` runs it in training; the backward runs
    outside that context, as the loop's does."""
    encode = torch.compile(model.encode_prompts, backend="aot_eager") if compiled else model.encode_prompts
    with sdpa_kernel([SDPBackend.MATH]):
        hidden = encode(["a dog on the beach", "a dog"], embeds.expand(2, -1, -1))
    hidden.square().sum().backward()
    grad, embeds.grad = embeds.grad, None
    return grad


@pytest.fixture(scope="module")
def frozen_text_encoder():
    """The tiny model with frozen weights and the text encoder in training mode (blipd: the
    gradient reaches only the subject embeddings), and such embeddings."""
    model = BlipDiffusion.from_pretrained(load_config(overrides=["profile=tiny"]).model_path("blip_diffusion"))
    model.requires_grad_(False)
    model.text_encoder.train()
    embeds = torch.randn(1, model.num_query_tokens, model.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(2))
    return model, embeds.requires_grad_(True)


def test_a_checkpointed_layer_is_recomputed_with_the_kernels_of_its_forward(frozen_text_encoder):
    # On an H100, blipd with gradient checkpointing raised torch's CheckpointError ("Recomputed
    # values ... have different metadata"): the forward ran inside `attention_kernels`, the
    # recomputation outside it, with other kernels. The CPU has two kernels to reproduce it with.
    model, embeds = frozen_text_encoder
    plain = _subject_gradient(model, embeds)
    enable_gradient_checkpointing(model.unet, model.text_encoder)
    try:
        assert torch.allclose(_subject_gradient(model, embeds), plain, atol=1e-6, rtol=1e-5)
        # Compiled, the kernels are fixed by the trace; Dynamo rejects our context_fn there.
        assert torch.allclose(_subject_gradient(model, embeds, compiled=True), plain, atol=1e-5, rtol=1e-4)
    finally:
        model.unet.disable_gradient_checkpointing()
        for layer in model.text_encoder.text_model.encoder.layers:
            layer.gradient_checkpointing = False


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_adamw8bit_without_bitsandbytes_names_the_extra():
    with pytest.raises(ConfigError, match=r"train\.optimizer.*subjectforge\[gpu\]"):
        build_optimizer([nn.Parameter(torch.zeros(2))], TrainConfig(optimizer="adamw8bit"), torch.device("cpu"))


def test_adamw_is_torch_adamw_with_the_configured_rate():
    optimizer = build_optimizer([nn.Parameter(torch.zeros(2))], TrainConfig(lr=0.5, weight_decay=0.1), torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == 0.5 and optimizer.defaults["weight_decay"] == 0.1


class _RaiseOutOfMemory:
    """A loop hook that raises torch's CUDA out-of-memory error after the loss of step `at`."""

    def __init__(self, at: int):
        self.at = at

    def __getattr__(self, name):  # the Hook methods it does not define do nothing
        return lambda *args, **kwargs: None

    def after_loss(self, state, loss):
        if state.step == self.at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB.")


@pytest.mark.parametrize(("at", "final"), [(0, True), (1, True), (2, False)])
def test_an_out_of_memory_error_at_the_start_ends_the_run_naming_the_batch(tmp_path, monkeypatch, at, final):
    """Within EARLY_OOM_STEPS of an attempt's start the loop raises OutOfGPUMemory, which Ray
    Train does not retry (the same batch runs out at every restart); later it stays torch's
    error, which Ray Train retries from the newest checkpoint."""
    from pipeline.train import hooks
    from pipeline.train.callbacks import EARLY_OOM_STEPS, OutOfGPUMemory
    from tests.train.test_speed import _train

    assert EARLY_OOM_STEPS == 2
    build = hooks.build_hooks
    monkeypatch.setattr(hooks, "build_hooks", lambda *a: [*build(*a), _RaiseOutOfMemory(at)])
    with pytest.raises((OutOfGPUMemory, torch.OutOfMemoryError)) as failed:
        _train(tmp_path, f"oom{at}", [], monkeypatch)
    assert (type(failed.value) is OutOfGPUMemory) is final
    if final:
        assert (failed.value.step, failed.value.batch_key, failed.value.batch_size) == (at, "train.batch_size", 2)
        assert "CUDA out of memory. Tried to allocate 20.00 MiB." in str(failed.value)


def test_ray_train_stops_and_the_driver_names_the_settings():
    """The worker's OutOfGPUMemory crosses processes (pickled without torch), ends the run in Ray
    Train's controller (a ControllerError, not retried) and reaches the user as a ConfigError
    (exit 2) naming what to change; other errors pass both unchanged."""
    import pickle

    from ray.train import ControllerError

    from pipeline.train.callbacks import OutOfGPUMemory, StopAtEarlyOutOfMemory
    from pipeline.train.memory import out_of_memory_explained

    oom = pickle.loads(pickle.dumps(OutOfGPUMemory("CUDA out of memory. Tried to allocate 2 GiB.\nmore", 0, "train.batch_size", 48)))

    class RayStyle(Exception):  # a worker's error as Ray hands it on: the original in `cause`
        def __init__(self, cause):
            super().__init__("worker failed")
            self.cause = cause

    with pytest.raises(ControllerError) as stopped:
        StopAtEarlyOutOfMemory().after_exception(None, {0: RayStyle(oom)})
    assert stopped.value.controller_failure is oom
    StopAtEarlyOutOfMemory().after_exception(None, {0: RayStyle(torch.OutOfMemoryError("later: retried"))})

    with pytest.raises(ConfigError) as refused, out_of_memory_explained():
        raise RuntimeError("training failed") from stopped.value
    message = str(refused.value)
    assert "at step 1 with 48 samples per worker (CUDA out of memory. Tried to allocate 2 GiB.)" in message
    for setting in ("train.batch_size", "train.gradient_checkpointing=true", "train.optimizer=adamw8bit"):
        assert setting in message
    with pytest.raises(KeyError), out_of_memory_explained():
        raise KeyError("a bug keeps its stack trace")
