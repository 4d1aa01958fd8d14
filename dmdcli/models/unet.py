"""Adapter: a diffusers UNet2DConditionModel (SD or SDXL layout) behind the denoiser interface."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from dmdcli.core.denoiser import Cond

# SDXL's extra conditioning, passed to the UNet as added_cond_kwargs.
ADDED_COND_KEYS = ("text_embeds", "time_ids")


class _Bottleneck(Exception):
    """Carries the mid-block output out of a UNet forward that need not go further."""

    def __init__(self, features: Tensor):
        self.features = features


class UNetDenoiser(nn.Module):
    """(x_t, t, cond) → the UNet's prediction, in float32.

    `cond` holds "encoder_hidden_states" [B, L, D] and, for SDXL, "text_embeds" [B, D2] and
    "time_ids" [B, 6]. Inputs are cast to the UNet's dtype here, at the boundary, so a bf16
    frozen teacher and an fp32 trainable copy take the same call.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def _call_unet(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        dtype = self.unet.dtype
        added = {k: cond[k].to(dtype) for k in ADDED_COND_KEYS if k in cond}
        return self.unet(
            x_t.to(dtype),
            t,
            encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
            added_cond_kwargs=added or None,
            return_dict=False,
        )[0]

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self._call_unet(x_t, t, cond).float()

    def draw_noise(self, like: Tensor, draw: Callable[[tuple[int, ...]], Tensor]) -> Tensor:
        """Fresh noise shaped like `like`, from `draw(per-image shape)`: as LCMScheduler draws it."""
        return draw(tuple(like.shape[1:]))

    @property
    def feature_module(self) -> nn.Module:
        """The module whose output `bottleneck` returns (the mid block)."""
        return self.unet.mid_block

    def bottleneck(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The mid-block output [B, C, h, w] (DMD2's classifier input).

        Read with a forward hook that stops the forward right there: the up-blocks' work would
        be thrown away (the reference forks the UNet's forward for this; a hook survives
        diffusers upgrades).
        """

        def stop(module, inputs, output):
            raise _Bottleneck(output)

        handle = self.feature_module.register_forward_hook(stop)
        try:
            self._call_unet(x_t, t, cond)
        except _Bottleneck as caught:
            return caught.features.float()
        finally:
            handle.remove()
        raise RuntimeError("the UNet's mid-block did not run")
