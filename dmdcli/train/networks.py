"""The three networks of a run, and the DMD2 step over them."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dmdcli.core.dmd2 import DMD2
from dmdcli.core.gan_head import ClassifierHead
from dmdcli.core.schedule import NoiseSchedule
from dmdcli.train.ema import GeneratorEMA
from dmdcli.train.optim import adamw, lr_scheduler
from dmdcli.train.step import DMD2Step


@dataclass
class Networks:
    """The three networks of a run (built by its layout, dmdcli.train.layouts) and the weights each
    optimizer trains."""

    teacher_unet: nn.Module
    generator_unet: nn.Module
    fake_unet: nn.Module
    head: ClassifierHead | None
    generator_params: list[nn.Parameter]
    fake_params: list[nn.Parameter]  # fake score's trainable weights + the classifier head's

    @property
    def fake_modules(self) -> nn.Module:
        """What the fake score's optimizer trains: the fake score and the classifier head."""
        return nn.ModuleDict({"fake_score": self.fake_unet, **({"discriminator": self.head} if self.head else {})})


def build_step(
    nets: Networks,
    denoiser,
    data_parallel,
    schedule: NoiseSchedule,
    config,
    timesteps: list[int],
    accelerator,
    any_process=None,
    regression_distance=None,
    accumulation_steps: int = 1,
) -> DMD2Step:
    """The DMD2 objective and its two AdamW optimizers (warm-up, LR schedule, clipping) over `nets`.

    `denoiser` is the teacher family's adapter (network → Denoiser); `data_parallel` wraps each
    phase module under several processes (the layout's: DDP, or None when FSDP reduces the
    gradients itself); `any_process` makes every process take the same non-finite decision.
    """
    c = config
    dmd2 = DMD2(
        schedule,
        denoiser(nets.teacher_unet),
        denoiser(nets.fake_unet),
        nets.head,
        c,  # the run's configuration extends the objective's (DMD2Config)
    )
    opt_g, opt_f = adamw(nets.generator_params, c.lr, c), adamw(nets.fake_params, c.fake_lr_value(), c)
    # After the layout built (and, under FSDP, sharded) the generator: the average shadows its final parameters.
    ema = GeneratorEMA(nets.generator_params, c.ema_decay) if c.ema_decay else None
    return DMD2Step(
        dmd2,
        denoiser(nets.generator_unet),
        timesteps,
        nets.generator_params,
        nets.fake_params,
        opt_g,
        opt_f,
        generator_lr_scheduler=lr_scheduler(opt_g, c, c.iterations),
        fake_lr_scheduler=lr_scheduler(opt_f, c, c.iterations),
        fake_updates_per_gen=c.fake_updates_per_gen,
        max_grad_norm=c.max_grad_norm,
        seed=c.seed,
        skip_nonfinite=c.skip_nonfinite,
        backward=accelerator.backward,
        autocast=accelerator.autocast,
        wrap=data_parallel,
        any_process=any_process,
        regression_distance=regression_distance,
        regression_iterations=c.regression_iterations,
        regression_only=c.regression_only(),
        ema=ema,
        accumulation_steps=accumulation_steps,
    )
