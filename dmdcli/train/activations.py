"""How the memory estimate measures activations: one training forward of a network built on the
meta device (shapes, no storage), under a saved-tensors hook that adds up what autograd keeps for
backward, with autocast's dtypes and a fused attention kernel's saves (`saved_activations`).

Meta tensors are skipped by torch.autocast and would take the math attention path, so both are
stood in for here (`_AutocastRules`, `_FusedAttention`); dmdcli.train.memory adds the results up
into the estimate of a run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from dmdcli.models.families import get_family
from dmdcli.models.teacher import TeacherSpec, _load_json_config


def meta_network(spec: TeacherSpec) -> nn.Module:
    """The teacher's denoising network (its family's class) on the meta device."""
    import diffusers

    network_class = getattr(diffusers, get_family(spec.family).teacher.network_class)
    with torch.device("meta"):
        return network_class.from_config(_load_json_config(spec.source, spec.network, "config.json"))


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel keeps for backward: q, k, v, the output and a float32 logsumexp
    per query. On CUDA (flash / memory-efficient) and on the CPU (flash) `scaled_dot_product_attention`
    runs one; on meta it would take the math path and keep the N×N attention matrices (at SDXL
    1024² those alone are 22 GiB without checkpointing, measured on an H200 with the math path forced)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out


class _AutocastRules(TorchFunctionMode):
    """torch.autocast's dtype rules for the ops of a UNet, on meta tensors (which autocast itself
    skips: it acts on CPU and CUDA tensors only). Matrix products and convolutions run in the
    low-precision dtype; on CUDA, group and layer norm run in float32 (so a bf16 run keeps float32
    copies of their inputs and of the SiLU that follows). Casts of parameters are reported to
    `weight_cast`: they are counted apart, as the weights autocast keeps for the backward."""

    LOWER = (F.linear, F.conv2d, torch.matmul, torch.bmm, torch.baddbmm, torch.mm, torch.addmm)
    FLOAT32 = {"cuda": (F.group_norm, F.layer_norm, F.softmax, torch.softmax), "cpu": ()}

    def __init__(self, dtype: torch.dtype | None, device_type: str, weight_cast):
        super().__init__()
        self.dtype, self.float32, self.weight_cast = dtype, self.FLOAT32[device_type], weight_cast

    def _cast(self, value, dtype):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
            cast = value.to(dtype)
            if isinstance(value, nn.Parameter):
                self.weight_cast(cast)
            return cast
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            qkv = [*args[:3], *(kwargs[k] for k in ("query", "key", "value")[len(args[:3]) :])]  # FLUX: by name
            q, k, v = (self._cast(t, self.dtype) if self.dtype else t for t in qkv)
            return _FusedAttention.apply(q, k, v)
        target = self.dtype if func in self.LOWER else torch.float32 if func in self.float32 else None
        if self.dtype is None or target is None:
            return func(*args, **kwargs)
        return func(*(self._cast(a, target) for a in args), **{k: self._cast(v, target) for k, v in kwargs.items()})


def training_network(
    spec: TeacherSpec, frozen: torch.dtype, adapter: tuple[int, float, str] | None, targets: tuple[str, ...]
) -> nn.Module:
    """A meta network as a run trains it: a LoRA adapter (rank, alpha, name) on `targets` in fp32 on
    frozen weights in `frozen`, or every weight trainable in fp32."""
    from dmdcli.models.lora import add_generator_lora

    with torch.device("meta"):
        unet = meta_network(spec)
        if adapter is None:
            return unet.requires_grad_(True).train()
        unet.to(frozen)
        rank, alpha, name = adapter
        add_generator_lora(unet, rank, alpha, targets, adapter_name=name)
    return unet.train()


def meta_inputs(network: nn.Module, spec: TeacherSpec, resolution: int, dtype: torch.dtype):
    """One sample's latents and prompt conditioning, on the meta device."""
    side = resolution // spec.vae_scale_factor
    x = torch.empty(1, spec.latent_channels, side, side, device="meta", dtype=dtype)
    shapes = get_family(spec.family).teacher.conditioning_shapes(network.config, spec)
    return x, {k: torch.empty(1, *shape, device="meta", dtype=dtype) for k, shape in shapes.items()}


def saved_activations(
    unet: nn.Module,
    spec: TeacherSpec,
    resolution: int,
    low_precision: torch.dtype | None,
    device_type: str,
    checkpointing: bool,
    denoiser_options: dict | None = None,
) -> tuple[float, float]:
    """Bytes autograd keeps for one sample's training forward of `unet` (any family's network):
    (the whole network, the part up to its bottleneck, which the classifier runs: a UNet's down
    and mid blocks).

    Counted per storage (a linear layer saves its weight as a transposed view, which is not an
    activation), with attention as a fused kernel keeps it and autocast's dtypes
    (`low_precision`, None for fp32). With gradient checkpointing, diffusers hands each unit it
    checkpoints (ResNet and transformer blocks) to a function we give it: what stays is what runs
    outside the units, each unit's inputs, and one unit's activations while it is recomputed in
    backward (the largest).
    """
    excluded = {t.untyped_storage()._cdata for t in [*unet.parameters(), *unet.buffers()]}
    kept: dict[int, tuple[int, bool]] = {}  # storage -> (bytes, in the down / mid blocks)
    units: list[tuple[dict[int, tuple[int, bool]], bool]] = []
    state = {"unit": None, "down": True}
    alive = []  # meta tensors cost nothing; holding them keeps their storages' ids unique

    def note(t: torch.Tensor, into: dict) -> None:
        storage = t.untyped_storage()
        if storage._cdata not in excluded:
            into.setdefault(storage._cdata, (storage.nbytes(), state["down"]))
            alive.append(t)

    def pack(t: torch.Tensor) -> torch.Tensor:
        note(t, kept if state["unit"] is None else state["unit"])
        return t

    def checkpointed(unit, *args, **kwargs):  # stands in for torch.utils.checkpoint
        for a in [*args, *kwargs.values()]:
            if isinstance(a, torch.Tensor):
                note(a, kept)
        outer, state["unit"] = state["unit"], {}
        try:
            return unit(*args, **kwargs)
        finally:
            units.append((state["unit"], state["down"]))
            state["unit"] = outer

    if checkpointing:
        unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpointed)
    # called as a run calls it (denoiser_options: the run's, e.g. the GAN's feature block)
    denoiser = get_family(spec.family).denoiser(unet, spec.schedule(resolution), **(denoiser_options or {}))
    # What runs after the bottleneck's module is not part of the classifier's pass.
    handle = denoiser.feature_module.register_forward_hook(lambda *a: state.update(down=False))
    x, cond = meta_inputs(unet, spec, resolution, low_precision or torch.float32)

    def weight_cast(t: torch.Tensor) -> None:
        excluded.add(t.untyped_storage()._cdata)
        alive.append(t)  # a bias's cast is not saved: freed, its storage's id would come back for an activation

    try:
        with (
            _AutocastRules(low_precision, device_type, weight_cast),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            denoiser(x, torch.zeros(1, dtype=torch.long, device="meta"), cond)
    finally:
        handle.remove()

    def total(down_only: bool) -> float:
        held = sum(b for b, d in kept.values() if d or not down_only)
        recomputed = [
            sum(b for key, (b, _) in saves.items() if key not in kept) for saves, d in units if d or not down_only
        ]
        return float(held + max(recomputed, default=0))

    return total(False), total(True)
