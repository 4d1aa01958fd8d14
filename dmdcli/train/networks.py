"""The three networks of a run built from the teacher's UNet, and the DMD2 step over them."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from dmdcli.core.dmd2 import DMD2
from dmdcli.core.gan_head import ClassifierHead
from dmdcli.core.schedule import NoiseSchedule
from dmdcli.models.lora import FAKE_SCORE_ADAPTER, add_generator_lora, share_weights
from dmdcli.models.unet import UNetDenoiser
from dmdcli.train.optim import adamw, lr_scheduler
from dmdcli.train.step import DMD2Step


@dataclass
class Networks:
    teacher_unet: nn.Module
    generator_unet: nn.Module
    fake_unet: nn.Module
    head: ClassifierHead | None
    generator_params: list[nn.Parameter]
    fake_params: list[nn.Parameter]  # fake score's trainable weights + the classifier head's
    shared_base: bool
    sharded: bool = False  # FSDP2 across processes (see sharding.py)

    @property
    def fake_modules(self) -> nn.Module:
        """What the fake score's optimizer trains: the fake score and the classifier head."""
        return nn.ModuleDict({"fake_score": self.fake_unet, **({"discriminator": self.head} if self.head else {})})

    def describe(self, config, timesteps: list[int]) -> str:
        count = lambda params: f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable"  # noqa: E731
        kind = f"LoRA rank {config.lora_rank}" if config.lora_rank else "full fine-tune"
        fake = f"LoRA rank {config.fake_adapter_rank()} on the shared base" if self.shared_base else "full copy"
        return (
            f"generator: {kind} ({count(self.generator_params)}), {config.steps} step(s) at t = {timesteps}; "
            f"fake score: {fake} ({count(self.fake_params)}); GAN {'on' if self.head else 'off'}"
            + ("; sharded across processes (FSDP2)" if self.sharded else "")
        )


def build_networks(
    base: nn.Module,
    config,
    device: torch.device,
    frozen_dtype: torch.dtype,
    gan_probe: Callable[[UNetDenoiser, torch.device], torch.Tensor] | None = None,
    sharding=None,
) -> Networks:
    """Generator and fake score from the teacher's UNet `base` (which becomes the frozen real score).

    gan_probe: given the fake score and the device it is on, returns bottleneck features of one
    sample, to size the classifier head; None turns the GAN off.
    sharding: ShardingOptions to shard all networks across processes with FSDP (None: not sharded).
    """
    c = config
    # Sharded, the whole networks are built in host memory and fully_shard moves each process's
    # shards onto `device`: three whole SDXL UNets (~25 GB) would not fit the GPUs the shards fit.
    device, shard_onto = (torch.device("cpu"), device) if sharding is not None else (device, None)
    alpha = c.lora_alpha_value()
    shared = c.lora_rank > 0 and c.shared_base
    base.requires_grad_(False)
    if shared:
        # One frozen copy of the teacher's weights (bf16 on CUDA) under three module trees:
        # the teacher as it is, the generator and the fake score each with its own adapter.
        base.to(device, frozen_dtype)
        generator, fake = share_weights(base), share_weights(base)
        generator_params = add_generator_lora(generator, c.lora_rank, alpha)
        fake_params = add_generator_lora(fake, c.fake_adapter_rank(), alpha, adapter_name=FAKE_SCORE_ADAPTER)
    else:
        # The reference layout: generator and fake score as fp32 copies of the teacher (fp32
        # master weights, bf16 autocast forwards); the teacher frozen in bf16 on CUDA.
        generator = copy.deepcopy(base).to(device, torch.float32)
        if c.lora_rank > 0:
            generator_params = add_generator_lora(generator, c.lora_rank, alpha)
        else:
            generator_params = list(generator.requires_grad_(True).parameters())
        fake = copy.deepcopy(base).to(device, torch.float32).requires_grad_(True)
        fake_params = list(fake.parameters())
        base.to(device, frozen_dtype)
    if c.gradient_checkpointing:
        generator.enable_gradient_checkpointing()
        fake.enable_gradient_checkpointing()
    # diffusers checkpoints activations only in train mode (SD UNets have no dropout).
    generator.train()
    fake.train()
    head = None
    if gan_probe is not None:
        with torch.no_grad():
            head = ClassifierHead.for_features(gan_probe(UNetDenoiser(fake), device)).to(device)
        fake_params = fake_params + list(head.parameters())
    nets = Networks(base, generator, fake, head, generator_params, fake_params, shared)
    # Before the optimizers are built, so that they hold the shards.
    return _shard_networks(nets, sharding, shard_onto) if sharding is not None else nets


def _shard_networks(nets: Networks, options, device: torch.device) -> Networks:
    """The same networks sharded with FSDP2 onto `device` (full-weight layout only: a shared LoRA
    base is one set of weights under three module trees, which FSDP cannot shard three times)."""
    from dmdcli.train.sharding import broadcast_from_rank0, shard_module, shard_unet, trainable

    assert not nets.shared_base, "FSDP shards full-weight runs"
    for unet in (nets.teacher_unet, nets.generator_unet, nets.fake_unet):  # copies of the same teacher files
        shard_unet(unet, options)
    if nets.head is not None:
        broadcast_from_rank0(nets.head, device)  # drawn from each process's own seed
        # Its Sequential: the head's own reshape of the logits stays outside FSDP's output hooks
        # (which warn about views).
        shard_module(nets.head.net, options)
    # fully_shard replaces each parameter by a sharded one: the lists are taken again.
    return replace(
        nets, generator_params=trainable(nets.generator_unet), fake_params=trainable(nets.fake_modules), sharded=True
    )


def build_step(
    nets: Networks,
    schedule: NoiseSchedule,
    config,
    timesteps: list[int],
    accelerator,
    any_process=None,
    regression_distance=None,
) -> DMD2Step:
    """The DMD2 objective and its two AdamW optimizers (warm-up, LR schedule, clipping) over `nets`.

    Under several processes each phase module is wrapped by accelerate (DDP), which averages
    the gradients, unless the networks are sharded (FSDP reduces their gradients itself);
    `any_process` makes every process take the same non-finite decision.
    """
    c = config
    dmd2 = DMD2(
        schedule,
        UNetDenoiser(nets.teacher_unet),
        UNetDenoiser(nets.fake_unet),
        nets.head,
        c,  # the run's configuration extends the objective's (DMD2Config)
    )
    opt_g, opt_f = adamw(nets.generator_params, c.lr, c), adamw(nets.fake_params, c.fake_lr_value(), c)
    return DMD2Step(
        dmd2,
        UNetDenoiser(nets.generator_unet),
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
        wrap=accelerator.prepare_model if accelerator.num_processes > 1 and not nets.sharded else None,
        any_process=any_process,
        regression_distance=regression_distance,
        regression_iterations=c.regression_iterations,
    )
