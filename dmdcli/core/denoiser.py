"""The one interface the DMD2 math needs from a network: (x_t, t, conditioning) → prediction.

Teacher, fake score and generator are all denoisers of the teacher's architecture and
parameterization. SD, SDXL and the toy teachers of the tests are adapters behind this interface,
so the losses and samplers never see a UNet, a text encoder or a scheduler object.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

# Conditioning: named batch-first tensors, e.g. {"encoder_hidden_states": [B, L, D]} for SD, plus
# {"text_embeds": [B, D2], "time_ids": [B, 6]} for SDXL, {} for an unconditional toy. Keeping it
# a plain dict lets the engine batch conditional and unconditional passes without knowing the keys.
Cond = dict[str, Tensor]


@runtime_checkable
class Denoiser(Protocol):
    """A network that predicts, in the schedule's prediction type, from a noisy input.

    `__call__(x_t [B, ...], t [B] long, cond) -> prediction [B, ...]` (float32).
    `bottleneck(x_t, t, cond) -> features [B, C, h, w] or [B, C]`: the deepest features, read by
    the GAN classifier head. Only the fake score needs it.
    """

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor: ...

    def bottleneck(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor: ...


def cat_cond(*conds: Cond) -> Cond:
    """Concatenate conditionings along the batch (for one batched CFG forward)."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def expand_cond(cond: Cond, batch: int) -> Cond:
    """Repeat a batch-1 conditioning (e.g. the empty prompt) to `batch` rows."""
    return {k: v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in cond.items()}
