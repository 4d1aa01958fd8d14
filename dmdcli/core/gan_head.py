"""The GAN classifier head that reads the fake score network's bottleneck features."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _norm(channels: int) -> nn.GroupNorm:
    groups = math.gcd(32, channels)
    return nn.GroupNorm(groups, channels)


# The widest head: the reference's SDXL head reads 1280 channels. Wider features (the image tokens
# of SD3.5-large, 2432, and FLUX, 3072) are first projected to it by a 1×1 conv: the 4×4 convs'
# weights grow with C², and at C = 3072 over a 64² patch grid the head alone would be 0.75B
# parameters (12 GiB with AdamW's moments) against 0.13B projected.
MAX_HEAD_CHANNELS = 1280


class ClassifierHead(nn.Module):
    """Bottleneck features → one realism logit per sample.

    For image features [B, C, S, S] it is the reference head: 4×4 stride-2 convs with
    GroupNorm + SiLU down to 4×4 (three for SDXL's 32² bottleneck, one for SD1.5's 8²), a 4×4
    stride-4 conv to 1×1, then a 1×1 conv to the logit; features wider than MAX_HEAD_CHANNELS
    are projected to it first (a 1×1 conv). Vector features [B, C] (toy models) get a two-layer MLP.

    Args:
        channels: C of the bottleneck.
        size: S, the bottleneck's spatial size, or None for vector features.
    """

    def __init__(self, channels: int, size: int | None):
        super().__init__()
        if size is None:
            self.net = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, 1))
            return
        layers: list[nn.Module] = []
        if channels > MAX_HEAD_CHANNELS:
            layers += [nn.Conv2d(channels, MAX_HEAD_CHANNELS, 1)]
            channels = MAX_HEAD_CHANNELS
        while size > 4:
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), _norm(channels), nn.SiLU()]
            size //= 2
        if size == 4:
            layers += [nn.Conv2d(channels, channels, 4, stride=4), _norm(channels), nn.SiLU()]
        else:  # bottlenecks smaller than 4×4 (tiny test models): pool instead
            layers += [nn.AdaptiveAvgPool2d(1)]
        layers += [nn.Conv2d(channels, 1, 1)]
        self.net = nn.Sequential(*layers)

    @classmethod
    def for_features(cls, features: Tensor) -> "ClassifierHead":
        """A head sized for bottleneck features of this shape ([B, C, S, S] or [B, C])."""
        if features.ndim == 4:
            return cls(features.shape[1], features.shape[-1])
        return cls(features.shape[1], None)

    def forward(self, features: Tensor) -> Tensor:
        """features [B, C, S, S] or [B, C] → logits [B], in float32 even under autocast (as the
        reference, which runs only the UNet trunk in bf16)."""
        with torch.autocast(features.device.type, enabled=False):
            return self.net(features.float()).flatten(1).squeeze(1)
