"""How a run holds its three networks: the network layout.

A layout builds the generator and the fake score from the teacher's network, and owns what
follows from how it did: which weights are trained, their checkpoint state dict and its loading,
the optimizers' state, the line the run prints and its rows of the `--dry-run` estimate.

    FullFineTune    generator and fake score as whole fp32 copies of the teacher
    ReferenceLora   the generator a LoRA adapter on its own fp32 copy, the fake score a whole copy
                    (DMD2's SDXL LoRA recipe)
    SharedBaseLora  one frozen base under three module trees: the teacher, and the generator and
                    the fake score each with its own adapter (the leanest)
    Sharded         FullFineTune's networks sharded across processes with FSDP2 (see sharding.py)

Checkpoint names are the same for all: generator.*, fake_score.*, discriminator.* (the GAN head).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor, nn

from dmdcli.core.gan_head import ClassifierHead
from dmdcli.models.lora import (
    FAKE_SCORE_ADAPTER,
    GENERATOR_ADAPTER,
    add_generator_lora,
    load_lora_state_dict,
    lora_state_dict,
    share_weights,
)
from dmdcli.train.networks import Networks
from dmdcli.train.sharding import ShardingOptions

Adapter = tuple[int, float, str]  # a LoRA adapter: (rank, alpha, name)
ByteRows = dict[str, float]


def prefixed(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` under checkpoint names: "generator." + its names."""
    return {prefix + k: v for k, v in state.items()}


def part(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors named `prefix`…, without it: one network's state from a checkpoint's."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _trainable_copy(base: nn.Module, device: torch.device) -> nn.Module:
    """An fp32 copy of the teacher's network (fp32 master weights, bf16 autocast forwards)."""
    return copy.deepcopy(base).to(device, torch.float32)


def _count(params: list[nn.Parameter]) -> str:
    return f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable"


class Layout:
    """A network layout. Its defaults are the full fine-tune's; each other layout overrides what
    differs from it."""

    #: Whether the teacher's network is only ever used frozen (no fp32 copy is trained from it), so
    #: that it may be loaded in the frozen dtype straight onto the device (PipelineTeacher).
    frozen_network = False

    def __init__(self, config, lora_targets: tuple[str, ...] = ()):
        self.config = config
        self.lora_targets = lora_targets  # the modules the LoRA layouts' adapters wrap (Family.lora_targets)

    # -- building ------------------------------------------------------------------------------

    def build(
        self,
        base: nn.Module,
        device: torch.device,
        frozen_dtype: torch.dtype,
        gan_probe: Callable[[nn.Module, torch.device], Tensor] | None = None,
    ) -> Networks:
        """Generator and fake score from the teacher's network `base` (which becomes the frozen
        real score). gan_probe: given the fake score's network and the device it is on, returns bottleneck
        features of one sample, to size the classifier head; None turns the GAN off."""
        base.requires_grad_(False)
        generator, fake, generator_params, fake_params = self._make(base, device, frozen_dtype)
        if self.config.gradient_checkpointing:
            generator.enable_gradient_checkpointing()
            fake.enable_gradient_checkpointing()
        # diffusers checkpoints activations only in train mode (SD UNets have no dropout).
        generator.train()
        fake.train()
        head = None
        if gan_probe is not None:
            with torch.no_grad():
                head = ClassifierHead.for_features(gan_probe(fake, device)).to(device)
            fake_params = fake_params + list(head.parameters())
        return Networks(base, generator, fake, head, generator_params, fake_params)

    def _make(self, base: nn.Module, device: torch.device, frozen_dtype: torch.dtype):
        """(generator, fake score, the generator's trained parameters, the fake score's)."""
        # Copied before the teacher is cast: the copies start from its full-precision weights.
        generator = _trainable_copy(base, device)
        generator_params = self._generator_parameters(generator)
        fake = _trainable_copy(base, device).requires_grad_(True)
        base.to(device, frozen_dtype)
        return generator, fake, generator_params, list(fake.parameters())

    def _generator_parameters(self, generator: nn.Module) -> list[nn.Parameter]:
        return list(generator.requires_grad_(True).parameters())

    # -- state ---------------------------------------------------------------------------------

    def reads_tensors(self, main_process: bool) -> bool:
        """Whether this process reads a checkpoint's tensors (each holds whole networks)."""
        return True

    def draws_grids(self, main_process: bool) -> bool:
        """Whether this process draws the sample grids (only the main one saves them)."""
        return main_process

    def data_parallel(self, accelerator) -> Callable[[nn.Module], nn.Module] | None:
        """How each phase module is wrapped under several processes (DDP averages the gradients)."""
        return accelerator.prepare_model if accelerator.num_processes > 1 else None

    def generator_state(self, generator: nn.Module) -> dict[str, Tensor]:
        return generator.state_dict()

    def load_generator(self, generator: nn.Module, state: dict[str, Tensor]) -> None:
        generator.load_state_dict(state)

    def fake_state(self, fake: nn.Module) -> dict[str, Tensor]:
        return fake.state_dict()

    def load_fake(self, fake: nn.Module, state: dict[str, Tensor]) -> None:
        fake.load_state_dict(state)

    def generator_weights(self, nets: Networks) -> dict[str, Tensor]:
        """The generator's trained weights under their names: the student file's tensors."""
        return self.generator_state(nets.generator_unet)

    def load_generator_weights(self, nets: Networks, state: dict[str, Tensor]) -> None:
        self.load_generator(nets.generator_unet, state)

    def weights(self, nets: Networks) -> dict[str, Tensor]:
        """The trained weights under their checkpoint names: an adapter's or a whole network's."""
        weights = {
            **prefixed("generator.", self.generator_weights(nets)),
            **prefixed("fake_score.", self.fake_state(nets.fake_unet)),
        }
        if nets.head is not None:
            weights.update(prefixed("discriminator.", nets.head.state_dict()))
        return weights

    def load_weights(self, nets: Networks, tensors: dict[str, Tensor], with_head: bool) -> None:
        """What `weights` names, back into the networks (the classifier head's if `with_head`)."""
        self.load_generator_weights(nets, part("generator.", tensors))
        self.load_fake(nets.fake_unet, part("fake_score.", tensors))
        if with_head:
            nets.head.load_state_dict(part("discriminator.", tensors))

    def optimizer_states(self, nets: Networks, step) -> tuple[dict, dict]:
        """The two optimizers' state_dicts, keyed by parameter index."""
        return step.generator_optimizer.state_dict(), step.fake_optimizer.state_dict()

    def load_optimizer_states(self, nets: Networks, step, generator: dict, fake: dict) -> None:
        step.generator_optimizer.load_state_dict(generator)
        step.fake_optimizer.load_state_dict(fake)

    # -- what the run says and the estimate ----------------------------------------------------

    generator_kind = "full fine-tune"
    fake_kind = "full copy"
    suffix = ""

    def describe(self, nets: Networks, at: str) -> str:
        """The run's start line; `at`: the student's timesteps, as the run names them."""
        generator = (
            f"generator: {self.generator_kind} ({_count(nets.generator_params)}), {self.config.steps} step(s) at {at}"
        )
        if self.config.regression_only():
            rest = (
                "regression only: the generator fits the teacher's pairs alone (no DM, no GAN; the fake score is "
                "not trained)"
            )
        else:
            rest = f"fake score: {self.fake_kind} ({_count(nets.fake_params)}); GAN {'on' if nets.head else 'off'}"
        return f"{generator}; {rest}{self.suffix}"

    def adapters(self) -> dict[str, Adapter | None]:
        """Each network as it trains, for the estimate: an adapter on the frozen base, or None
        for every weight in fp32."""
        return {"generator": None, "fake score": None}

    #: How many processes share each network's weights, moments and gradients.
    shards = 1

    def autocast_copies(self, trained: int, bf16: bool) -> float:
        """Bytes autocast keeps of `trained` fp32 weights: a bf16 copy of each weight it casts,
        for the backward."""
        return 2 * trained if bf16 else 0.0

    def weight_rows(self, teacher: int, generator: int, fake: int, head: int, frozen_bytes: int) -> ByteRows:
        """Bytes of the networks' weights per process: `teacher` parameters frozen at
        `frozen_bytes` each, the trained ones (`generator`, `fake`, `head`) in fp32."""
        n = self.shards
        return {
            "teacher network (frozen)": teacher * frozen_bytes / n,
            "generator": 4 * generator / n,
            "fake score + classifier": 4 * (fake + head) / n,
        }

    def gathered_bytes(self, unet: nn.Module, frozen_bytes: int) -> float:
        """Whole units gathered while they run (sharded layouts only)."""
        return 0.0


class FullFineTune(Layout):
    """Generator and fake score as whole fp32 copies of the teacher, every weight trained."""


class _LoraGenerator(Layout):
    """The generator trained as a LoRA adapter (what both LoRA layouts share)."""

    @property
    def generator_kind(self) -> str:
        return f"LoRA rank {self.config.lora_rank}"

    def _generator_parameters(self, generator: nn.Module) -> list[nn.Parameter]:
        return add_generator_lora(generator, self.config.lora_rank, self.config.lora_alpha_value(), self.lora_targets)

    def generator_state(self, generator: nn.Module) -> dict[str, Tensor]:
        return lora_state_dict(generator)

    def load_generator(self, generator: nn.Module, state: dict[str, Tensor]) -> None:
        load_lora_state_dict(generator, state)

    def adapters(self) -> dict[str, Adapter | None]:
        return {
            **super().adapters(),
            "generator": (self.config.lora_rank, self.config.lora_alpha_value(), GENERATOR_ADAPTER),
        }


class ReferenceLora(_LoraGenerator):
    """DMD2's LoRA layout: the generator's adapter on its own fp32 copy, a whole fake score."""

    def weight_rows(self, teacher: int, generator: int, fake: int, head: int, frozen_bytes: int) -> ByteRows:
        rows = super().weight_rows(teacher, generator, fake, head, frozen_bytes)
        rows["generator"] += 4 * teacher  # + its own fp32 base copy
        return rows


class SharedBaseLora(_LoraGenerator):
    """One frozen copy of the teacher's weights (bf16 on CUDA) under three module trees: the
    teacher as it is, the generator and the fake score each with its own adapter."""

    frozen_network = True

    @property
    def fake_kind(self) -> str:
        return f"LoRA rank {self.config.fake_adapter_rank()} on the shared base"

    def _make(self, base: nn.Module, device: torch.device, frozen_dtype: torch.dtype):
        base.to(device, frozen_dtype)
        generator, fake = share_weights(base), share_weights(base)
        generator_params = self._generator_parameters(generator)
        c = self.config
        fake_params = add_generator_lora(
            fake, c.fake_adapter_rank(), c.lora_alpha_value(), self.lora_targets, adapter_name=FAKE_SCORE_ADAPTER
        )
        return generator, fake, generator_params, fake_params

    def fake_state(self, fake: nn.Module) -> dict[str, Tensor]:
        return lora_state_dict(fake, FAKE_SCORE_ADAPTER)

    def load_fake(self, fake: nn.Module, state: dict[str, Tensor]) -> None:
        load_lora_state_dict(fake, state, FAKE_SCORE_ADAPTER)

    def adapters(self) -> dict[str, Adapter | None]:
        fake = (self.config.fake_adapter_rank(), self.config.lora_alpha_value(), FAKE_SCORE_ADAPTER)
        return {**super().adapters(), "fake score": fake}


class Sharded(FullFineTune):
    """Full fine-tune sharded with FSDP2: each process holds 1/N of every network (a shared LoRA
    base is one set of weights under three module trees, which FSDP cannot shard three times).
    Checkpoints hold whole tensors, gathered onto process 0: the same files as an unsharded run's."""

    suffix = "; sharded across processes (FSDP2)"

    def __init__(self, config, options: ShardingOptions, processes: int):
        super().__init__(config)
        self.options, self.processes = options, processes

    def build(self, base, device, frozen_dtype, gan_probe=None) -> Networks:
        # The whole networks are built in host memory and fully_shard moves each process's shards
        # onto `device`: three whole SDXL UNets (~25 GB) would not fit the GPUs the shards fit.
        from dmdcli.train.sharding import broadcast_from_rank0, shard_head, shard_network, trainable

        nets = super().build(base, torch.device("cpu"), frozen_dtype, gan_probe)
        for unet in (nets.teacher_unet, nets.generator_unet, nets.fake_unet):  # copies of the same teacher files
            shard_network(unet, self.options)
        if nets.head is not None:
            broadcast_from_rank0(nets.head, device)  # drawn from each process's own seed
            # Its Sequential: the head's own reshape of the logits stays outside FSDP's output hooks
            # (which warn about views).
            shard_head(nets.head.net, self.options)
        # fully_shard replaces each parameter by a sharded one: the lists are taken again (before
        # the optimizers are built, so that they hold the shards).
        return replace(nets, generator_params=trainable(nets.generator_unet), fake_params=trainable(nets.fake_modules))

    def reads_tensors(self, main_process: bool) -> bool:
        return main_process  # process 0 reads, FSDP sends each process its shards

    def draws_grids(self, main_process: bool) -> bool:
        return True  # every forward needs every process

    def data_parallel(self, accelerator):
        return None  # FSDP reduces the gradients itself

    def generator_weights(self, nets: Networks) -> dict[str, Tensor]:
        """Gathered whole onto process 0 (every process must call this; the others get {})."""
        from dmdcli.train.sharding import full_model_state

        return full_model_state(nets.generator_unet)

    def load_generator_weights(self, nets: Networks, state: dict[str, Tensor]) -> None:
        """Process 0 holds the tensors (the others pass {}) and FSDP sends each process its shards."""
        from dmdcli.train.sharding import load_full_model_state

        load_full_model_state(nets.generator_unet, state)

    def weights(self, nets: Networks) -> dict[str, Tensor]:
        """Gathered whole onto process 0 (every process must call this; the others get {})."""
        from dmdcli.train.sharding import full_model_state

        return {**prefixed("generator.", self.generator_weights(nets)), **full_model_state(nets.fake_modules)}

    def load_weights(self, nets: Networks, tensors: dict[str, Tensor], with_head: bool) -> None:
        """Process 0 holds the tensors (the others pass {}) and FSDP sends each process its shards."""
        from dmdcli.train.sharding import load_full_model_state

        self.load_generator_weights(nets, part("generator.", tensors))
        if with_head:
            fake = {k: v for k, v in tensors.items() if k.startswith(("fake_score.", "discriminator."))}
            load_full_model_state(nets.fake_modules, fake)
        else:
            load_full_model_state(nets.fake_unet, part("fake_score.", tensors))

    def optimizer_states(self, nets: Networks, step) -> tuple[dict, dict]:
        from dmdcli.train.sharding import full_optimizer_state

        return (
            full_optimizer_state(nets.generator_unet, step.generator_optimizer),
            full_optimizer_state(nets.fake_modules, step.fake_optimizer),
        )

    def load_optimizer_states(self, nets: Networks, step, generator: dict, fake: dict) -> None:
        from dmdcli.train.sharding import load_full_optimizer_state

        load_full_optimizer_state(nets.generator_unet, step.generator_optimizer, generator)
        load_full_optimizer_state(nets.fake_modules, step.fake_optimizer, fake)

    @property
    def shards(self) -> int:
        return self.processes

    def autocast_copies(self, trained: int, bf16: bool) -> float:
        return 0.0  # under the bf16 policy, the weights autocast would cast come gathered in bf16

    def gathered_bytes(self, unet: nn.Module, frozen_bytes: int) -> float:
        """The root units of the network with gradients and of the one it backpropagates through,
        two blocks (one computing, one prefetched), and one unit's unsharded fp32 gradients."""
        from dmdcli.train.sharding import shard_units

        blocks = [sum(p.numel() for p in m.parameters()) for m in shard_units(unet)]
        root = sum(p.numel() for p in unet.parameters()) - sum(blocks)
        return frozen_bytes * (2 * root + 2 * max(blocks)) + 4 * max(root, max(blocks))


def layout_for(
    config, lora_targets: tuple[str, ...], sharding: ShardingOptions | None = None, processes: int = 1
) -> Layout:
    """The layout of a run: sharded when `sharding` is given (over `processes`, for the
    estimate), else by --lora-rank and --shared-base; LoRA adapters wrap `lora_targets`."""
    if sharding is not None:
        return Sharded(config, sharding, processes)
    if not config.lora_rank:
        return FullFineTune(config)
    return (SharedBaseLora if config.shared_base else ReferenceLora)(config, lora_targets)
