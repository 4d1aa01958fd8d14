"""Progressive distillation (Salimans & Ho, arXiv 2202.00512, Algorithm 2) as pure functions.

A student with N/2 steps learns to do in one DDIM step t → t'' what its N-step teacher does in
two, t → t' → t''. Notation of the paper: z_t = α_t·x + σ_t·ε, α_t² + σ_t² = 1; t'' = −1 is the
clean end of the trajectory (α = 1, σ = 0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dmdcli.core.schedule import NoiseSchedule

X0Fn = Callable[[Tensor, Tensor], Tensor]  # (z_t [B, ...], t [B]) → x0 estimate [B, ...] float32
LOSS_WEIGHTS = ("truncated_snr", "snr_plus_one")
PARAMETERIZATIONS = {"x": "sample", "v": "v_prediction", "epsilon": "epsilon"}  # → NoiseSchedule prediction types


def distillation_target(
    z_t: Tensor, z_t2: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_t2: Tensor, sigma_t2: Tensor
) -> Tensor:
    """The x̃ for which one DDIM step t → t'' from z_t lands on the teacher's z_t'' (Algorithm 2):

        x̃ = (z_t'' − (σ_t''/σ_t)·z_t) / (α_t'' − (σ_t''/σ_t)·α_t)

    All tensors broadcast against z_t [B, ...]; computed in float64, returned float32.
    """
    ratio = sigma_t2.double() / sigma_t.double()
    return ((z_t2.double() - ratio * z_t.double()) / (alpha_t2.double() - ratio * alpha_t.double())).float()


@torch.no_grad()
def teacher_two_steps(
    teacher_x0: X0Fn, schedule: NoiseSchedule, z_t: Tensor, t: Tensor, t1: Tensor, t2: Tensor
) -> Tensor:
    """z_t'' after two deterministic DDIM steps of the teacher, t → t' → t'' (t'' may be −1)."""
    z_t1 = schedule.ddim_step(z_t, teacher_x0(z_t, t), t, t1)
    return schedule.ddim_step(z_t1, teacher_x0(z_t1, t1), t1, t2)


def loss_weight(schedule: NoiseSchedule, t: Tensor, kind: str) -> Tensor:
    """Per-sample weight on ‖x̃ − x̂‖² (paper §4): "truncated_snr" max(SNR, 1), i.e. the larger
    of the x- and ε-losses; "snr_plus_one" 1 + SNR, i.e. the v-loss. [B] float32."""
    snr = schedule.snr(t)
    if kind == "truncated_snr":
        return snr.clamp(min=1.0).float()
    if kind == "snr_plus_one":
        return (1.0 + snr).float()
    raise ValueError(f"unknown loss weight {kind!r}; expected one of {LOSS_WEIGHTS}")


def progressive_loss(x_student: Tensor, x_target: Tensor, weight: Tensor) -> Tensor:
    """Weighted MSE: mean over the batch of w(t)·mean‖x̃ − x̂‖² (x [B, ...], weight [B]) → scalar."""
    per_sample = (x_student.float() - x_target.detach().float()).pow(2).flatten(1).mean(dim=1)
    return (weight.to(per_sample) * per_sample).mean()


def student_step_pair(teacher_timesteps: list[int], k: int) -> tuple[int, int, int]:
    """(t, t', t'') of student step k over a teacher ladder of 2·N/2 timesteps; t'' = −1 at the end."""
    t, t1 = teacher_timesteps[2 * k], teacher_timesteps[2 * k + 1]
    t2 = teacher_timesteps[2 * k + 2] if 2 * k + 2 < len(teacher_timesteps) else -1
    return t, t1, t2
