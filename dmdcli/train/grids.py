"""Sample grids of a run and the collapse watch.

A grid is P fixed prompts × S fixed seeds (one row per prompt). The same noise is used at every
grid, so grids show training progress on the same images. Diversity is the mean pairwise RMS
distance (pixels in [0, 1]) between the S images of each prompt, averaged over prompts: a
generator collapsing to one image per prompt drives it to 0. The teacher's diversity on the same
prompts and seeds (DDIM with CFG) is the reference it is compared with.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor

from dmdcli.core.denoiser import Cond, Denoiser, expand_cond
from dmdcli.core.sampler import ddim_sample, sample
from dmdcli.core.schedule import NoiseSchedule

SEEDS_PER_PROMPT = 2
COLLAPSE_RATIO = 0.5  # warn when the student's diversity falls below half the teacher's


def diversity(images: Tensor, seeds_per_prompt: int) -> float:
    """images [P·S, 3, H, W] in [-1, 1], prompt-major → mean pairwise RMS distance within prompts."""
    if seeds_per_prompt < 2:
        return float("nan")
    x = ((images.float() + 1) / 2).flatten(1).view(-1, seeds_per_prompt, images[0].numel())
    pairs = list(itertools.combinations(range(seeds_per_prompt), 2))
    d = torch.stack([(x[:, i] - x[:, j]).pow(2).mean(-1).sqrt() for i, j in pairs], dim=1)
    return d.mean().item()


class SampleGrid:
    """Fixed prompts, conditionings and noise for every grid of a run.

    Args:
        prompts: the run's prompts; the first grid_size/S are used (cycled if fewer).
        grid_size: images per grid (P = grid_size // S prompts, at least 1).
        seed: the run's seed; image j's noise comes from torch.Generator().manual_seed(seed + j).
        encode: prompts → conditioning; decode: latents → images in [-1, 1].
        latent_shape: (C, h, w).
    """

    def __init__(
        self,
        prompts: list[str],
        grid_size: int,
        seed: int,
        encode: Callable[[list[str]], Cond],
        decode: Callable[[Tensor], Tensor],
        latent_shape: tuple[int, ...],
        device: torch.device,
    ):
        self.seeds = SEEDS_PER_PROMPT if grid_size >= SEEDS_PER_PROMPT else 1
        count = max(1, grid_size // self.seeds)
        self.prompts = [prompts[i % len(prompts)] for i in range(count)]
        self.cond = encode([p for p in self.prompts for _ in range(self.seeds)])
        n = count * self.seeds
        self.generators = [torch.Generator().manual_seed(seed + j) for j in range(n)]
        self.noise = torch.stack([torch.randn(latent_shape, generator=g) for g in self.generators]).to(device)
        self.decode = decode

    def _renoise(self, x: Tensor) -> Tensor:
        return torch.stack([torch.randn(x.shape[1:], generator=g) for g in self.generators]).to(x.device)

    @torch.no_grad()
    def student(self, generator: Denoiser, schedule: NoiseSchedule, timesteps: list[int]) -> Tensor:
        """The student's images [P·S, 3, H, W] (re-noising draws from each image's own generator)."""
        state = [g.get_state() for g in self.generators]
        latents = sample(generator, schedule, self.noise, self.cond, timesteps, self._renoise)
        for g, s in zip(self.generators, state):  # the next grid re-noises identically
            g.set_state(s)
        return self.decode(latents)

    @torch.no_grad()
    def teacher(
        self, teacher: Denoiser, schedule: NoiseSchedule, uncond: Cond | None, steps: int, guidance_scale: float
    ) -> Tensor:
        """The teacher's images for the same prompts and noise: DDIM with CFG."""
        uncond = expand_cond(uncond, self.noise.shape[0]) if uncond else None
        latents = ddim_sample(teacher, schedule, self.noise, self.cond, uncond, steps, guidance_scale)
        return self.decode(latents)
