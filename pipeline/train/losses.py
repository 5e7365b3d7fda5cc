"""The diffusion objective as pure functions: noise (and its offset), target, loss (and its min-SNR
weights), subject drop, LR warm-up.

Everything here runs on any device (CPU in the tests) and takes its randomness from an explicit
`torch.Generator` where it draws any. Shapes: B batch, C latent channels (4), h x w latent size
(training resolution / 8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_latents(params: torch.Tensor, scaling_factor: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """VAE posterior parameters (B, 2C, h, w), mean then log-variance -> scaled latents (B, C, h, w).

    A draw mean + std * eps from the posterior (diffusers' `DiagonalGaussianDistribution.sample`,
    with its log-variance clamp to [-30, 20]), times the VAE's `scaling_factor` (0.18215 for SD 1.5).
    """
    mean, logvar = params.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps) * scaling_factor


def sample_timesteps(batch: int, num_train_timesteps: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform integer timesteps (B,) int64 in [0, num_train_timesteps)."""
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=device, dtype=torch.int64)


def _coefficients(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(a_t) and sqrt(1 - a_t) per sample, shaped (B, 1, 1, 1) to broadcast over `like`."""
    a = alphas_cumprod.to(device=like.device, dtype=torch.float32)[timesteps]
    shape = (-1,) + (1,) * (like.ndim - 1)
    return a.sqrt().view(shape), (1.0 - a).sqrt().view(shape)


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """DDPM forward process q(x_t | x_0): sqrt(a_t) x_0 + sqrt(1 - a_t) eps, (B, C, h, w) float32.

    alphas_cumprod: (T,) from the noise scheduler (`DDPMScheduler.alphas_cumprod`).
    """
    signal, sigma = _coefficients(alphas_cumprod, timesteps, latents)
    return signal * latents.float() + sigma * noise.float()


def diffusion_target(
    latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the UNet learns to predict (B, C, h, w): the noise itself ("epsilon", SD 1.5 and
    BLIP-Diffusion) or the velocity sqrt(a_t) eps - sqrt(1 - a_t) x_0 ("v_prediction")."""
    if prediction_type == "epsilon":
        return noise.float()
    if prediction_type == "v_prediction":
        signal, sigma = _coefficients(alphas_cumprod, timesteps, latents)
        return signal * noise.float() - sigma * latents.float()
    raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")


def offset_noise(noise: torch.Tensor, offset: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise offset (Guttenberg, "Diffusion with Offset Noise", 2023): eps + offset * n with one
    n ~ N(0, 1) per sample and channel, (B, C, 1, 1), so the model also learns to shift an
    image's mean brightness. `offset` 0 returns `noise` itself and draws nothing."""
    if offset == 0.0:
        return noise
    shift = torch.randn(noise.shape[:2], generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + offset * shift[:, :, None, None]


def signal_to_noise(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = a_t / (1 - a_t) per sample, (B,) float32."""
    a = alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return a / (1.0 - a)


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., 2023), (B,) float32: min(SNR, gamma) / SNR for
    an epsilon target, min(SNR, gamma) / (SNR + 1) for a velocity target (the same weighting of
    the x_0 error). Low-noise steps, whose SNR is large, stop dominating the gradient."""
    snr = signal_to_noise(alphas_cumprod, timesteps)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in float32 (a bf16 prediction is upcast): scalar. Without `weights`,
    over every element; with per-sample weights (B,), the mean over samples of each sample's
    weight times its own mean squared error (equal to the plain mean when every weight is 1)."""
    if weights is None:
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(dim=1)  # (B,)
    return (weights.to(per_sample.device, torch.float32) * per_sample).mean()


def subject_drop_mask(batch: int, prob: float, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) bool: True where a sample trains without its subject embeddings (probability `prob`),
    so the model keeps a text-only mode for classifier-free guidance and for prompts alone."""
    if prob <= 0.0:
        return torch.zeros(batch, dtype=torch.bool, device=device)
    return torch.rand(batch, generator=generator, device=device) < prob


def warmup_factor(step: int, warmup_steps: int) -> float:
    """LR multiplier for optimizer step `step` (0-based): linear from 1/warmup to 1, then constant."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)
