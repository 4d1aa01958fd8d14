"""The optimizer and learning-rate schedule every trained network gets (AdamW, warm-up, decay)."""

from __future__ import annotations

import math

import torch


def adamw(params, lr: float, config) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay)


def lr_factor(update: int, warmup: int, updates: int, shape: str) -> float:
    """The LR multiplier of update `update` (from 0) of an optimizer's `updates`.

    A linear warm-up over `warmup` updates that starts at 1/warmup (diffusers' warm-up starts at
    0, which spends the first update on nothing); then `constant`, as the reference, or a
    `cosine` or `linear` decay from 1 towards 0 at the last update.
    """
    if update < warmup or shape == "constant":
        return min(1.0, (update + 1) / max(1, warmup))
    progress = min(1.0, (update - warmup) / max(1, updates - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if shape == "cosine" else 1.0 - progress


def lr_scheduler(optimizer: torch.optim.Optimizer, config, updates: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`config`'s warm-up and --lr-schedule over `updates` updates of `optimizer` (stepped once per update)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda n: lr_factor(n, config.warmup_steps, updates, config.lr_schedule))
