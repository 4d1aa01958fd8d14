"""Adapters: diffusers' flow-matching transformers (SD3Transformer2DModel, FluxTransformer2DModel;
Qwen-Image's in models/qwen_image.py) behind the denoiser interface.

They predict the flow velocity v = ε − x0 from latents [B, C, h, w] (FLUX and Qwen-Image are
handed 2×2 patches packed into tokens, made here, as their pipelines do: `PackedDenoiser`).
Their "bottleneck", for the GAN classifier head, is the image tokens after one block (by default
the middle one), put back on the latent grid [B, D, h/p, w/p], so the same conv head as a UNet's
mid-block features reads them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor, nn

from dmdcli.core.denoiser import Cond
from dmdcli.core.schedule import NoiseSchedule
from dmdcli.errors import UsageError

# Joint attention's projections, image and text streams (diffusers' Attention in every MMDiT).
ATTENTION_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# With both feed-forwards: the modules diffusers' SD3 and FLUX DreamBooth-LoRA scripts adapt.
TRANSFORMER_LORA_TARGETS = (
    *ATTENTION_LORA_TARGETS,
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)


def not_flow_matching(scheduler: dict, what: str) -> str | None:
    """Why a flow transformer (`what`) cannot be distilled with this scheduler config, or None."""
    name = scheduler.get("_class_name", "?")
    if "FlowMatch" not in name:
        return f"unsupported scheduler {name} for {what}: dmd expects its flow-matching scheduler"
    return None


def flux_image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """FLUX's position ids of the 2×2-patch tokens of an h × w latent: (0, row, column) each [h·w/4, 3]."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(device, dtype)


class _Features(Exception):
    """Carries one block's output out of a forward that need not go further."""

    def __init__(self, features: Tensor):
        self.features = features


def pack_latents(x: Tensor) -> Tensor:
    """Latents [B, C, h, w] → FLUX's tokens [B, h·w/4, 4C], one per 2×2 patch (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """`pack_latents` undone: tokens [B, h·w/4, 4C] → latents [B, C, h, w]."""
    b, _, c4 = tokens.shape
    c = c4 // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def middle_block(num_blocks: int) -> int:
    """The block whose output the GAN head reads by default: the middle one (11 of SD3-medium's 24)."""
    return (num_blocks - 1) // 2


class TransformerDenoiser(nn.Module, ABC):
    """(x_t, t, cond) → a flow transformer's velocity prediction, in float32; inputs are cast to the
    transformer's dtype here, so a bf16 frozen teacher and an fp32 trainable copy take the same call.

    gan_feature_block: the block whose image tokens `bottleneck` returns (default `middle_block`).
    """

    patch: int  # the latent side's divisor that gives the token grid

    def __init__(self, transformer: nn.Module, schedule: NoiseSchedule, gan_feature_block: int | None = None):
        super().__init__()
        self.transformer, self.schedule = transformer, schedule
        blocks = len(self.blocks)
        self.feature_block = middle_block(blocks) if gan_feature_block is None else gan_feature_block
        if not 0 <= self.feature_block < blocks:
            raise UsageError(
                f"--gan-feature-block {self.feature_block} is not one of the transformer's blocks (0 to {blocks - 1})"
            )

    @property
    def blocks(self) -> list[nn.Module]:
        """The transformer's blocks in the order they run (what each returns: `image_tokens`):
        diffusers' `transformer_blocks`, then its `single_transformer_blocks` where it has them
        (FLUX, Chroma, FLUX.2)."""
        return [*self.transformer.transformer_blocks, *getattr(self.transformer, "single_transformer_blocks", ())]

    @abstractmethod
    def _call(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The transformer's prediction [B, C, h, w], in its dtype."""

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self._call(x_t, t, cond).float()

    def draw_noise(self, like: Tensor, draw: Callable[[tuple[int, ...]], Tensor]) -> Tensor:
        """Fresh noise shaped like `like` [B, C, h, w], from `draw(per-image shape)` in the layout the
        family's diffusers pipeline draws its scheduler's noise in (so its exports reproduce dmd sample)."""
        return draw(tuple(like.shape[1:]))

    @staticmethod
    def image_tokens(block_output, count: int) -> Tensor:
        """The image tokens [B, count, D] of a block's output: a joint block's (text tokens, image
        tokens), or a single-stream block's joint sequence, text first (FLUX.2's, Chroma's)."""
        return block_output[1] if isinstance(block_output, tuple) else block_output[:, -count:]

    @property
    def feature_module(self) -> nn.Module:
        """The module whose output `bottleneck` reads (block `feature_block`)."""
        return self.blocks[self.feature_block]

    def bottleneck(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The image tokens after `feature_block`, as a grid [B, D, h/p, w/p] (float32).

        A forward hook stops the forward there (the later blocks' work would be thrown away)."""
        grid = (x_t.shape[-2] // self.patch, x_t.shape[-1] // self.patch)

        def stop(module, inputs, output):
            raise _Features(self.image_tokens(output, grid[0] * grid[1]))

        handle = self.feature_module.register_forward_hook(stop)
        try:
            self._call(x_t, t, cond)
        except _Features as caught:
            tokens = caught.features.float()  # [B, N, D], row-major over the patch grid
            return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
        finally:
            handle.remove()
        raise RuntimeError(f"the transformer's block {self.feature_block} did not run")


class SD3Denoiser(TransformerDenoiser):
    """An SD3Transformer2DModel, told T·σ as StableDiffusion3Pipeline does.

    `cond` holds "encoder_hidden_states" [B, L, D] (CLIP-L and CLIP-G penultimate states, padded
    to T5's width, then T5's states) and "pooled_projections" [B, P]."""

    @property
    def patch(self) -> int:
        return self.transformer.config.patch_size

    def _call(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        dtype = self.transformer.dtype
        return self.transformer(
            hidden_states=x_t.to(dtype),
            encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
            pooled_projections=cond["pooled_projections"].to(dtype),
            timestep=self.schedule.network_timestep(t.to(x_t.device)),
            return_dict=False,
        )[0]


class PackedDenoiser(TransformerDenoiser):
    """A transformer whose pipeline packs 2×2 latent patches into tokens itself (FLUX, Qwen-Image):
    it is called with `pack_latents(x_t)` and its output unpacked."""

    patch = 2

    def draw_noise(self, like: Tensor, draw: Callable[[tuple[int, ...]], Tensor]) -> Tensor:
        """These pipelines' schedulers draw each step's noise as packed tokens: drawn so, then unpacked."""
        c, h, w = like.shape[1:]
        return unpack_latents(draw((h * w // 4, c * 4)), h, w)


class FluxDenoiser(PackedDenoiser):
    """A FluxTransformer2DModel, as FluxPipeline calls it: latents packed into 2×2-patch tokens with
    their grid ids, the timestep σ (the model scales it by 1000 itself), and the embedded guidance.

    embedded_guidance: the guidance value a guidance-distilled teacher (FLUX.1-dev) is told; the
    generator and the fake score are told the same (they start as copies of the teacher).
    `cond` holds "encoder_hidden_states" [B, L, D] (T5) and "pooled_projections" [B, P] (CLIP)."""

    def __init__(
        self,
        transformer: nn.Module,
        schedule: NoiseSchedule,
        embedded_guidance: float = 3.5,
        gan_feature_block: int | None = None,
    ):
        super().__init__(transformer, schedule, gan_feature_block)
        self.embedded_guidance = float(embedded_guidance)

    def _call(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        dtype, (b, _, h, w) = self.transformer.dtype, x_t.shape
        tokens = pack_latents(x_t)
        img_ids = flux_image_ids(h, w, x_t.device, dtype)
        text = cond["encoder_hidden_states"]
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.embedded_guidance, device=x_t.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=tokens.to(dtype),
            encoder_hidden_states=text.to(dtype),
            pooled_projections=cond["pooled_projections"].to(dtype),
            timestep=(self.schedule.network_timestep(t.to(x_t.device)) / 1000).to(dtype),
            img_ids=img_ids,
            txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device, dtype=dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)
