"""DMD2 on a teacher with an exact score: a one-step generator must learn the 2-D mixture.

The teacher is the closed-form posterior mean of a ring of 8 Gaussians. Generator and fake
score start from the same MLP denoiser pre-trained briefly on the mixture (as DMD2 starts both
from the teacher). With distribution matching the one-step samples must cover all 8 modes and
come within a sliced-Wasserstein bound of true samples; with it switched off the same loop
must miss that bound, so the test can fail.
"""

import copy

import pytest
import torch

from dmdcli.core.dmd2 import DMD2, DMD2Config
from dmdcli.core.losses import denoising_loss
from dmdcli.core.sampler import sample
from dmdcli.models.toy import ExactMixtureDenoiser, GaussianMixture, MLPDenoiser, sliced_wasserstein, toy_schedule
from dmdcli.train.step import Batch, DMD2Step

SW_BOUND = 0.25  # true-vs-true samples give ~0.05 at n = 4000; the pre-trained init gives ~0.6
CONDITIONING_TIMESTEP = 399  # as DMD2's one-step SDXL: pure noise in, told t = 399


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    schedule, mixture = toy_schedule(), GaussianMixture.ring(modes=8, radius=2.0, std=0.1)
    init = MLPDenoiser()
    opt = torch.optim.AdamW(init.parameters(), 1e-3)
    for _ in range(800):
        x0 = mixture.sample(512)
        noise, t = torch.randn_like(x0), torch.randint(0, 1000, (512,))
        loss = denoising_loss(init(schedule.add_noise(x0, noise, t), t, {}), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return schedule, mixture, init


def distill(world, dm_weight, iterations=1500):
    schedule, mixture, init = world
    torch.manual_seed(1)
    generator, fake_score = copy.deepcopy(init), copy.deepcopy(init)
    dmd2 = DMD2(
        schedule,
        ExactMixtureDenoiser(mixture, schedule),
        fake_score,
        config=DMD2Config(guidance_scale=1.0, dm_weight=dm_weight),
    )
    step = DMD2Step(
        dmd2,
        generator,
        [CONDITIONING_TIMESTEP],
        list(generator.parameters()),
        list(fake_score.parameters()),
        torch.optim.AdamW(generator.parameters(), 1e-4),
        torch.optim.AdamW(fake_score.parameters(), 1e-3),
        fake_updates_per_gen=5,
    )
    for it in range(iterations):
        logs = step(Batch(noise=torch.randn(256, 2), cond={}), it)
        assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    with torch.no_grad():
        x = sample(generator, schedule, torch.randn(4000, 2), {}, [CONDITIONING_TIMESTEP])
    modes = torch.bincount(mixture.nearest_mode(x), minlength=8)
    return sliced_wasserstein(x, mixture.sample(4000, torch.Generator().manual_seed(2))), modes


def test_dmd2_one_step_generator_matches_the_mixture(world):
    sw, modes = distill(world, dm_weight=1.0)
    assert (modes > 0.5 * 4000 / 8).all(), f"a mode is missing or starved: {modes.tolist()}"
    assert sw < SW_BOUND, f"sliced Wasserstein {sw:.3f} ≥ {SW_BOUND}"


def test_without_distribution_matching_the_bound_is_missed(world):
    sw, _ = distill(world, dm_weight=0.0, iterations=300)
    assert sw >= SW_BOUND, f"sliced Wasserstein {sw:.3f} unexpectedly within the bound without DM"
