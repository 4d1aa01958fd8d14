"""A toy world with an exact score: a 2-D mixture of isotropic Gaussians.

Its noised density is known in closed form, so the teacher is the exact posterior mean E[x0|x_t]
rather than a trained network. The tests distill it with DMD2 into a one-step MLP generator and
measure the result against true samples. Conditioning is empty ({}): the mixture is
unconditional, and classifier-free guidance is off (scale 1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dmdcli.core.denoiser import Cond
from dmdcli.core.schedule import NoiseSchedule


def toy_schedule(num_train_timesteps: int = 1000) -> NoiseSchedule:
    """DDPM's linear β schedule (1e-4 … 0.02), ε-prediction."""
    betas = torch.linspace(1e-4, 0.02, num_train_timesteps, dtype=torch.float64)
    return NoiseSchedule(torch.cumprod(1.0 - betas, dim=0), "epsilon")


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
    """The exact ε-prediction of a GaussianMixture under a NoiseSchedule: a teacher with no error.

    A real score only: it has no bottleneck features (only the fake score needs them).

    With x_t = sqrt(ᾱ)x0 + sqrt(1−ᾱ)ε, component k gives x_t ~ N(sqrt(ᾱ)μ_k, v_k I) with
    v_k = ᾱs² + 1 − ᾱ, and E[x0 | x_t, k] = μ_k + sqrt(ᾱ)s²/v_k · (x_t − sqrt(ᾱ)μ_k).
    """

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        a = self.schedule.alphas_cumprod.to(x_t.device)[t.long()].view(-1, 1, 1)  # [B, 1, 1]
        mu, s2 = self.mixture.means.to(x_t.device), self.mixture.std**2
        x = x_t.double().unsqueeze(1)  # [B, 1, 2]
        var = a * s2 + 1.0 - a
        centred = x - a.sqrt() * mu  # [B, K, 2]
        log_r = (
            self.mixture.weights.to(x_t.device).log()
            - 0.5 * (centred**2).sum(-1) / var.squeeze(-1)
            - var.squeeze(-1).log()
        )
        r = torch.softmax(log_r, dim=1).unsqueeze(-1)  # [B, K, 1]
        x0 = (r * (mu + a.sqrt() * s2 / var * centred)).sum(1)  # [B, 2]
        return self.schedule.eps_from_x0(x_t, x0, t)


class MLPDenoiser(nn.Module):
    """A small MLP denoiser for 2-D points: (x_t [B, 2], t [B]) → ε [B, 2].

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
