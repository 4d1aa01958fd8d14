"""DMD2 on a flow-matching teacher with an exact score: a one-step generator must learn the 2-D mixture.

As tests/test_toy_distill.py, on a flow schedule instead of DDPM: x_t = (1 − σ_t)·x0 + σ_t·ε with
SD3's static shift s = 3, every network predicting the velocity v = ε − x0. The teacher is the
closed-form posterior mean of a ring of 8 Gaussians, as a velocity; generator and fake score
start from the same MLP pre-trained briefly on the mixture with the flow-matching loss. With
distribution matching the one-step samples must cover all 8 modes and come within a
sliced-Wasserstein bound of true samples; with it switched off the same loop must miss it.
"""

import copy

import pytest
import torch

from dmdcli.core.dmd2 import DMD2, DMD2Config
from dmdcli.core.losses import denoising_loss
from dmdcli.core.sampler import sample
from dmdcli.models.toy import ExactMixtureDenoiser, GaussianMixture, MLPDenoiser, sliced_wasserstein, toy_flow_schedule
from dmdcli.train.step import Batch, DMD2Step

# Measured at n = 4000 (seeds 0, 10, 20 of this file's setup): true-vs-true ~0.02; with DM ~0.155
# after 500, 1000 and 1500 iterations; the pre-trained init, i.e. the loop without DM, 0.51-0.56.
SW_BOUND = 0.25
# As DMD2's one-step SDXL: pure noise in, told t = 399 (σ ≈ 0.67 on the shifted ladder). Told
# t = 999 (σ = 1) the init's one-step output is the mixture's mean, and DM needs >2000 iterations
# to get within the bound (SW 0.31 after 1500).
CONDITIONING_TIMESTEP = 399


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    schedule, mixture = toy_flow_schedule(shift=3.0), GaussianMixture.ring(modes=8, radius=2.0, std=0.1)
    assert schedule.prediction_type == "flow"
    init = MLPDenoiser()
    opt = torch.optim.AdamW(init.parameters(), 1e-3)
    for _ in range(800):
        x0 = mixture.sample(512)
        noise, t = torch.randn_like(x0), torch.randint(0, 1000, (512,))
        loss = denoising_loss(init(schedule.add_noise(x0, noise, t), t, {}), schedule.target(x0, noise, t))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return schedule, mixture, init


def distill(world, dm_weight, iterations=1000):
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


def test_exact_flow_teacher_predicts_the_velocity(world):
    """The teacher's v at σ = 1 is x_t minus the mixture's mean; near σ = 0 its x0 is the nearest mode."""
    schedule, mixture, _ = world
    teacher = ExactMixtureDenoiser(mixture, schedule)
    x_t = torch.randn(6, 2)
    v = teacher(x_t, torch.full((6,), 999), {})
    torch.testing.assert_close(v, x_t - mixture.means.mean(0).float(), atol=1e-6, rtol=0)
    x0 = mixture.means[:6].float()
    t = torch.zeros(6, dtype=torch.long)
    x_t = schedule.add_noise(x0, 0.1 * torch.randn(6, 2), t)
    assert torch.equal(mixture.nearest_mode(schedule.to_x0(x_t, teacher(x_t, t, {}), t)), torch.arange(6))


def test_dmd2_one_step_flow_generator_matches_the_mixture(world):
    sw, modes = distill(world, dm_weight=1.0)
    assert (modes > 0.5 * 4000 / 8).all(), f"a mode is missing or starved: {modes.tolist()}"
    assert sw < SW_BOUND, f"sliced Wasserstein {sw:.3f} ≥ {SW_BOUND}"


def test_without_distribution_matching_the_bound_is_missed(world):
    # Without DM (and no GAN head) the generator gets no loss: 300 iterations show it as well as 1000.
    sw, _ = distill(world, dm_weight=0.0, iterations=300)
    assert sw >= SW_BOUND, f"sliced Wasserstein {sw:.3f} unexpectedly within the bound without DM"
