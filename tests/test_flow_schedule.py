"""The general schedule: the DDPM family bit for bit as before, and flow matching (SD3, FLUX)
against its closed forms and diffusers' FlowMatchEulerDiscreteScheduler."""

import math

import pytest
import torch

from dmdcli.core.sampler import ddim_sample
from dmdcli.core.schedule import (
    NoiseSchedule,
    ddim_timesteps,
    flow_sigmas,
    resolution_shift,
    shift_sigmas,
    student_timesteps,
    time_shift_sigmas,
)
from dmdcli.models.teacher import is_flow_matching_config, schedule_from_config
from dmdcli.models.toy import ExactMixtureDenoiser, GaussianMixture, toy_flow_schedule, toy_schedule

SD_CONFIG = {  # SD1.5's scheduler_config.json (PNDMScheduler), the DDPM family
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}
SD3_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_CONFIG = {  # FLUX.1's scheduler_config.json
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


def tensors(*shape, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


# -- the DDPM family: the formulas as they were written before the general tables ------------------


@pytest.mark.parametrize("abar", [toy_schedule().alphas_cumprod, schedule_from_config(SD_CONFIG).alphas_cumprod])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_family_is_bit_for_bit_the_formulas_in_alphas_cumprod(abar, prediction_type):
    schedule = NoiseSchedule(abar, prediction_type)
    x0, noise, pred = tensors(6, 3, 4, 4)
    t, t_next = torch.tensor([0, 1, 10, 500, 998, 999]), torch.tensor([-1, 0, 5, 250, 700, -1])

    def root(t):  # (sqrt(ᾱ), sqrt(1 − ᾱ)) with ᾱ = 1 at t = −1
        a = torch.where(t >= 0, abar[t.clamp(min=0)], 1.0).view(-1, 1, 1, 1)
        return a.sqrt(), (1.0 - a).sqrt()

    sa, sb = root(t)
    sa_n, sb_n = root(t_next)
    x0d, noised, predd = x0.double(), noise.double(), pred.double()
    expected_x0 = {
        "epsilon": (x0d - sb * predd) / sa,
        "v_prediction": sa * x0d - sb * predd,
        "sample": predd,
    }[prediction_type]
    expected_target = {"epsilon": noise, "v_prediction": sa * noised - sb * x0d, "sample": x0}[prediction_type]
    eps = (noised - sa * x0d) / sb

    assert schedule.alphas_cumprod.dtype == torch.float64 and torch.equal(schedule.alphas_cumprod, abar)
    assert all(torch.equal(u, v) for u, v in zip(schedule.alpha_sigma(t_next, x0), (sa_n, sb_n)))
    assert torch.equal(schedule.add_noise(x0, noise, t), (sa * x0d + sb * noised).float())
    assert torch.equal(schedule.to_x0(x0, pred, t), expected_x0.float())  # x_t = x0 here: any tensor will do
    assert torch.equal(schedule.eps_from_x0(noise, x0, t), eps.float())
    assert torch.equal(schedule.target(x0, noise, t), expected_target.float())
    assert torch.equal(schedule.ddim_step(noise, x0, t, t_next), (sa_n * x0d + sb_n * eps).float())
    assert torch.equal(schedule.snr(t), abar[t] / (1.0 - abar[t]))
    assert torch.equal(schedule.network_timestep(t), t)  # a UNet is told the index itself
    assert not schedule.is_flow and schedule.num_train_timesteps == 1000


def test_exact_mixture_teacher_is_unchanged_on_ddpm():
    """The generalized exact denoiser against its previous ᾱ form, E[x0 | x_t] with ε-prediction."""
    mixture, schedule = GaussianMixture.ring(), toy_schedule()
    (x_t,) = tensors(7, 2, n=1)
    t = torch.tensor([0, 5, 100, 399, 700, 950, 999])
    a = schedule.alphas_cumprod[t].view(-1, 1, 1)
    var, centred = a * mixture.std**2 + 1.0 - a, x_t.double().unsqueeze(1) - a.sqrt() * mixture.means
    r = torch.softmax(-0.5 * (centred**2).sum(-1) / var.squeeze(-1), dim=1).unsqueeze(-1)
    x0 = (r * (mixture.means + a.sqrt() * mixture.std**2 / var * centred)).sum(1)
    expected = schedule.eps_from_x0(x_t, x0, t)
    torch.testing.assert_close(ExactMixtureDenoiser(mixture, schedule)(x_t, t, {}), expected, rtol=1e-6, atol=1e-6)


# -- flow matching: the closed forms ---------------------------------------------------------------


def test_flow_conversions_round_trip_and_the_clean_end():
    schedule = toy_flow_schedule()
    x0, noise, _ = tensors(5, 3, 4, 4)
    t = torch.tensor([0, 10, 500, 900, 999])
    x_t = schedule.add_noise(x0, noise, t)
    sigma = schedule.sigmas[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, ((1 - sigma) * x0.double() + sigma * noise.double()).float())
    torch.testing.assert_close(schedule.target(x0, noise, t), noise - x0)  # v = ε − x0
    torch.testing.assert_close(schedule.to_x0(x_t, schedule.target(x0, noise, t), t), x0, atol=1e-5, rtol=1e-5)
    # ε̂ = (x_t − α·x0)/σ: at t = 0 (σ ≈ 0.003) 1/σ amplifies x_t's float32 rounding to ~1e-5
    torch.testing.assert_close(schedule.eps_from_x0(x_t, x0, t), noise, atol=1e-4, rtol=1e-4)

    clean = torch.full((5,), -1)
    a, s = schedule.alpha_sigma(clean, x0)
    assert (a == 1).all() and (s == 0).all()
    assert torch.equal(schedule.add_noise(x0, noise, clean), x0)
    torch.testing.assert_close(schedule.ddim_step(x_t, x0, t, clean), x0, atol=1e-6, rtol=0)
    assert torch.isinf(schedule.snr(clean)).all()
    assert torch.equal(schedule.network_timestep(clean), torch.zeros(5))


def test_flow_ddim_step_is_the_euler_step():
    """z_next = α_next·x0 + σ_next·ε̂ is x_t + (σ_next − σ_t)·v for α = 1 − σ and v = ε − x0."""
    schedule = toy_flow_schedule()
    x_t, v, _ = tensors(4, 2, 3, 3)
    t, t_next = torch.tensor([999, 749, 400, 10]), torch.tensor([749, 499, 0, -1])
    x0 = schedule.to_x0(x_t, v, t)
    sigma = lambda t: torch.where(t >= 0, schedule.sigmas[t.clamp(min=0)], 0.0).view(-1, 1, 1, 1)  # noqa: E731
    euler = (x_t.double() + (sigma(t_next) - sigma(t)) * v.double()).float()
    torch.testing.assert_close(schedule.ddim_step(x_t, x0, t, t_next), euler, atol=1e-6, rtol=1e-6)


def test_flow_tables_snr_and_network_timestep():
    schedule = toy_flow_schedule()
    assert schedule.is_flow and schedule.prediction_type == "flow" and schedule.num_train_timesteps == 1000
    assert torch.equal(schedule.alphas, 1.0 - schedule.sigmas) and schedule.sigmas[-1] == 1.0
    t = torch.tensor([0, 249, 999])
    torch.testing.assert_close(schedule.snr(t), (schedule.alphas[t] / schedule.sigmas[t]) ** 2)
    timestep = schedule.network_timestep(t)
    assert timestep.dtype == torch.float32
    torch.testing.assert_close(timestep, (1000 * schedule.sigmas[t]).float())  # SD3's transformer input
    with pytest.raises(AttributeError, match="no alphas_cumprod"):
        schedule.alphas_cumprod


def test_prediction_types_per_family_and_with_prediction_type():
    flow = toy_flow_schedule()
    as_x0 = flow.with_prediction_type("sample")
    assert as_x0.is_flow and as_x0.sigmas is flow.sigmas and flow.prediction_type == "flow"
    x0, noise, _ = tensors(3, 2)
    t = torch.tensor([5, 500, 990])
    x_t = flow.add_noise(x0, noise, t)
    torch.testing.assert_close(as_x0.to_x0(x_t, x0, t), x0)
    eps = flow.with_prediction_type("epsilon")
    torch.testing.assert_close(eps.to_x0(x_t, noise, t), x0, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="flow-matching"):
        flow.with_prediction_type("v_prediction")  # v = α·ε − σ·x0 assumes α² + σ² = 1
    with pytest.raises(ValueError, match="DDPM-family"):
        NoiseSchedule(toy_schedule().alphas_cumprod, "flow")
    ddpm = toy_schedule().with_prediction_type("v_prediction")
    assert torch.equal(ddpm.alphas_cumprod, toy_schedule().alphas_cumprod)
    with pytest.raises(ValueError, match="increasing"):
        NoiseSchedule.flow(flow_sigmas().flip(0))


def test_student_ladder_is_the_shifted_sigma_ladder():
    schedule = toy_flow_schedule(shift=3.0)
    ladder = schedule.sigmas[student_timesteps(4)]
    torch.testing.assert_close(ladder, shift_sigmas(torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64), 3.0))
    assert ladder[0] == 1.0  # the first step of a multi-step student is pure noise


# -- the sigma tables against diffusers -------------------------------------------------------------


def test_static_shift_matches_diffusers_training_sigmas():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SD3_CONFIG)
    ours = schedule_from_config(SD3_CONFIG)
    assert ours.is_flow and ours.prediction_type == "flow"
    # diffusers' training table runs from σ = 1 down; its timesteps are what SD3's transformer is told
    torch.testing.assert_close(ours.sigmas, scheduler.sigmas.double().flip(0), atol=1e-6, rtol=0)
    t = torch.arange(1000)
    torch.testing.assert_close(ours.network_timestep(t), scheduler.timesteps.flip(0), atol=1e-3, rtol=0)


@pytest.mark.parametrize("image_seq_len", [1024, 4096])
def test_dynamic_shift_matches_diffusers(image_seq_len):
    """FLUX: diffusers shifts on the fly at set_timesteps with μ from FluxPipeline's calculate_shift;
    given our unshifted sigmas it must land on our table."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLUX_CONFIG)
    mu = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    assert resolution_shift(image_seq_len) == pytest.approx(mu, abs=1e-12)
    scheduler.set_timesteps(sigmas=flow_sigmas().flip(0).tolist(), mu=mu)
    ours = schedule_from_config(FLUX_CONFIG, image_seq_len=image_seq_len)
    torch.testing.assert_close(ours.sigmas, scheduler.sigmas[:-1].double().flip(0), atol=1e-6, rtol=0)
    # the exponential shift is the static one with s = e^μ
    torch.testing.assert_close(ours.sigmas, shift_sigmas(flow_sigmas(), math.exp(mu)), atol=1e-12, rtol=0)


def test_dynamic_shift_needs_the_image_seq_len():
    with pytest.raises(ValueError, match="image_seq_len"):
        schedule_from_config(FLUX_CONFIG)


def test_linear_time_shift_matches_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = {**FLUX_CONFIG, "time_shift_type": "linear"}
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(sigmas=flow_sigmas().flip(0).tolist(), mu=2.0)
    ours = time_shift_sigmas(flow_sigmas(), 2.0, "linear")
    torch.testing.assert_close(ours, scheduler.sigmas[:-1].double().flip(0), atol=1e-6, rtol=0)


def test_which_configs_are_flow_matching():
    assert is_flow_matching_config(SD3_CONFIG) and is_flow_matching_config(FLUX_CONFIG)
    assert is_flow_matching_config({"num_train_timesteps": 1000, "shift": 3.0})  # no class name: its keys
    assert not is_flow_matching_config(SD_CONFIG)
    assert not is_flow_matching_config({k: v for k, v in SD_CONFIG.items() if k != "_class_name"})
    assert not schedule_from_config(SD_CONFIG).is_flow


@pytest.mark.parametrize("steps", [1, 4, 7])
def test_ddim_sample_on_flow_is_diffusers_flow_euler(steps):
    """ddim_sample on the shifted ladder against FlowMatchEulerDiscreteScheduler's Euler loop over the
    same sigmas (ending at σ = 0), the network told `network_timestep` on our side."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedule = schedule_from_config(SD3_CONFIG)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SD3_CONFIG)
    timesteps = ddim_timesteps(steps)
    scheduler.set_timesteps(sigmas=[(t + 1) / 1000 for t in timesteps])  # unshifted: diffusers shifts them

    def velocity(x, timestep, c):  # any smooth function of (x, network timestep, cond) will do
        return torch.tanh(0.7 * x + c * timestep.view(-1, 1, 1, 1) / 1000)

    noise, c = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 1, 1)
    x = noise
    for timestep in scheduler.timesteps:
        x = scheduler.step(velocity(x, timestep.expand(2), c), timestep, x).prev_sample
    denoiser = lambda x_t, t, cond: velocity(x_t, schedule.network_timestep(t), cond["c"])  # noqa: E731
    ours = ddim_sample(denoiser, schedule, noise, {"c": c}, None, steps, 1.0)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_timesteps_at_is_the_nearest_index():
    schedule = schedule_from_config(SD3_CONFIG)
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    assert torch.equal(schedule.timesteps_at(schedule.sigmas[t]), t)
    between = (schedule.sigmas[499] * 0.3 + schedule.sigmas[500] * 0.7).reshape(1)
    assert schedule.timesteps_at(between).item() == 500
    assert schedule.timesteps_at(torch.tensor([0.0, 1.0], dtype=torch.float64)).tolist() == [0, 999]


@pytest.mark.parametrize("rule", ["shifted", "uniform", "logit-normal", "shifted-logit-normal"])
def test_dm_timestep_rules_stay_in_range_and_differ_in_where_they_put_sigma(rule):
    """shifted: uniform over the shifted table's indices, so σ is pushed up by the shift; uniform: σ
    itself uniform in [0.02, 0.98]; logit-normal: σ concentrated around 0.5; shifted-logit-normal:
    the unshifted σ = (t + 1) / T concentrated around 0.5, σ itself around the shift's 0.75."""
    from dmdcli.core.dmd2 import DMD2, DMD2Config

    schedule = schedule_from_config(SD3_CONFIG)
    dmd2 = DMD2(schedule, None, None, config=DMD2Config(dm_timesteps=rule))
    torch.manual_seed(0)
    t = dmd2.dm_timesteps(20000, torch.device("cpu"))
    sigma = schedule.sigmas[t]
    assert t.dtype == torch.long
    if rule in ("uniform", "logit-normal"):  # bounded in σ, which the shifted table's indices do not bound alike
        assert 0.0195 <= sigma.min() and sigma.max() <= 0.9805, (sigma.min(), sigma.max())
        assert torch.bincount(t).max() < 0.01 * len(t), "draws piled onto one index"
        assert rule == "logit-normal" or sigma.min() < 0.025  # σ uniform reaches down to 0.02
    else:
        assert dmd2.min_t <= t.min() and t.max() <= dmd2.max_t
    # shift 3: E[3u / (1 + 2u)] ≈ 0.68 for u uniform; ≈ 0.71 for u logit-normal (σ(0.5) = 0.75, concave)
    mean = {"shifted": 0.68, "uniform": 0.5, "logit-normal": 0.5, "shifted-logit-normal": 0.71}[rule]
    assert abs(sigma.mean().item() - mean) < 0.02, sigma.mean()
    inner = ((sigma > 0.3) & (sigma < 0.7)).float().mean().item()  # logit-normal's mass sits in the middle
    assert (inner > 0.55) == (rule == "logit-normal"), inner
    unshifted = (t + 1).double() / schedule.num_train_timesteps
    logit = (unshifted / (1 - unshifted)).log()
    if rule == "shifted-logit-normal":  # as SD3 drew its training σ: logit of the unshifted σ ~ N(0, 1)
        assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 0.96) < 0.04, (logit.mean(), logit.std())


def test_sigma_rules_need_a_flow_schedule():
    from dmdcli.core.dmd2 import DMD2, DMD2Config

    with pytest.raises(ValueError, match="flow-matching"):
        DMD2(toy_schedule(), None, None, config=DMD2Config(dm_timesteps="uniform"))


def test_the_fake_score_x0_target_is_the_mse_of_the_implied_clean_sample():
    """fake_score_target x0: the loss is MSE(to_x0(prediction), x_fake); prediction: MSE(prediction, v)."""
    from dmdcli.core.dmd2 import DMD2, DMD2Config

    schedule = schedule_from_config(SD3_CONFIG)
    x_fake = torch.randn(8, 2)
    seen = {}

    def fake_score(x_t, t, cond):
        seen.update(x_t=x_t, t=t)
        return torch.zeros_like(x_t)  # v = 0: the implied x0 is x_t itself

    for target in ("prediction", "x0"):
        torch.manual_seed(0)
        loss = DMD2(schedule, None, fake_score, config=DMD2Config(fake_score_target=target)).fake_score_losses(
            x_fake, {}
        )["denoise"]
        torch.manual_seed(0)
        t = torch.randint(0, 1000, (8,))
        noise = torch.randn_like(x_fake)
        if target == "x0":
            expected = ((seen["x_t"] - x_fake) ** 2).mean()
        else:
            expected = (schedule.target(x_fake, noise, t) ** 2).mean()
        assert torch.allclose(loss, expected.float(), atol=1e-6), target


def test_the_fake_score_can_be_fit_at_the_dm_gradients_timesteps():
    """fake_score_timesteps dm: the denoising loss's t are drawn as dm_timesteps draws (here σ
    logit-normal, its mass in the middle); all: uniform over every index, as the reference."""
    from dmdcli.core.dmd2 import DMD2, DMD2Config

    schedule = schedule_from_config(SD3_CONFIG)
    seen = []

    def fake_score(x_t, t, cond):
        seen.append(t)
        return torch.zeros_like(x_t)

    middle = {}
    for rule in ("all", "dm"):
        config = DMD2Config(dm_timesteps="logit-normal", fake_score_timesteps=rule)
        torch.manual_seed(0)
        DMD2(schedule, None, fake_score, config=config).fake_score_losses(torch.randn(20000, 2), {})
        sigma = schedule.sigmas[seen[-1]]
        middle[rule] = ((sigma > 0.3) & (sigma < 0.7)).float().mean().item()
        if rule == "all":
            assert seen[-1].min() < 20 and seen[-1].max() > 980  # every index, the ends included
    assert middle["dm"] > 0.55 > middle["all"], middle
