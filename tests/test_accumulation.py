"""Gradient accumulation: a batch split into micro-batches trains the networks as the whole batch
does, and the options that ask for it (--gradient-accumulation-steps, --global-batch)."""

import functools

import pytest
import torch
from torch import nn

from dmdcli.core import sampler
from dmdcli.core.dmd2 import DMD2, DMD2Config
from dmdcli.errors import UsageError
from dmdcli.models.toy import MLPDenoiser, toy_schedule
from dmdcli.train import step as step_module
from dmdcli.train.config import DistillConfig
from dmdcli.train.step import Batch, DMD2Step


def test_a_batch_splits_into_micro_batches_field_by_field():
    batch = Batch(noise=torch.arange(8.0).view(4, 2), cond={"text": torch.arange(12.0).view(4, 3)}, uncond=None)
    parts = batch.split(2)
    assert [p.noise.tolist() for p in parts] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    assert [p.cond["text"][:, 0].tolist() for p in parts] == [[0, 3], [6, 9]]
    assert all(p.uncond is None and p.x_real is None for p in parts)
    assert batch.split(1) == [batch]
    with pytest.raises(ValueError, match="does not split"):
        batch.split(3)


def _per_sample_noise(x, **_):
    """Noise that depends on each sample alone, so that splitting a batch draws the same numbers."""
    return torch.sin(7.0 * x + 1.0) * 1.3


def _middle_randint(*args, size=None, device=None, **_):
    low, high, size = (0, *args[:2]) if len(args) == 2 else args[:3]
    return torch.full(tuple(size), (low + high) // 2, dtype=torch.long, device=device)


# The objective of each case: DM + GAN; with DMD v1's regression pairs and FastGen's two rules; the
# regression alone (a pre-training stage: no fake score update).
CASES = {
    "dm-gan": dict(gan_generator_weight=0.5, gan_discriminator_weight=0.5),
    "regression-fastgen": dict(
        gan_generator_weight=0.5,
        gan_discriminator_weight=0.5,
        regression_weight=0.5,
        fake_score_timesteps="dm",
        gan_same_noise=True,
    ),
    "regression-only": dict(dm_weight=0.0, regression_weight=1.0),
}


def _trained(accumulation: int, iterations: int, mutate=None, case: str = "dm-gan") -> list[torch.Tensor]:
    torch.manual_seed(0)
    schedule = toy_schedule()
    teacher, generator, fake_score = MLPDenoiser(hidden=32), MLPDenoiser(hidden=32), MLPDenoiser(hidden=32)
    generator.load_state_dict(teacher.state_dict())
    fake_score.load_state_dict(teacher.state_dict())
    head = nn.Linear(32, 1)
    config = DMD2Config(guidance_scale=2.0, **CASES[case])
    dmd2 = DMD2(schedule, teacher, fake_score, head, config)
    fake_params = [*fake_score.parameters(), *head.parameters()]
    step = DMD2Step(
        dmd2,
        generator,
        [999, 499],
        list(generator.parameters()),
        fake_params,
        torch.optim.SGD(generator.parameters(), lr=0.5),
        torch.optim.SGD(fake_params, lr=0.5),
        fake_updates_per_gen=2,
        max_grad_norm=0.05,  # clipping on: the norm must be the whole batch's, not each micro-batch's
        accumulation_steps=accumulation,
        regression_distance=(lambda x, y: ((x - y) ** 2).mean()) if config.regression_weight else None,
        regression_only=case == "regression-only",
    )
    if mutate:
        mutate(step)
    batch = Batch(
        noise=torch.randn(4, 2),
        cond={"text": torch.randn(4, 3)},
        uncond={"text": torch.zeros(4, 3)},
        x_real=torch.randn(4, 2),
        real_cond={"text": torch.randn(4, 3)},
        pair_noise=torch.randn(4, 2),
        pair_latent=torch.randn(4, 2),
        pair_cond={"text": torch.randn(4, 3)},
    )
    for iteration in range(iterations):
        step(batch, iteration)
    return [p.detach().clone() for p in (*generator.parameters(), *fake_params)]


@pytest.fixture
def deterministic_draws(monkeypatch):
    monkeypatch.setattr(torch, "randn_like", _per_sample_noise)
    monkeypatch.setattr(torch, "randint", _middle_randint)
    monkeypatch.setattr(
        step_module, "backward_simulation", functools.partial(sampler.backward_simulation, draw_noise=_per_sample_noise)
    )


@pytest.mark.parametrize("case", CASES)
def test_two_micro_batches_train_as_the_whole_batch(deterministic_draws, case):
    # iterations 0 and 2 update the generator and the fake score, 1 and 3 the fake score alone;
    # every one simulates the first step backward (simulation_step's draw is the middle one, 1)
    assert step_module.simulation_step(0, 0, 2) == 1
    whole, split = _trained(1, 4, case=case), _trained(2, 4, case=case)
    moved = max((a - b).abs().max().item() for a, b in zip(whole, _trained(1, 0, case=case)))
    assert moved > 1e-3, "the steps must move the weights for the comparison to mean anything"
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_micro_batches_not_averaged_train_otherwise(deterministic_draws):
    """The test above can fail: micro-batch losses added up, not averaged, move the weights elsewhere."""

    def summed(step):
        weighted = step.dmd2.weighted_total
        step.dmd2.weighted_total = lambda terms: weighted(terms) * step.accumulation_steps

    whole, summed_up = _trained(1, 4), _trained(2, 4, summed)
    assert max((a - b).abs().max().item() for a, b in zip(whole, summed_up)) > 1e-4


def test_global_batch_sets_the_accumulation_from_the_processes():
    config = DistillConfig(teacher="x", batch_size=2, global_batch=128)
    assert config.accumulation_steps(1) == 64
    assert config.accumulation_steps(8) == 8
    with pytest.raises(UsageError, match="not a multiple of --batch-size 2 × 3 process"):
        config.accumulation_steps(3)
    assert DistillConfig(teacher="x", gradient_accumulation_steps=4).accumulation_steps(2) == 4


def test_a_skipped_generator_update_leaves_the_fake_score_every_micro_batch(deterministic_draws):
    """--skip-nonfinite: a non-finite generator loss in the first micro-batch skips the generator's
    update; the fake score still trains on all the batch's samples (the rest drawn without grad)."""
    seen = []

    def nan_first(step):
        step.skip_nonfinite = True
        losses, fake_losses = step.dmd2.generator_losses, step.dmd2.fake_score_losses

        def generator_losses(x, cond, uncond):
            terms = losses(x, cond, uncond)
            return {k: v * float("nan") for k, v in terms.items()} if len(seen) == 0 else terms

        def counted(x_fake, *args):
            seen.append(len(x_fake))
            return fake_losses(x_fake, *args)

        step.dmd2.generator_losses, step.dmd2.fake_score_losses = generator_losses, counted

    before = _trained(2, 0)
    after = _trained(2, 1, nan_first)  # iteration 0: a generator iteration
    generator = len(list(MLPDenoiser(hidden=32).parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before[:generator], after[:generator])), "generator updated"
    assert any(not torch.equal(a, b) for a, b in zip(before[generator:], after[generator:])), "fake score idle"
    assert seen == [2, 2], f"the fake score saw micro-batches of {seen}"
