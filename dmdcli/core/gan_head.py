"""The GAN classifier head that reads the fake score network's bottleneck features."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _norm(channels: int) -> nn.GroupNorm:
    groups = math.gcd(32, channels)
    return nn.GroupNorm(groups, channels)


class ClassifierHead(nn.Module):
    """Bottleneck features → one realism logit per sample.

    For image features [B, C, S, S] it is the reference head: 4×4 stride-2 convs with
    GroupNorm + SiLU down to 4×4 (three for SDXL's 32² bottleneck, one for SD1.5's 8²), a 4×4
    stride-4 conv to 1×1, then a 1×1 conv to the logit. Vector features [B, C] (toy models) get
    a two-layer MLP.

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
