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
# A key K may come with a mask K_mask [B, L] (Qwen-Image's text): 1 where a token is, 0 on padding,
# which is zeros, of any length (the network reads it masked).
Cond = dict[str, Tensor]
MASK = "_mask"


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
    """Concatenate conditionings along the batch (for one batched CFG forward). A masked one may
    differ in positions between them (a cached prompt is cut after its last token): the shorter
    are padded with masked-out zeros."""
    out = {}
    for k in conds[0]:
        parts = [c[k] for c in conds]
        if is_masked(k, conds[0]):
            parts = [pad_positions(x, max(x.shape[1] for x in parts)) for x in parts]
        out[k] = torch.cat(parts)
    return out


def expand_cond(cond: Cond, batch: int) -> Cond:
    """Repeat a batch-1 conditioning (e.g. the empty prompt) to `batch` rows."""
    return {k: v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in cond.items()}


def is_masked(key: str, cond: Cond) -> bool:
    """Whether `key` is a masked conditioning (its mask is `key` + MASK) or such a mask."""
    return f"{key}{MASK}" in cond or (key.endswith(MASK) and key.removesuffix(MASK) in cond)


def pad_positions(x: Tensor, width: int) -> Tensor:
    """`x` [B, L, ...] zero-padded along its positions to at least `width` (a mask's zeros: padding)."""
    if x.shape[1] >= width:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], width - x.shape[1], *x.shape[2:])], dim=1)


def used_positions(mask: Tensor) -> int:
    """How many leading positions of a text mask [B, L] hold a token of some row (at least 1): the
    positions after them are padding in every row, which a masked network never reads."""
    used = mask.bool().any(dim=0).nonzero()
    return int(used.max()) + 1 if len(used) else 1
