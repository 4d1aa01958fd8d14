"""A toy world with an exact score: a 2-D mixture of isotropic Gaussians.

Its noised density is known in closed form, so the teacher is the exact posterior mean E[x0|x_t]
rather than a trained network. The tests distill it with DMD2 into a one-step MLP generator and
measure the result against true samples, under a DDPM or a flow-matching schedule. Conditioning
is empty ({}): the mixture is unconditional, and classifier-free guidance is off (scale 1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dmdcli.core.denoiser import Cond
from dmdcli.core.schedule import NoiseSchedule, flow_sigmas, shift_sigmas


def toy_schedule(num_train_timesteps: int = 1000) -> NoiseSchedule:
    """DDPM's linear β schedule (1e-4 … 0.02), ε-prediction."""
    betas = torch.linspace(1e-4, 0.02, num_train_timesteps, dtype=torch.float64)
    return NoiseSchedule(torch.cumprod(1.0 - betas, dim=0), "epsilon")


def toy_flow_schedule(shift: float = 3.0, num_train_timesteps: int = 1000) -> NoiseSchedule:
    """Flow matching with SD3's static shift (s = 3), velocity prediction v = ε − x0."""
    return NoiseSchedule.flow(shift_sigmas(flow_sigmas(num_train_timesteps), shift))


class GaussianMixture:
    """p(x0) = Σ_k w_k N(μ_k, s² I) in 2-D. Args: means [K, 2], std s, weights [K] (uniform)."""

    def __init__(self, means: Tensor, std: float, weights: Tensor | None = None):
        self.means = means.double()
        self.std = float(std)
        k = means.shape[0]
        self.weights = (weights if weights is not None else torch.full((k,), 1.0 / k)).double()

    @classmethod
    def ring(cls, modes: int = 8, radius: float = 2.0, std: float = 0.1) -> "GaussianMixture":
        angles = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
        return cls(radius * torch.stack([angles.cos(), angles.sin()], dim=1), std)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples [n, 2] float32."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, 2, dtype=torch.float64, generator=generator)
        return (self.means[k] + self.std * eps).float()

    def nearest_mode(self, x: Tensor) -> Tensor:
        """Index [n] of the closest mean for each point x [n, 2]."""
        return torch.cdist(x.double(), self.means).argmin(dim=1)


class ExactMixtureDenoiser(nn.Module):
    """The exact prediction of a GaussianMixture under any NoiseSchedule, in the schedule's
    prediction type (ε, v, x0 or the flow's velocity): a teacher with no error.

    A real score only: it has no bottleneck features (only the fake score needs them).

    With x_t = α·x0 + σ·ε, component k gives x_t ~ N(α·μ_k, v I) with v = α²s² + σ², and
    E[x0 | x_t, k] = μ_k + α·s²/v · (x_t − α·μ_k); the components are weighted by their posterior
    p(k | x_t) ∝ w_k N(x_t; α·μ_k, v I). The prediction is the target of that x0 and of the noise
    it implies.
    """

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        x = x_t.double().unsqueeze(1)  # [B, 1, 2]
        a, sigma = self.schedule.alpha_sigma(t, x)  # [B, 1, 1] each
        mu, s2 = self.mixture.means.to(x_t.device), self.mixture.std**2
        var = a**2 * s2 + sigma**2  # [B, 1, 1]: the same for every component, so no log-det term
        centred = x - a * mu  # [B, K, 2]
        log_r = self.mixture.weights.to(x_t.device).log() - 0.5 * (centred**2).sum(-1) / var.squeeze(-1)
        r = torch.softmax(log_r, dim=1).unsqueeze(-1)  # [B, K, 1]
        x0 = (r * (mu + a * s2 / var * centred)).sum(1)  # [B, 2]
        return self.schedule.target(x0, self.schedule.eps_from_x0(x_t, x0, t), t)


class MLPDenoiser(nn.Module):
    """A small MLP denoiser for 2-D points: (x_t [B, 2], t [B]) → its prediction [B, 2] (ε, v, ...).

    Used for the toy generator and fake score. `bottleneck` returns the last hidden layer [B, H].
    """

    def __init__(self, hidden: int = 128, depth: int = 3, num_train_timesteps: int = 1000, frequencies: int = 16):
        super().__init__()
        self.num_train_timesteps = num_train_timesteps
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), frequencies)), persistent=False)
        layers: list[nn.Module] = [nn.Linear(2 + 2 * frequencies, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        self.trunk = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, 2)

    def _features(self, x_t: Tensor, t: Tensor) -> Tensor:
        phase = (t.float() / self.num_train_timesteps).unsqueeze(1) * self.freqs
        return self.trunk(torch.cat([x_t.float(), phase.sin(), phase.cos()], dim=1))

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self.out(self._features(x_t, t))

    def bottleneck(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self._features(x_t, t)


def sliced_wasserstein(x: Tensor, y: Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between point clouds x [n, d] and y [n, d] (equal n)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = (x.double() @ dirs).sort(dim=0)
    py, _ = (y.double() @ dirs).sort(dim=0)
    return (px - py).abs().mean().item()
