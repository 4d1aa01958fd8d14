"""The DMD2 math on fixed tensors, and the schedule conversions."""

import pytest
import torch

from dmdcli.core import losses
from dmdcli.core.dmd2 import DMD2, DMD2Config
from dmdcli.core.gan_head import ClassifierHead
from dmdcli.core.sampler import backward_simulation, ddim_sample, sample
from dmdcli.core.schedule import NoiseSchedule, ddim_timesteps, student_timesteps
from dmdcli.models.teacher import schedule_from_config
from dmdcli.models.toy import toy_schedule


def test_distribution_matching_grad_matches_hand_formula():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.5, -0.5], [1.5, -1.5]]]])  # [2, 1, 2, 2]
    x0_real = torch.tensor([[[[0.0, 1.0], [1.0, 2.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    x0_fake = torch.tensor([[[[1.0, 1.0], [2.0, 2.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    # By hand: p_real = x − x0_real; p_fake = x − x0_fake; grad = (p_real − p_fake) / mean|p_real|
    # sample 0: p_real = [1,1,2,2] (mean 1.5), p_real − p_fake = x0_fake − x0_real = [1,0,1,0]
    # sample 1: p_real = [.5,-.5,1.5,-1.5] (mean |.| = 1.0), difference = [1,1,1,1]
    expected = torch.tensor([[[[1 / 1.5, 0.0], [1 / 1.5, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    grad = losses.distribution_matching_grad(x, x0_real, x0_fake)
    torch.testing.assert_close(grad, expected)

    # The 0.5·MSE target trick: d loss / d x = grad / numel
    x = x.clone().requires_grad_(True)
    losses.distribution_matching_loss(x, grad).backward()
    torch.testing.assert_close(x.grad, expected / x.numel())


def test_distribution_matching_grad_normalizes_each_sample_over_all_its_channels():
    """A normalizer per channel (or over the batch) would pass a one-channel test; channels of very
    different sizes tell them apart."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 10.0, 100.0]).view(1, 3, 1, 1)
    x0_real = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    x0_fake = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    p_real = x - x0_real
    per_sample = (x0_fake - x0_real) / p_real.abs().mean(dim=(1, 2, 3), keepdim=True)
    per_channel = (x0_fake - x0_real) / p_real.abs().mean(dim=(2, 3), keepdim=True)
    assert not torch.allclose(per_sample, per_channel, rtol=0.1)  # the two readings differ here
    grad = losses.distribution_matching_grad(x.float(), x0_real.float(), x0_fake.float())
    torch.testing.assert_close(grad, per_sample.float(), rtol=1e-6, atol=1e-7)


def test_distribution_matching_grad_is_computed_in_float64():
    """(x − x0_real) − (x − x0_fake) cancels: in float32 at |x| = 1e4 only ~1e-3 of the difference survives."""
    x = torch.full((1, 2, 2, 2), 1e4)
    x0_real, x0_fake = torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2, 2), 1.2345e-4)
    grad = losses.distribution_matching_grad(x, x0_real, x0_fake)
    torch.testing.assert_close(grad, torch.full_like(x, 1.2345e-8), rtol=1e-5, atol=0)


class _Recorder:
    """A denoiser that predicts x0 as `fn(x_t, cond)` and records each call's batch, t and cond."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x_t, t, cond):
        self.calls.append((x_t.shape[0], t.clone(), {k: v.clone() for k, v in cond.items()}))
        return self.fn(x_t, cond)


def test_generator_losses_guide_only_the_real_score_in_order_and_draw_t_within_the_range():
    schedule = NoiseSchedule(toy_schedule().alphas_cumprod, "sample")  # predictions are x0 estimates
    shape = (4, 3, 2, 2)
    real = _Recorder(lambda x_t, cond: cond["c"].expand(x_t.shape[0], *shape[1:]))
    fake = _Recorder(lambda x_t, cond: 0.5 * cond["c"].expand(x_t.shape[0], *shape[1:]))
    config = DMD2Config(guidance_scale=3.0, gan_generator_weight=0.0)
    dmd2 = DMD2(schedule, real, fake, None, config)
    g = torch.Generator().manual_seed(0)
    cond = {"c": torch.randn(4, 1, 1, 1, generator=g)}
    uncond = {"c": torch.randn(4, 1, 1, 1, generator=g)}
    x = torch.randn(*shape, generator=g).requires_grad_(True)

    dmd2.generator_losses(x, cond, uncond)["dm"].backward()
    (batch, _, real_cond), (fake_batch, t, fake_cond) = real.calls[0], fake.calls[0]
    assert batch == 8 and torch.equal(real_cond["c"], torch.cat([uncond["c"], cond["c"]]))  # CFG: [uncond; cond]
    assert fake_batch == 4 and torch.equal(fake_cond["c"], cond["c"])  # the fake score: cond only, no CFG
    x0_real = (uncond["c"] + 3.0 * (cond["c"] - uncond["c"])).expand(shape)
    x0_fake = 0.5 * cond["c"].expand(shape)
    p_real = x.detach().double() - x0_real.double()
    expected = (x0_fake - x0_real).double() / p_real.abs().mean(dim=(1, 2, 3), keepdim=True)
    # d(0.5·MSE(x, x − grad))/dx = grad / numel: the sign fixes which score is subtracted from which
    torch.testing.assert_close(x.grad, (expected / x.numel()).float(), rtol=1e-5, atol=1e-9)

    # t over many draws: within [0.02, 0.98]·T, and reaching both ends
    dmd2 = DMD2(schedule, _Recorder(lambda x_t, c: x_t), _Recorder(lambda x_t, c: x_t), None, DMD2Config())
    many = torch.zeros(20000, 1, requires_grad=True)
    dmd2.generator_losses(many, {"c": torch.zeros(20000, 1)}, None)
    t = dmd2.fake_score.calls[0][1]
    assert int(t.min()) == 20 and int(t.max()) == 980


def test_distribution_matching_grad_zero_normalizer_gives_zero_not_nan():
    x = torch.ones(1, 4)
    grad = losses.distribution_matching_grad(x, x, x + 1)
    assert torch.isfinite(grad).all() and (grad == 0).all()


def test_gan_losses_by_hand():
    lr, lf = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.0])
    sp = lambda v: torch.log1p(torch.exp(torch.tensor(v)))  # noqa: E731
    expected_d = (sp(0.5) + sp(0.0)) / 2 + (sp(-2.0) + sp(1.0)) / 2
    torch.testing.assert_close(losses.gan_discriminator_loss(lr, lf), expected_d)
    torch.testing.assert_close(losses.gan_generator_loss(lf), (sp(-0.5) + sp(0.0)) / 2)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_schedule_round_trip(prediction_type):
    schedule = NoiseSchedule(toy_schedule().alphas_cumprod, prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    t = torch.tensor([0, 10, 500, 900, 999])
    x_t = schedule.add_noise(x0, noise, t)
    # A perfect denoiser outputs schedule.target; converting it back must give x0 exactly.
    torch.testing.assert_close(schedule.to_x0(x_t, schedule.target(x0, noise, t), t), x0, atol=1e-4, rtol=1e-4)


def test_schedule_precision_is_float64_except_on_mps():
    from dmdcli.core.schedule import precision

    assert precision(torch.device("cpu")) == torch.float64
    assert precision(torch.device("mps")) == torch.float32  # MPS has no float64: sampling there must not crash


def test_schedule_from_sd_scheduler_config():
    config = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction",
    }
    schedule = schedule_from_config(config)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(schedule.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=1e-6, atol=1e-7)
    assert schedule.prediction_type == "v_prediction"


def test_student_timesteps():
    assert student_timesteps(4) == [999, 749, 499, 249]
    assert student_timesteps(2) == [999, 499]
    assert student_timesteps(1, conditioning_timestep=399) == [399]
    assert student_timesteps(1) == [999]
    with pytest.raises(ValueError):
        student_timesteps(0)


class _Echo(torch.nn.Module):
    """x0-predicting test denoiser: returns its input scaled, and records the timesteps it saw."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x_t, t, cond):
        self.seen.append(t.tolist())
        return 0.5 * x_t


def test_sampler_and_backward_simulation_follow_the_timesteps():
    schedule = NoiseSchedule(toy_schedule().alphas_cumprod, "sample")
    gen, timesteps = _Echo(), [999, 749, 499, 249]
    x = sample(gen, schedule, torch.ones(2, 3), {}, timesteps, draw_noise=torch.zeros_like)
    assert gen.seen == [[t, t] for t in timesteps]
    # With zero re-noising noise, each step scales by 0.5 and re-noises to sqrt(ᾱ_next)·x0.
    a = schedule.alphas_cumprod
    expected = 0.5 * torch.ones(2, 3)
    for t_next in timesteps[1:]:
        expected = 0.5 * (a[t_next].sqrt() * expected)
    torch.testing.assert_close(x, expected.float())

    gen.seen.clear()
    x_t = backward_simulation(gen, schedule, torch.ones(2, 3), {}, timesteps, 2, draw_noise=torch.zeros_like)
    assert gen.seen == [[999, 999], [749, 749]]  # two generator steps, then noised to t = 499
    x0_after_two = 0.5 * (a[749].sqrt() * 0.5)
    torch.testing.assert_close(x_t, (a[499].sqrt() * x0_after_two * torch.ones(2, 3)).float())
    assert backward_simulation(gen, schedule, torch.ones(2, 3), {}, timesteps, 0) is not None


def test_real_score_cfg_is_uncond_plus_scale_times_difference():
    schedule = NoiseSchedule(toy_schedule().alphas_cumprod, "sample")

    class CondShift(torch.nn.Module):  # predicts x_t + c, so cond and uncond differ by c
        def forward(self, x_t, t, cond):
            return x_t + cond["c"].view(-1, 1)

    dmd2 = DMD2(schedule, CondShift(), CondShift(), config=DMD2Config(guidance_scale=3.0))
    x_t, t = torch.zeros(2, 2), torch.tensor([10, 20])
    x0 = dmd2.real_x0(x_t, t, {"c": torch.tensor([1.0, 2.0])}, {"c": torch.tensor([0.0, 0.0])})
    torch.testing.assert_close(x0, torch.tensor([[3.0, 3.0], [6.0, 6.0]]))


@pytest.mark.parametrize("size,convs", [(32, 4), (8, 2), (2, 0)])
def test_classifier_head_follows_reference_layout(size, convs):
    head = ClassifierHead(64, size)
    n_conv = sum(isinstance(m, torch.nn.Conv2d) for m in head.modules()) - 1  # minus the 1×1 logit conv
    assert n_conv == convs  # SDXL 32²: three stride-2 + one stride-4; SD1.5 8²: one + one
    assert head(torch.randn(3, 64, size, size)).shape == (3,)
    assert ClassifierHead.for_features(torch.randn(3, 16)).forward(torch.randn(3, 16)).shape == (3,)
    features = torch.randn(3, 64, size, size)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in training under mixed precision
        logits = head(features)
    assert logits.dtype == torch.float32 and torch.equal(logits, head(features))  # the head itself in fp32


@pytest.mark.parametrize("steps, prediction", [(4, "epsilon"), (5, "v_prediction")])
def test_ddim_sample_is_diffusers_ddim_landing_on_x0(steps, prediction):
    """ddim_sample against DDIMScheduler (η = 0, trailing spacing, the last step onto x0)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction,
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        clip_sample=False,
    )
    scheduler.set_timesteps(steps)
    schedule = NoiseSchedule(scheduler.alphas_cumprod, prediction)

    def denoiser(x, t, cond):  # any smooth function of (x, t, cond) will do
        return torch.tanh(0.7 * x + cond["encoder_hidden_states"] * t.view(-1, 1, 1, 1) / 1000)

    torch.manual_seed(0)
    noise, cond = torch.randn(2, 4, 8, 8), {"encoder_hidden_states": torch.randn(2, 4, 1, 1)}
    x = noise.double()
    for t in scheduler.timesteps:
        out = denoiser(x, t.expand(2), {"encoder_hidden_states": cond["encoder_hidden_states"].double()})
        x = scheduler.step(out, t, x).prev_sample
    ours = ddim_sample(denoiser, schedule, noise, cond, None, steps, 1.0)
    assert [int(t) for t in scheduler.timesteps] == ddim_timesteps(steps)
    torch.testing.assert_close(ours, x.float(), rtol=1e-5, atol=1e-5)


def test_features_wider_than_the_reference_head_are_projected_first():
    """SDXL's 1280 channels keep the reference head as it is; FLUX's 3072-wide tokens on a 64²
    patch grid go through a 1×1 projection to 1280 (the head 0.13B parameters instead of 0.75B)."""
    from dmdcli.core.gan_head import MAX_HEAD_CHANNELS

    with torch.device("meta"):
        sdxl, flux = ClassifierHead(1280, 32), ClassifierHead(3072, 64)
    first = flux.net[0]
    assert (first.in_channels, first.out_channels, first.kernel_size) == (3072, MAX_HEAD_CHANNELS, (1, 1))
    assert sdxl.net[0].kernel_size == (4, 4) and sdxl.net[0].in_channels == 1280
    assert sum(p.numel() for p in flux.parameters()) < 0.14e9
    assert ClassifierHead(96, 8)(torch.randn(2, 96, 8, 8)).shape == (2,)


@pytest.mark.parametrize("same", [False, True])
def test_gan_same_noise_noises_real_and_fake_with_one_draw(same):
    """gan_same_noise: the discriminator's real and fake latents get the same diffusion-GAN t and
    noise (read back from what the fake score's bottleneck is handed); off: a draw each."""
    schedule, seen = toy_schedule(), []

    class FakeScore:
        def __call__(self, x_t, t, cond):  # the denoising term's forward
            return torch.zeros_like(x_t)

        def bottleneck(self, x_t, t, cond):  # what the discriminator reads
            seen.append((x_t, t))
            return x_t

    config = DMD2Config(gan_discriminator_weight=1.0, gan_same_noise=same)
    dmd2 = DMD2(schedule, None, FakeScore(), torch.nn.Linear(2, 1), config)
    x_fake, x_real = torch.randn(64, 2), torch.randn(64, 2)
    torch.manual_seed(0)
    dmd2.fake_score_losses(x_fake, {}, x_real, {})
    (real_t, real_x_t), (fake_t, fake_x_t) = [(t, x_t) for x_t, t in seen]
    noises = []
    for x, x_t, t in ((x_real, real_x_t, real_t), (x_fake, fake_x_t, fake_t)):
        a, s = schedule.alpha_sigma(t, x)
        noises.append((x_t - a * x) / s)
    assert torch.equal(real_t, fake_t) == same
    assert torch.allclose(noises[0], noises[1], atol=1e-5) == same
