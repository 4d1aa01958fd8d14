"""The discrete-time noise schedule: the one place where x_t, x0, epsilon and v are converted.

Variance-preserving diffusion (DDPM): x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε, t ∈ {0, …, T−1}.
Every conversion runs in float64, as the DMD2 reference does, and returns float32: the
distribution-matching gradient is a difference of two nearly equal x0 estimates, and at
t ≈ T the 1/sqrt(ᾱ_t) factor amplifies rounding errors of half-precision network outputs.
(On Apple's MPS, which has no float64, sampling converts in float32.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def precision(device: torch.device) -> torch.dtype:
    """The conversions' dtype: float64, except on Apple's MPS, which has none (sampling there)."""
    return torch.float32 if device.type == "mps" else torch.float64


def precise(x: Tensor) -> Tensor:
    return x.to(precision(x.device))


class NoiseSchedule:
    """ᾱ_t of a teacher and the conversions between its prediction and x0 / ε.

    Args:
        alphas_cumprod: [T] cumulative products ᾱ_t, decreasing in t.
        prediction_type: what the networks predict: "epsilon", "v_prediction" or "sample" (x0).
    """

    def __init__(self, alphas_cumprod: Tensor, prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float64).cpu()
        self.prediction_type = prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(α_t, σ_t) = (sqrt(ᾱ_t), sqrt(1 − ᾱ_t)) in float64 for timesteps t [B], shaped to broadcast
        against `like`, on its device (float32 on MPS, see `precision`).

        t = −1 stands for the clean end of a DDIM trajectory: ᾱ = 1, so α = 1 and σ = 0 (DDIM's
        final step lands on its x0 estimate, diffusers' `set_alpha_to_one`).
        """
        t = t.long().to(like.device)  # index on the data's device: no device-to-host sync per call
        table = self.alphas_cumprod.to(precision(like.device)).to(like.device)
        a = torch.where(t >= 0, table[t.clamp(min=0)], 1.0)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return a.sqrt().view(shape), (1.0 - a).sqrt().view(shape)

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio α_t² / σ_t² = ᾱ_t / (1 − ᾱ_t), float64 [B]."""
        a = self.alphas_cumprod[t.long().cpu()]
        return (a / (1.0 - a)).to(t.device)

    def ddim_step(self, x_t: Tensor, x0: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        """One deterministic DDIM step (η = 0) t → t_next given an x0 estimate (Song et al. eq. 12):
        z_next = α_next·x0 + σ_next·ε̂ with ε̂ = (x_t − α_t·x0) / σ_t. t_next = −1 returns x0.
        Returns float32 [B, ...]."""
        a_t, s_t = self.alpha_sigma(t, x_t)
        a_n, s_n = self.alpha_sigma(t_next, x_t)
        x_t, x0 = precise(x_t), precise(x0)
        eps = (x_t - a_t * x0) / s_t
        return (a_n * x0 + s_n * eps).float()

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Forward process q(x_t | x0): x0, noise [B, ...], t [B] → x_t [B, ...] (dtype of x0)."""
        sa, sb = self.alpha_sigma(t, x0)
        return (sa * precise(x0) + sb * precise(noise)).to(x0.dtype)

    def to_x0(self, x_t: Tensor, prediction: Tensor, t: Tensor) -> Tensor:
        """x0 implied by a network prediction at (x_t, t). Returns float32 [B, ...]."""
        sa, sb = self.alpha_sigma(t, x_t)
        x_t, prediction = precise(x_t), precise(prediction)
        if self.prediction_type == "epsilon":
            x0 = (x_t - sb * prediction) / sa
        elif self.prediction_type == "v_prediction":
            x0 = sa * x_t - sb * prediction  # v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0
        else:
            x0 = prediction
        return x0.float()

    def eps_from_x0(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """The noise implied by x_t and an x0 estimate: ε = (x_t − sqrt(ᾱ)·x0) / sqrt(1 − ᾱ)."""
        sa, sb = self.alpha_sigma(t, x_t)
        return ((precise(x_t) - sa * precise(x0)) / sb).float()

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What a denoiser of this prediction type should output for x_t = add_noise(x0, noise, t)."""
        if self.prediction_type == "epsilon":
            return noise.float()
        if self.prediction_type == "v_prediction":
            sa, sb = self.alpha_sigma(t, x0)
            return (sa * precise(noise) - sb * precise(x0)).float()
        return x0.float()


def student_timesteps(
    num_steps: int, num_train_timesteps: int = 1000, conditioning_timestep: int | None = None
) -> list[int]:
    """The generator's timesteps: N evenly spaced from T−1 (999, 749, 499, 249 for N = 4).

    A 1-step generator sees pure noise but is told `conditioning_timestep` (399 for the SDXL
    reference model, 999 for SD1.5); with N > 1 the first step is always T−1.
    """
    if num_steps < 1:
        raise ValueError("num_steps must be at least 1")
    if num_steps == 1 and conditioning_timestep is not None:
        return [int(conditioning_timestep)]
    stride = num_train_timesteps // num_steps
    return [num_train_timesteps - 1 - i * stride for i in range(num_steps)]


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """N DDIM timesteps with diffusers' "trailing" spacing: round(T − i·T/N) − 1, i = 0 … N−1.

    999, 749, 499, 249 for N = 4 (as `student_timesteps`); 999, 874, …, 124 for N = 8. The ladder
    for N/2 steps is every other rung of the ladder for N, which progressive distillation needs:
    one student step t → t'' spans exactly two teacher steps t → t' → t''.
    """
    if num_steps < 1:
        raise ValueError("num_steps must be at least 1")
    T = num_train_timesteps
    return [int(round(T - i * T / num_steps)) - 1 for i in range(num_steps)]


def as_timestep_tensor(t: int | Sequence[int] | Tensor, batch: int, device: torch.device | str) -> Tensor:
    """A [B] long tensor of timesteps from a scalar or per-sample values."""
    if isinstance(t, Tensor):
        t = t.to(device=device, dtype=torch.long)
        return t.expand(batch) if t.ndim == 0 else t
    if isinstance(t, int):
        return torch.full((batch,), t, dtype=torch.long, device=device)
    return torch.tensor(list(t), dtype=torch.long, device=device)
