"""Adapter: a diffusers SD3Transformer2DModel (SD3, SD3.5) behind the denoiser interface.

The transformer predicts the flow velocity v = ε − x0 from latents [B, C, h, w] and is told
the network timestep T·σ_t (NoiseSchedule.network_timestep), as StableDiffusion3Pipeline does.
Its "bottleneck", for the GAN classifier head, is the image tokens after one block (by default
the middle one), put back on the latent grid [B, D, h/p, w/p], so the same conv head as a
UNet's mid-block features reads them.
"""

from __future__ import annotations

from torch import Tensor, nn

from dmdcli.core.denoiser import Cond
from dmdcli.core.schedule import NoiseSchedule


class _Features(Exception):
    """Carries one block's output out of a forward that need not go further."""

    def __init__(self, features: Tensor):
        self.features = features


def middle_block(num_blocks: int) -> int:
    """The block whose output the GAN head reads by default: the middle one (11 of SD3-medium's 24)."""
    return (num_blocks - 1) // 2


class SD3Denoiser(nn.Module):
    """(x_t, t, cond) → the transformer's velocity prediction, in float32.

    `cond` holds "encoder_hidden_states" [B, L, D] (CLIP-L and CLIP-G penultimate states, padded
    to T5's width, then T5's states) and "pooled_projections" [B, P]. Inputs are cast to the
    transformer's dtype here, so a bf16 frozen teacher and an fp32 trainable copy take the same call.

    feature_block: the block whose image tokens `bottleneck` returns (default `middle_block`).
    """

    def __init__(self, transformer: nn.Module, schedule: NoiseSchedule, feature_block: int | None = None):
        super().__init__()
        self.transformer, self.schedule = transformer, schedule
        blocks = len(transformer.transformer_blocks)
        self.feature_block = middle_block(blocks) if feature_block is None else feature_block
        if not 0 <= self.feature_block < blocks:
            raise ValueError(f"feature block {self.feature_block} is not one of the transformer's {blocks} blocks")

    def _call(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        dtype = self.transformer.dtype
        return self.transformer(
            hidden_states=x_t.to(dtype),
            encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
            pooled_projections=cond["pooled_projections"].to(dtype),
            timestep=self.schedule.network_timestep(t.to(x_t.device)),
            return_dict=False,
        )[0]

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self._call(x_t, t, cond).float()

    @property
    def feature_module(self) -> nn.Module:
        """The module whose output `bottleneck` reads (block `feature_block`)."""
        return self.transformer.transformer_blocks[self.feature_block]

    def bottleneck(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The image tokens after `feature_block`, as a grid [B, D, h/p, w/p] (float32).

        A forward hook stops the forward there (the later blocks' work would be thrown away).
        A joint block returns (text tokens, image tokens)."""
        patch = self.transformer.config.patch_size
        grid = (x_t.shape[-2] // patch, x_t.shape[-1] // patch)

        def stop(module, inputs, output):
            raise _Features(output[1])

        handle = self.feature_module.register_forward_hook(stop)
        try:
            self._call(x_t, t, cond)
        except _Features as caught:
            tokens = caught.features.float()  # [B, N, D], row-major over the patch grid
            return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
        finally:
            handle.remove()
        raise RuntimeError(f"the transformer's block {self.feature_block} did not run")
