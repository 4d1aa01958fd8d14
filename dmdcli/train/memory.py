"""Peak-memory estimate of a distillation run, from config files alone (`dmd distill --dry-run`).

Every network is built on the meta device (shapes, no storage), so nothing is downloaded beyond
config files and nothing heavy is allocated. Activations are measured, not guessed: one training
forward of the UNet runs on meta tensors under a saved-tensors hook that adds up what autograd
keeps for backward (with gradient checkpointing this is automatically only the block inputs,
plus one block recomputed during backward).

The peak is that of the heavier of the two phases of an iteration:
  generator phase: generator forward with grad (A) + the GAN loss through the fake score's down
                   and mid blocks (A_down), and the generator's gradients;
  fake score phase: fake score forward with grad (A) + two classifier passes (2·A_down), and
                   the fake score's (and head's) gradients;
on top of what persists: weights of all networks, AdamW moments (2 × fp32), the VAE, and the text
encoders unless the prompts are cached (`cache_prompts`, the default): then the encoders are on the
accelerator only at start-up, before the networks are built, and are listed apart, outside the peak.

Sharded over N processes (`--fsdp`), each process keeps 1/N of the networks' weights, moments and
gradients, and gathers whole units while they run: a UNet's root unit (everything outside its
ResNet and transformer blocks) for the whole forward, two blocks at a time (one computing, one
prefetched), in bf16 under mixed precision; plus one unit's unsharded gradients in backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dmdcli.data.prompt_cache import GIB
from dmdcli.models.teacher import TeacherSpec, _load_json_config


@dataclass
class MemoryEstimate:
    parameters: dict[str, float]  # GiB of weights per network
    optimizer_states: float
    gradients: float
    activations_per_sample: float
    activations: float
    peak: float
    phase: str  # which phase sets the peak
    startup_only: dict[str, float] = field(default_factory=dict)  # GiB freed before training (not in the peak)
    processes: int = 1  # the networks are sharded over this many processes (FSDP)
    gathered: float = 0.0  # FSDP: whole units gathered while they run (in the peak phase)

    def rows(self) -> list[tuple[str, float]]:
        return [
            *((f"weights: {name}", gib) for name, gib in self.parameters.items()),
            *((f"start-up only: {name}", gib) for name, gib in self.startup_only.items()),
            ("AdamW moments (fp32)", self.optimizer_states),
            ("gradients (peak phase)", self.gradients),
            ("activations per sample", self.activations_per_sample),
            ("activations (batch, peak phase)", self.activations),
            *((("gathered units (FSDP)", self.gathered),) if self.processes > 1 else ()),
            (f"estimated peak ({self.phase} phase)", self.peak),
        ]


def _meta_unet(spec: TeacherSpec) -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(_load_json_config(spec.source, "unet", "config.json"))


def _count(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _text_and_vae_parameters(spec: TeacherSpec) -> tuple[int, int]:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    folders = ["text_encoder", "text_encoder_2"] if spec.layout == "sdxl" else ["text_encoder"]
    with torch.device("meta"):
        text = sum(_count(CLIPTextModel(CLIPTextConfig.from_dict(_load_json_config(spec.source, f, "config.json")))) for f in folders)
        vae = _count(AutoencoderKL.from_config(_load_json_config(spec.source, "vae", "config.json")))
    return text, vae


def _saved_activations(unet: nn.Module, spec: TeacherSpec, resolution: int, dtype: torch.dtype, checkpointing: bool) -> tuple[float, float]:
    """Bytes autograd keeps for one sample's training forward: (whole UNet, down + mid blocks).

    Runs with every weight trainable and in the compute dtype; weights themselves are not
    counted (they are already), only the activations saved for backward.
    """
    unet.to(dtype).requires_grad_(True).train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    weights = {id(p) for p in unet.parameters()}
    saved: dict[int, tuple[int, bool]] = {}
    in_down = {"on": True}
    handles = [unet.up_blocks[0].register_forward_pre_hook(lambda *a: in_down.update(on=False))]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in weights:
            saved.setdefault(id(t), (t.numel() * t.element_size(), in_down["on"]))
        return t

    side = resolution // spec.vae_scale_factor
    meta = dict(device="meta", dtype=dtype)
    x = torch.randn(1, spec.latent_channels, side, side, requires_grad=True, **meta)
    cond = torch.randn(1, 77, unet.config.cross_attention_dim, **meta)
    added = None
    if spec.layout == "sdxl":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, pooled, **meta), "time_ids": torch.randn(1, 6, **meta)}
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet(x, torch.zeros(1, dtype=torch.long, device="meta"), cond, added_cond_kwargs=added)
    finally:
        for h in handles:
            h.remove()
    total = sum(b for b, _ in saved.values())
    down = sum(b for b, d in saved.values() if d)
    return float(total), float(down)


def estimate_memory(spec: TeacherSpec, config, resolution: int, bf16: bool, processes: int = 1) -> MemoryEstimate:
    """Estimated peak memory of `dmd distill` with this configuration, per process (GiB), with
    the networks sharded over `processes` when config.fsdp."""
    from dmdcli.core.gan_head import ClassifierHead
    from dmdcli.models.lora import FAKE_SCORE_ADAPTER, GENERATOR_ADAPTER

    frozen = 2 if bf16 else 4  # frozen weights in bf16 under mixed precision
    compute = torch.bfloat16 if bf16 else torch.float32
    unet = _meta_unet(spec)
    p_unet = _count(unet)
    p_text, p_vae = _text_and_vae_parameters(spec)

    lora, shared = config.lora_rank > 0, config.lora_rank > 0 and config.shared_base
    alpha = config.lora_alpha_value()
    with torch.device("meta"):
        p_gen = _adapter_parameters(unet, config.lora_rank, alpha, GENERATOR_ADAPTER) if lora else p_unet
        p_fake = _adapter_parameters(unet, config.fake_adapter_rank(), alpha, FAKE_SCORE_ADAPTER) if shared else p_unet
        p_head = 0
        if config.data:
            down = 2 ** (len(unet.config.block_out_channels) - 1)
            side = resolution // spec.vae_scale_factor // down
            p_head = _count(ClassifierHead(unet.config.block_out_channels[-1], side))

    n = processes if config.fsdp else 1
    weights = {
        "teacher UNet (frozen)": p_unet * frozen / n,
        "generator": (4 * p_gen + (4 * p_unet if lora and not shared else 0)) / n,  # + its own fp32 base copy
        "fake score + classifier": 4 * (p_fake + p_head) / n,
        "VAE (fp32)": p_vae * 4,
    }
    if not config.cache_prompts:  # else they leave the accelerator before the networks are built
        weights["text encoders (fp32)"] = p_text * 4
    adam = 8 * (p_gen + p_fake + p_head) / n
    if n > 1:
        from dmdcli.train.sharding import shard_units

        blocks = [_count(m) for m in shard_units(unet)]
        root = p_unet - sum(blocks)
        # Gathered while running: the root units of the network with gradients and of the one it
        # backpropagates through, two blocks, and one unit's unsharded fp32 gradients.
        transient = frozen * (2 * root + 2 * max(blocks)) + 4 * max(root, max(blocks))
        cast_gen = cast_fake = 0  # under the bf16 policy, the weights autocast would cast come gathered in bf16
    else:
        transient = 0
        # Autocast keeps a bf16 copy of each trainable fp32 weight it casts, for the backward.
        cast_gen, cast_fake = (2 * p_gen, 2 * p_fake) if bf16 else (0, 0)
    act, act_down = _saved_activations(unet, spec, resolution, compute, config.gradient_checkpointing)
    b = config.batch_size
    generator_phase = 4 * p_gen / n + b * (act + act_down) + cast_gen + transient
    fake_phase = 4 * (p_fake + p_head) / n + b * (act + 2 * act_down) + cast_fake + transient
    phase = "generator" if generator_phase > fake_phase else "fake score"
    top = max(generator_phase, fake_phase)
    grads = (4 * p_gen if phase == "generator" else 4 * (p_fake + p_head)) / n
    static = sum(weights.values()) + adam
    return MemoryEstimate(
        parameters={k: v / GIB for k, v in weights.items()},
        optimizer_states=adam / GIB,
        gradients=grads / GIB,
        activations_per_sample=act / GIB,
        activations=(top - grads - transient) / GIB,
        peak=(static + top) / GIB,
        phase=phase,
        startup_only={"text encoders (fp32, dropped once prompts are cached)": p_text * 4 / GIB} if config.cache_prompts else {},
        processes=n,
        gathered=transient / GIB,
    )


def _adapter_parameters(unet: nn.Module, rank: int, alpha: float, adapter_name: str) -> int:
    """Parameters of one LoRA adapter on (a weight-sharing meta copy of) `unet`."""
    from dmdcli.models.lora import add_generator_lora, share_weights

    return sum(p.numel() for p in add_generator_lora(share_weights(unet), rank, alpha, adapter_name=adapter_name))
