"""The discrete-time noise schedule: the one place where x_t, x0, ε and the network's prediction are converted.

Every schedule is a Gaussian path x_t = α_t·x0 + σ_t·ε over indices t ∈ {0, …, T−1}, given by
its tables α_t and σ_t (t = −1 is the clean end, α = 1 and σ = 0):
- variance-preserving diffusion (DDPM, SD, SDXL): α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t);
- flow matching (SD3, FLUX): α_t = 1 − σ_t, with σ_t the teacher's (shifted) sigmas, and the
  network predicts the velocity v = ε − x0, so x_t = x0 + σ_t·v.
The DDIM step z_next = α_next·x0 + σ_next·ε̂ is then exactly the flow's Euler step
x_t + (σ_next − σ_t)·v, so the samplers and the DMD2 objective run on either family unchanged.

Every conversion runs in float64, as the DMD2 reference does, and returns float32: the
distribution-matching gradient is a difference of two nearly equal x0 estimates, and at
t ≈ T the 1/α_t factor amplifies rounding errors of half-precision network outputs.
(On Apple's MPS, which has no float64, sampling converts in float32.)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # of a DDPM-family schedule
FLOW_PREDICTION_TYPES = ("flow", "epsilon", "sample")  # of a flow-matching one; "flow": v = ε − x0
TIME_SHIFT_TYPES = ("exponential", "linear")


def precision(device: torch.device) -> torch.dtype:
    """The conversions' dtype: float64, except on Apple's MPS, which has none (sampling there)."""
    return torch.float32 if device.type == "mps" else torch.float64


def precise(x: Tensor) -> Tensor:
    return x.to(precision(x.device))


class NoiseSchedule:
    """The per-index tables α_t, σ_t of a teacher and the conversions between its prediction and x0 / ε.

    `NoiseSchedule(alphas_cumprod, prediction_type)` is the DDPM family; `NoiseSchedule.flow(sigmas)`
    flow matching. Attributes: `alphas`, `sigmas` [T] float64 on the CPU; `alphas_cumprod` [T]
    (DDPM family only); `prediction_type`; `is_flow`.

    Args:
        alphas_cumprod: [T] cumulative products ᾱ_t, decreasing in t.
        prediction_type: what the networks predict: "epsilon", "v_prediction" or "sample" (x0).
    """

    def __init__(self, alphas_cumprod: Tensor, prediction_type: str = "epsilon"):
        abar = alphas_cumprod.detach().to(torch.float64).cpu()
        self._alphas_cumprod: Tensor | None = abar
        self.alphas, self.sigmas = abar.sqrt(), (1.0 - abar).sqrt()
        self._snr = abar / (1.0 - abar)  # from ᾱ itself: α²/σ² of the rounded roots can differ in the last bit
        self.is_flow = False
        self.prediction_type = self._checked(prediction_type)

    @classmethod
    def flow(cls, sigmas: Tensor, prediction_type: str = "flow") -> NoiseSchedule:
        """A flow-matching schedule x_t = (1 − σ_t)·x0 + σ_t·ε from its training sigmas [T], increasing
        in t, in (0, 1] (`flow_sigmas`, shifted by `shift_sigmas` or `time_shift_sigmas`).

        prediction_type: "flow" (v = ε − x0, SD3 and FLUX), "epsilon" or "sample".
        """
        s = sigmas.detach().to(torch.float64).cpu()
        if s.ndim != 1 or not ((s > 0) & (s <= 1)).all() or (s.diff() < 0).any():
            raise ValueError("flow sigmas must be a [T] table increasing in t, within (0, 1]")
        schedule = cls.__new__(cls)
        schedule._alphas_cumprod = None
        schedule.alphas, schedule.sigmas = 1.0 - s, s
        schedule._snr = (schedule.alphas / s) ** 2
        schedule.is_flow = True
        schedule.prediction_type = schedule._checked(prediction_type)
        return schedule

    def _checked(self, prediction_type: str) -> str:
        allowed = FLOW_PREDICTION_TYPES if self.is_flow else PREDICTION_TYPES
        if prediction_type not in allowed:
            kind = "flow-matching" if self.is_flow else "DDPM-family"
            raise ValueError(
                f"unknown prediction type {prediction_type!r} for a {kind} schedule; expected one of {allowed}"
            )
        return prediction_type

    def with_prediction_type(self, prediction_type: str) -> NoiseSchedule:
        """The same α_t, σ_t with networks that predict `prediction_type` (a student's own parameterization)."""
        schedule = copy.copy(self)
        schedule.prediction_type = self._checked(prediction_type)
        return schedule

    @property
    def alphas_cumprod(self) -> Tensor:
        """ᾱ_t [T] float64 of a DDPM-family schedule (`alphas`² up to rounding); a flow schedule has none."""
        if self._alphas_cumprod is None:
            raise AttributeError(
                "a flow-matching schedule has no alphas_cumprod: use its alphas / sigmas tables, or "
                "with_prediction_type() for the same schedule in another parameterization"
            )
        return self._alphas_cumprod

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas.shape[0]

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(α_t, σ_t) in float64 for timesteps t [B], shaped to broadcast against `like`, on its
        device (float32 on MPS, see `precision`).

        t = −1 stands for the clean end of a DDIM trajectory: α = 1 and σ = 0 (DDIM's final step
        lands on its x0 estimate, diffusers' `set_alpha_to_one`; the flow's last sigma 0).
        """
        t = t.long().to(like.device)  # index on the data's device: no device-to-host sync per call
        dtype, i = precision(like.device), t.clamp(min=0)
        a = torch.where(t >= 0, self.alphas.to(dtype).to(like.device)[i], 1.0)
        s = torch.where(t >= 0, self.sigmas.to(dtype).to(like.device)[i], 0.0)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return a.view(shape), s.view(shape)

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio α_t² / σ_t² (ᾱ_t / (1 − ᾱ_t) for DDPM), float64 [B]; inf at t = −1."""
        t_cpu = t.long().cpu()
        return torch.where(t_cpu >= 0, self._snr[t_cpu.clamp(min=0)], math.inf).to(t.device)

    def network_timestep(self, t: Tensor) -> Tensor:
        """The timestep the network is given for indices t [B]: t itself for a DDPM-family UNet;
        for flow matching T·σ_t as float32 [B] (diffusers' `scheduler.timesteps`, 1000·σ for SD3).
        FLUX's transformer takes σ_t itself: its adapter divides this by 1000, as FluxPipeline does.
        Adapters call this rather than reading sigmas themselves."""
        if not self.is_flow:
            return t
        t = t.long()
        sigma = self.sigmas.to(precision(t.device)).to(t.device)[t.clamp(min=0)]
        return torch.where(t >= 0, self.num_train_timesteps * sigma, 0.0).float()

    def timesteps_at(self, sigma: Tensor) -> Tensor:
        """The indices [B] long whose σ_t lie nearest to `sigma` [B] (a flow schedule's table is
        increasing in t), for timesteps drawn by σ rather than by index."""
        table = self.sigmas.to(sigma.device)
        upper = torch.searchsorted(table, sigma.to(table.dtype)).clamp(1, len(table) - 1)
        lower_nearer = (sigma - table[upper - 1]).abs() <= (table[upper] - sigma).abs()
        return torch.where(lower_nearer, upper - 1, upper)

    def ddim_step(self, x_t: Tensor, x0: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
        """One deterministic DDIM step (η = 0) t → t_next given an x0 estimate (Song et al. eq. 12):
        z_next = α_next·x0 + σ_next·ε̂ with ε̂ = (x_t − α_t·x0) / σ_t. t_next = −1 returns x0.
        For flow matching this is the Euler step x_t + (σ_next − σ_t)·v. Returns float32 [B, ...]."""
        a_t, s_t = self.alpha_sigma(t, x_t)
        a_n, s_n = self.alpha_sigma(t_next, x_t)
        x_t, x0 = precise(x_t), precise(x0)
        eps = (x_t - a_t * x0) / s_t
        return (a_n * x0 + s_n * eps).float()

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Forward process q(x_t | x0) = α_t·x0 + σ_t·ε: x0, noise [B, ...], t [B] → x_t [B, ...] (dtype of x0)."""
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
        elif self.prediction_type == "flow":
            x0 = x_t - sb * prediction  # x_t = x0 + σ·v with v = ε − x0
        else:
            x0 = prediction
        return x0.float()

    def eps_from_x0(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """The noise implied by x_t and an x0 estimate: ε = (x_t − α_t·x0) / σ_t."""
        sa, sb = self.alpha_sigma(t, x_t)
        return ((precise(x_t) - sa * precise(x0)) / sb).float()

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What a denoiser of this prediction type should output for x_t = add_noise(x0, noise, t)."""
        if self.prediction_type == "epsilon":
            return noise.float()
        if self.prediction_type == "v_prediction":
            sa, sb = self.alpha_sigma(t, x0)
            return (sa * precise(noise) - sb * precise(x0)).float()
        if self.prediction_type == "flow":
            return (precise(noise) - precise(x0)).float()
        return x0.float()


# -- flow-matching sigma tables (diffusers' FlowMatchEulerDiscreteScheduler, training sigmas) -------


def flow_sigmas(num_train_timesteps: int = 1000) -> Tensor:
    """The unshifted training sigmas σ_t = (t + 1) / T, t = 0 … T−1: float64 [T], from 1/T to 1.

    diffusers' FlowMatchEulerDiscreteScheduler holds the same table in the other order (σ = 1 first).
    """
    return torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """The static timestep shift of SD3 (Esser et al. 2024): σ' = s·σ / (1 + (s − 1)·σ); s = 3 for SD3.

    s > 1 moves every σ towards the noisy end, which higher resolutions need. sigmas [T] → [T]."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def resolution_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """μ of FLUX's resolution-dependent shift: linear in the image's token count, from base_shift at
    base_seq_len to max_shift at max_seq_len (diffusers' `calculate_shift`; the defaults are FLUX's)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def time_shift_sigmas(sigmas: Tensor, mu: float, kind: str = "exponential") -> Tensor:
    """The dynamic ("resolution-dependent") shift: σ' = e^μ / (e^μ + (1/σ − 1)) ("exponential", FLUX),
    or μ / (μ + (1/σ − 1)) ("linear"). The exponential one is `shift_sigmas` with s = e^μ. [T] → [T]."""
    scale = static_shift(mu, kind)
    return scale / (scale + (1 / sigmas - 1))


def static_shift(mu: float, kind: str = "exponential") -> float:
    """The static shift s (`shift_sigmas`) that shifts sigmas as μ's time shift does: e^μ, or μ ("linear")."""
    if kind not in TIME_SHIFT_TYPES:
        raise ValueError(f"unknown time shift type {kind!r}; expected one of {TIME_SHIFT_TYPES}")
    return math.exp(mu) if kind == "exponential" else mu


def student_timesteps(
    num_steps: int, num_train_timesteps: int = 1000, conditioning_timestep: int | None = None
) -> list[int]:
    """The generator's timesteps: N evenly spaced from T−1 (999, 749, 499, 249 for N = 4).

    A 1-step generator sees pure noise but is told `conditioning_timestep` (399 for the SDXL
    reference model, 999 for SD1.5); with N > 1 the first step is always T−1. These are indices for
    every schedule: on a flow-matching one they pick N sigmas on its shifted ladder (σ_{T−1} = 1).
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
    one student step t → t'' spans exactly two teacher steps t → t' → t''. On a flow-matching schedule
    they index its shifted σ table (diffusers' FlowMatchEulerDiscreteScheduler instead spaces the
    unshifted σ linearly from 1 to 1/T before shifting, so its last step sits at σ_0, not σ_{T/N−1}).
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
