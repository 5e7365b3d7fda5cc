"""DDIM inversion: the noise a deterministic DDIM sampler would turn into given latents.

Sampling with DDIM (eta 0) walks the timesteps down, x_t -> x_prev, with

    x_prev = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev) * eps,   x0_hat = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)

where a_t is the scheduler's cumulative alpha at t. Inversion walks the same timesteps up and
solves each step for the noisier latents, using the noise predicted at the less noisy ones (the
usual approximation of Song et al. and prompt-to-prompt's null-text paper; LAVIS `_ddim_inverse`).
Inversion is exact only if eps(x_prev, t) equals eps(x_t, t); see tests/model/test_editing.py for
how far the tiny model's reconstruction drifts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from tqdm.auto import tqdm

from pipeline.model.blip_diffusion import host_and_device_timesteps

# predict_noise(latents (b, C, h, w), timestep) -> noise (b, C, h, w)
NoisePredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def editing_scheduler(scheduler: SchedulerMixin) -> DDIMScheduler:
    """A DDIM scheduler with `scheduler`'s noise schedule, as Stable Diffusion 1.5 ships it.

    diffusers' DDIM defaults clip the predicted x0 to [-1, 1], which suits pixels, not latents,
    and would make sampling disagree with `invert_ddim`; SD 1.5's own DDIM config turns it off.
    """
    return DDIMScheduler.from_config(scheduler.config, clip_sample=False, set_alpha_to_one=False)


def invert_ddim(
    latents: torch.Tensor,
    scheduler: DDIMScheduler,
    predict_noise: NoisePredictor,
    progress: bool = False,
    step_callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Clean latents (b, C, h, w) -> the noisy latents at the scheduler's first timestep.

    `scheduler` must have had `set_timesteps` called with the number of steps the sampler will
    use; the result, sampled with the same scheduler, steps and `predict_noise`, returns close to
    `latents`. Computed in float32 whatever the latents' dtype, returned in their dtype.
    `step_callback(i, t, noise, latents)` is called after each step (it may raise to stop).
    """
    alphas = scheduler.alphas_cumprod.to(device=latents.device, dtype=torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32, device=latents.device)
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    x = latents.float()
    host_steps, device_steps = host_and_device_timesteps(scheduler.timesteps.flip(0), latents.device)
    for i, t in enumerate(tqdm(host_steps, disable=not progress, desc="inverting", leave=False)):
        # The sampler's step at t goes from a_t to a_prev; inversion goes back from a_prev to a_t.
        prev = int(t) - stride
        a_cur = alphas[prev] if prev >= 0 else final
        a_next = alphas[int(t)]
        eps = predict_noise(x.to(latents.dtype), device_steps[i]).float()
        x0 = (x - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        if step_callback is not None:
            step_callback(i, t, eps, x)
    return x.to(latents.dtype)
