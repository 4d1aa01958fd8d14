"""The few-step generator's sampler and DMD2's backward simulation (DMD2 §4.5).

Inference with timesteps t_0 > t_1 > … (999, 749, 499, 249): x ← noise; for each k,
x0 = G(x, t_k); x ← add_noise(x0, fresh noise, t_{k+1}); the last x0 is the image.
In diffusers this is LCMScheduler with the same timesteps and guidance off.

Timesteps are schedule indices for a DDPM-family and a flow-matching schedule alike (a denoiser
adapter turns them into its network's input, `NoiseSchedule.network_timestep`); on a flow schedule
`ddim_sample` is the Euler sampler of FlowMatchEulerDiscreteScheduler over the same sigmas.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from dmdcli.core.denoiser import Cond, Denoiser, cat_cond
from dmdcli.core.schedule import NoiseSchedule, as_timestep_tensor, ddim_timesteps

NoiseFn = Callable[[Tensor], Tensor]  # draws fresh noise shaped like its argument


def uses_cfg(scale: float) -> bool:
    """Whether guidance at `scale` needs the unconditional prediction: s = 1 is the conditional one."""
    return scale != 1.0


def guided_prediction(
    denoiser: Denoiser, x_t: Tensor, t: Tensor, cond: Cond, uncond: Cond | None, scale: float
) -> Tensor:
    """Classifier-free guidance, uncond + s·(cond − uncond), in one batched forward of [uncond; cond].

    Returns the guided prediction [B, ...] float32; without uncond or with s = 1, one plain forward.
    """
    if uncond is None or not uses_cfg(scale):
        return denoiser(x_t, t, cond).float()
    both = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_cond(uncond, cond))
    pred_uncond, pred_cond = both.float().chunk(2)
    return pred_uncond + scale * (pred_cond - pred_uncond)


def generator_x0(generator: Denoiser, schedule: NoiseSchedule, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
    """One generator evaluation, as a clean estimate: x_t [B, ...], t [B] → x0 [B, ...] float32."""
    return schedule.to_x0(x_t, generator(x_t, t, cond), t)


def sample(
    generator: Denoiser,
    schedule: NoiseSchedule,
    noise: Tensor,
    cond: Cond,
    timesteps: Sequence[int],
    draw_noise: NoiseFn = torch.randn_like,
) -> Tensor:
    """Run the generator from pure noise [B, ...] through `timesteps`; returns x0 [B, ...]."""
    x_t, x0 = noise, noise
    batch = noise.shape[0]
    for k, t_k in enumerate(timesteps):
        x0 = generator_x0(generator, schedule, x_t, as_timestep_tensor(t_k, batch, noise.device), cond)
        if k + 1 < len(timesteps):
            t_next = as_timestep_tensor(timesteps[k + 1], batch, noise.device)
            x_t = schedule.add_noise(x0, draw_noise(x0), t_next)
    return x0


@torch.no_grad()
def backward_simulation(
    generator: Denoiser,
    schedule: NoiseSchedule,
    noise: Tensor,
    cond: Cond,
    timesteps: Sequence[int],
    step: int,
    draw_noise: NoiseFn = torch.randn_like,
) -> Tensor:
    """The generator's input at step index `step`, as it would be at inference.

    Runs the generator (without grad) for `step` steps from `noise`, then noises its output to
    timesteps[step]. Training the generator on this input instead of forward-noised real images
    removes the train/inference mismatch of multi-step students (DMD2 §4.5). Step 0 is pure noise.
    """
    if step == 0:
        return noise
    x0 = sample(generator, schedule, noise, cond, timesteps[:step], draw_noise)
    t = as_timestep_tensor(timesteps[step], noise.shape[0], noise.device)
    return schedule.add_noise(x0, draw_noise(x0), t)


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    noise: Tensor,
    cond: Cond,
    uncond: Cond | None,
    num_steps: int,
    guidance_scale: float,
    timesteps: Sequence[int] | None = None,
) -> Tensor:
    """Deterministic DDIM (η = 0) with CFG over `num_steps` timesteps from T−1 in diffusers'
    "trailing" spacing (`ddim_timesteps`: the student's ladder when N divides T, and down to
    T/N − 1 for any N ≤ T), or over explicit `timesteps`, decreasing (a progressive student's own).

    The many-step teacher sampler: reference grids for the collapse watch, teacher baselines,
    DMD's regression pairs. noise [B, ...] → x0 [B, ...].
    """
    if timesteps is None:
        timesteps = ddim_timesteps(num_steps, schedule.num_train_timesteps)
    x_t, batch = noise, noise.shape[0]
    for t_k, t_next in zip(timesteps, [*timesteps[1:], -1]):  # −1: the last step lands on its x0
        t = as_timestep_tensor(t_k, batch, noise.device)
        x0 = schedule.to_x0(x_t, guided_prediction(denoiser, x_t, t, cond, uncond, guidance_scale), t)
        x_t = schedule.ddim_step(x_t, x0, t, as_timestep_tensor(t_next, batch, noise.device))
    return x_t
