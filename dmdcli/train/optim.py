"""The optimizer and learning-rate schedule every trained network gets (AdamW, warm-up, decay)."""

from __future__ import annotations

import math

import torch


def adamw(params, lr: float, config) -> torch.optim.AdamW:
    """AdamW over `params`; with `config.fused_optimizer`, torch's fused kernel where it has one for the
    weights' device (the per-tensor loop it replaces was a sixth of a CPU iteration: benchmarks/results/speed)."""
    params = list(params)
    hyper = dict(lr=lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay)
    if config.fused_optimizer:
        try:
            return torch.optim.AdamW(params, fused=True, **hyper)
        except RuntimeError:  # no fused kernel for these weights' device or type: torch's default below
            pass
    return torch.optim.AdamW(params, **hyper)


def lr_factor(step: int, warmup: int, steps: int, shape: str) -> float:
    """The LR multiplier at step `step` (from 0) of `steps` (a run's iterations).

    A linear warm-up over `warmup` steps that starts at 1/warmup (diffusers' warm-up starts at
    0, which spends the first update on nothing); then `constant`, as the reference, or a
    `cosine` or `linear` decay from 1 towards 0 at the last step.
    """
    if step < warmup or shape == "constant":
        return min(1.0, (step + 1) / max(1, warmup))
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if shape == "cosine" else 1.0 - progress


def lr_scheduler(optimizer: torch.optim.Optimizer, config, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`config`'s warm-up and --lr-schedule over `steps` steps (the caller steps it once per iteration)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda n: lr_factor(n, config.warmup_steps, steps, config.lr_schedule)
    )
