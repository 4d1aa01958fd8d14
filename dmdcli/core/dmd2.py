"""The DMD2 objective (arXiv 2405.14867): its two phases on the denoiser interface.

- Generator phase: distribution matching (real score with CFG vs fake score, DMD eq. 7-8) plus
  the non-saturating GAN generator loss through the fake score's classifier head.
- Fake score phase: denoising loss on detached generator samples plus the GAN discriminator
  loss on real latents vs generator samples.

Both return unweighted loss terms; `weighted_total` applies the configured weights, and the
training runtime owns backward, optimizers and the two time-scale schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from dmdcli.core import losses
from dmdcli.core.denoiser import Cond, Denoiser
from dmdcli.core.gan_head import ClassifierHead
from dmdcli.core.sampler import guided_prediction
from dmdcli.core.schedule import NoiseSchedule

DM_TIMESTEPS = ("shifted", "uniform", "logit-normal", "shifted-logit-normal")
FAKE_SCORE_TARGETS = ("prediction", "x0")
FAKE_SCORE_TIMESTEPS = ("all", "dm")


def option(default, help: str, command_line: bool = True):
    """A config field with its one line of help, which `dmd distill --help` shows for it; a field
    that is not `command_line` (rarely changed: the timestep range, AdamW's betas) is a recipe key only."""
    return field(default=default, metadata={"help": help, "command_line": command_line})


@dataclass
class DMD2Config:
    """The objective's settings: the first section of a run's configuration (train/config.py),
    so each is defined here once, with its default and its help."""

    guidance_scale: float = option(
        1.75, "Real-score CFG scale s: uncond + s·(cond − uncond); 1.75 SD1.5, 8 SDXL; 1: off."
    )
    dm_weight: float = option(1.0, "Distribution-matching loss weight (0: GAN only).")
    # The defaults are the reference's SD1.5 stage 1 (no GAN); the GAN's recipes set its weights.
    gan_generator_weight: float = option(
        0.0,
        "Weight of the generator's GAN loss softplus(−D(G(z))) with --data; 0: no GAN term. Reference: 1e-3 "
        "SD1.5 (stage 2), 5e-3 SDXL.",
    )
    gan_discriminator_weight: float = option(
        0.0, "Weight of the discriminator loss in the fake score update; 0: none. Reference: 1e-2."
    )
    diffusion_gan: bool = option(
        True,
        "Noise real and fake latents at t < --diffusion-gan-max-timestep before D, as every reference GAN run; "
        "--no-diffusion-gan: D on clean latents.",
    )
    diffusion_gan_max_timestep: int = option(1000, "Upper bound of the diffusion-GAN timesteps.")
    gan_same_noise: bool = option(
        False,
        "With the diffusion GAN, the discriminator's update noises its real and fake latents with one draw of t "
        "and noise (NVlabs/FastGen's gan_use_same_t_noise); off: a draw each, as the reference.",
    )
    gan_feature_block: int | None = option(
        None, "Transformer teachers (SD3, FLUX): the block whose image tokens the GAN head reads (default: the middle)."
    )
    dm_timesteps: str = option(
        "shifted",
        "DM timesteps: shifted (uniform over the teacher's indices: for a flow teacher σ uniform, then its "
        "shift) | uniform (σ uniform) | logit-normal (σ logit-normal, unshifted) | shifted-logit-normal (σ "
        "logit-normal, then the shift: SD3's training density); all but shifted: flow teachers only.",
    )
    fake_score_target: str = option(
        "prediction",
        "Fake score's denoising loss: prediction (MSE on the teacher's target: ε, v or flow velocity) | x0.",
    )
    fake_score_timesteps: str = option(
        "all",
        "Fake score's denoising timesteps: all (uniform over every index, the reference) | dm (drawn as "
        "--dm-timesteps draws the DM gradient's: fit where distribution matching reads it, as NVlabs/FastGen).",
    )
    min_timestep_frac: float = option(
        0.02,
        "Lower end of the DM timesteps, as a fraction of T: indices in [min, max]·T (the reference's uniform "
        "draw); for --dm-timesteps uniform and logit-normal, σ in [min, max].",
        command_line=False,
    )
    max_timestep_frac: float = option(0.98, "Upper end of the DM timesteps, as a fraction of T.", command_line=False)
    regression_weight: float = option(
        0.0, "Regression loss weight λ on teacher noise→image pairs (DMD v1 eq. 9); 0.25 with --method dmd; 0: off."
    )


class DMD2:
    """The DMD2 loss terms over a real score, a fake score and an optional classifier head."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        real_score: Denoiser,
        fake_score: Denoiser,
        discriminator: ClassifierHead | None = None,
        config: DMD2Config | None = None,
    ):
        self.schedule = schedule
        self.real_score = real_score
        self.fake_score = fake_score
        self.discriminator = discriminator
        self.config = config or DMD2Config()
        if self.config.dm_timesteps != "shifted" and not schedule.is_flow:
            raise ValueError(f"dm_timesteps {self.config.dm_timesteps!r} draws σ of a flow-matching schedule")
        T = schedule.num_train_timesteps
        self.min_t = int(self.config.min_timestep_frac * T)
        self.max_t = min(int(self.config.max_timestep_frac * T), T - 1)

    # -- the two scores ------------------------------------------------------------------------

    def real_x0(self, x_t: Tensor, t: Tensor, cond: Cond, uncond: Cond | None) -> Tensor:
        """Teacher's x0 with classifier-free guidance, in one batched forward of [uncond; cond]."""
        prediction = guided_prediction(self.real_score, x_t, t, cond, uncond, self.config.guidance_scale)
        return self.schedule.to_x0(x_t, prediction, t)

    def fake_x0(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """Fake score's x0, no guidance (fake guidance = 1 in the reference)."""
        return self.schedule.to_x0(x_t, self.fake_score(x_t, t, cond), t)

    def gan_noise(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """A diffusion-GAN draw for latents like x: timesteps [B] below diffusion_gan_max_timestep, noise."""
        t = torch.randint(0, self.config.diffusion_gan_max_timestep, (x.shape[0],), device=x.device)
        return t, torch.randn_like(x)

    def realism_logits(self, x: Tensor, cond: Cond, draw: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """D(x): the classifier head on the fake score's bottleneck at t = 0 (or at diffusion-GAN t,
        noised by `draw`, else by a draw of its own)."""
        assert self.discriminator is not None
        if self.config.diffusion_gan:
            t, noise = draw or self.gan_noise(x)
            x = self.schedule.add_noise(x, noise, t)
        else:
            t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.discriminator(self.fake_score.bottleneck(x, t, cond))

    def dm_timesteps(self, batch: int, device: torch.device) -> Tensor:
        """The DM gradient's timesteps [B]: uniform over the indices [min_t, max_t] (the reference's
        rule; on a flow schedule, σ uniform in [min, max] then shifted as the teacher's table is), or
        logit-normal over them (σ logit-normal, then shifted: the training density of SD3 and FLUX,
        Esser et al. 2024), or σ itself drawn (uniform, logit-normal) within [min, max] and taken to
        its nearest index, unshifted. The last two are bounded in σ, not in index: on a shifted
        table σ = 0.02 lies below index min_t, and clamping to it piled the lowest draws there."""
        c = self.config
        if c.dm_timesteps == "shifted":
            return torch.randint(self.min_t, self.max_t + 1, (batch,), device=device)
        if c.dm_timesteps == "uniform":
            u = torch.rand(batch, device=device, dtype=torch.float64)
        else:  # logit-normal
            u = torch.sigmoid(torch.randn(batch, device=device, dtype=torch.float64))
        if c.dm_timesteps == "shifted-logit-normal":  # the index is the unshifted σ's: the table shifts it
            return (self.min_t + (self.max_t - self.min_t) * u).round().long()
        sigma = c.min_timestep_frac + (c.max_timestep_frac - c.min_timestep_frac) * u
        return self.schedule.timesteps_at(sigma)

    # -- the two phases ------------------------------------------------------------------------

    def generator_losses(self, x: Tensor, cond: Cond, uncond: Cond | None) -> dict[str, Tensor]:
        """Loss terms for the generator, given its output x [B, ...] (with grad).

        "dm": 0.5·MSE(x, stopgrad(x − grad)) with the normalized DM gradient at a random
        t ∈ [min_timestep_frac, max_timestep_frac]·T (0.02 and 0.98 by default); "gan_g":
        softplus(−D(x)) when a classifier head is present.
        """
        out: dict[str, Tensor] = {}
        if self.config.dm_weight > 0:
            with torch.no_grad():
                t = self.dm_timesteps(x.shape[0], x.device)
                x_t = self.schedule.add_noise(x.detach(), torch.randn_like(x), t)
                grad = losses.distribution_matching_grad(
                    x, self.real_x0(x_t, t, cond, uncond), self.fake_x0(x_t, t, cond)
                )
            out["dm"] = losses.distribution_matching_loss(x, grad)
        if self.discriminator is not None and self.config.gan_generator_weight > 0:
            out["gan_g"] = losses.gan_generator_loss(self.realism_logits(x, cond))
        return out

    def regression_loss(self, x_pair: Tensor, latent_pair: Tensor, distance) -> Tensor:
        """DMD v1's L_reg = E[ℓ(G(z), y)] on a teacher pair (z, y): x_pair = G(z) [B, ...] (with
        grad), latent_pair = y from the teacher's deterministic sampler; `distance` → scalar."""
        return distance(x_pair, latent_pair.detach())

    def fake_score_losses(
        self, x_fake: Tensor, cond: Cond, x_real: Tensor | None = None, real_cond: Cond | None = None
    ) -> dict[str, Tensor]:
        """Loss terms for the fake score (and classifier head).

        "denoise": diffusion loss on the detached generator samples x_fake at t ~ U[0, T) (or, with
        fake_score_timesteps "dm", at the DM gradient's timesteps);
        "gan_d": softplus(D(fake)) + softplus(−D(real)) when a head and real latents are given.
        """
        x_fake = x_fake.detach()
        if self.config.fake_score_timesteps == "dm":
            t = self.dm_timesteps(x_fake.shape[0], x_fake.device)
        else:
            t = torch.randint(0, self.schedule.num_train_timesteps, (x_fake.shape[0],), device=x_fake.device)
        noise = torch.randn_like(x_fake)
        x_t = self.schedule.add_noise(x_fake, noise, t)
        prediction = self.fake_score(x_t, t, cond)
        if self.config.fake_score_target == "x0":
            out = {"denoise": losses.denoising_loss(self.schedule.to_x0(x_t, prediction, t), x_fake)}
        else:
            out = {"denoise": losses.denoising_loss(prediction, self.schedule.target(x_fake, noise, t))}
        if self.discriminator is not None and x_real is not None:
            assert real_cond is not None
            draw = None
            if self.config.gan_same_noise and self.config.diffusion_gan:  # D tells them apart at matched noise
                if x_real.shape != x_fake.shape:
                    raise ValueError(f"gan_same_noise: real latents {x_real.shape} and fake {x_fake.shape} differ")
                draw = self.gan_noise(x_fake)
            out["gan_d"] = losses.gan_discriminator_loss(
                self.realism_logits(x_real.detach(), real_cond, draw), self.realism_logits(x_fake, cond, draw)
            )
        return out

    def weighted_total(self, terms: dict[str, Tensor]) -> Tensor:
        """Sum of the loss terms with their configured weights."""
        c = self.config
        weights = {
            "dm": c.dm_weight,
            "gan_g": c.gan_generator_weight,
            "denoise": 1.0,
            "gan_d": c.gan_discriminator_weight,
            "regression": c.regression_weight,
        }
        return sum(weights[k] * v for k, v in terms.items())
