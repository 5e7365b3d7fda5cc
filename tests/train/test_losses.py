"""The diffusion objective's pure functions against diffusers' own implementations."""

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from pipeline.train.losses import (
    add_noise,
    diffusion_loss,
    diffusion_target,
    min_snr_weights,
    offset_noise,
    sample_latents,
    sample_timesteps,
    subject_drop_mask,
    warmup_factor,
)

# SD 1.5's training schedule (the released BLIP-Diffusion scheduler config, as DDPM).
SCHEDULER = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _inputs(seed=0, shape=(3, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.tensor([0, 500, 999])


def test_add_noise_matches_ddpm_scheduler():
    latents, noise, t = _inputs()
    ours = add_noise(latents, noise, t, SCHEDULER.alphas_cumprod)
    theirs = SCHEDULER.add_noise(latents, noise, t)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_targets_epsilon_and_velocity_match_the_scheduler():
    latents, noise, t = _inputs(1)
    assert torch.equal(diffusion_target(latents, noise, t, SCHEDULER.alphas_cumprod, "epsilon"), noise)
    velocity = diffusion_target(latents, noise, t, SCHEDULER.alphas_cumprod, "v_prediction")
    assert torch.allclose(velocity, SCHEDULER.get_velocity(latents, noise, t), atol=1e-6)
    with pytest.raises(ValueError, match="sample"):
        diffusion_target(latents, noise, t, SCHEDULER.alphas_cumprod, "sample")


def test_sample_latents_is_the_vae_posterior_draw_times_the_scaling_factor():
    params = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(2))
    ours = sample_latents(params, 0.18215, torch.Generator().manual_seed(7))
    theirs = DiagonalGaussianDistribution(params).sample(torch.Generator().manual_seed(7)) * 0.18215
    assert ours.shape == (2, 4, 4, 4)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_loss_is_float32_mse():
    pred = torch.ones(2, 4, 2, 2, dtype=torch.bfloat16)
    loss = diffusion_loss(pred, torch.zeros(2, 4, 2, 2))
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(1.0)


def test_subject_drop_mask_rate_and_edges():
    g = torch.Generator().manual_seed(0)
    mask = subject_drop_mask(100_000, 0.15, torch.device("cpu"), g)
    assert mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - 0.15) < 0.005  # 100k draws: std 0.0011
    assert not subject_drop_mask(64, 0.0, torch.device("cpu")).any()
    assert subject_drop_mask(64, 1.0, torch.device("cpu")).all()


def test_timesteps_cover_the_schedule():
    t = sample_timesteps(10_000, 1000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999 and len(t.unique()) > 990


def test_warmup_is_linear_then_constant():
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


def test_noise_offset_adds_one_shift_per_sample_and_channel():
    noise = torch.zeros(2, 3, 2, 2)
    shifted = offset_noise(noise, 0.1, torch.Generator().manual_seed(0))
    shift = 0.1 * torch.randn(2, 3, generator=torch.Generator().manual_seed(0))  # the formula's n, (B, C)
    assert torch.allclose(shifted, shift[:, :, None, None].expand(2, 3, 2, 2))
    assert offset_noise(noise, 0.0) is noise  # off: the noise itself, no draw


def test_min_snr_weights_match_hand_computed_values():
    alphas_cumprod = torch.tensor([0.5, 0.8, 0.2])  # SNR a/(1-a) = 1, 4, 0.25
    t = torch.tensor([0, 1, 2])
    assert torch.allclose(min_snr_weights(alphas_cumprod, t, 2.0, "epsilon"), torch.tensor([1.0, 0.5, 1.0]))
    assert torch.allclose(min_snr_weights(alphas_cumprod, t, 2.0, "v_prediction"), torch.tensor([0.5, 0.4, 0.2]))
    with pytest.raises(ValueError, match="sample"):
        min_snr_weights(alphas_cumprod, t, 2.0, "sample")


def test_weighted_loss_is_the_mean_of_weighted_per_sample_errors():
    target = torch.tensor([1.0, 1.0, 2.0, 2.0]).view(2, 1, 1, 2)  # per-sample MSE against 0: 1 and 4
    prediction = torch.zeros(2, 1, 1, 2)
    assert diffusion_loss(prediction, target, torch.tensor([1.0, 0.5])).item() == pytest.approx((1 * 1 + 0.5 * 4) / 2)
    assert diffusion_loss(prediction, target, torch.ones(2)).item() == pytest.approx(diffusion_loss(prediction, target).item())
