"""The DMD2 loss terms as pure functions of tensors (no networks, no I/O).

Names follow the papers: x is the generator's clean output, x0_real / x0_fake the denoised
estimates of the real score (teacher) and fake score at the same noisy point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def distribution_matching_grad(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """Per-sample gradient of the KL between generator and data distributions, w.r.t. x.

    grad = (p_real − p_fake) / mean_{C,H,W}|p_real|, with p = x − x0 (DMD eq. 7 with the eq. 8
    normalization). All tensors [B, ...]; computed in float64 like the reference. A sample whose
    normalizer is 0 gets a zero gradient: the reference's nan_to_num would turn x/0 into ±1.8e308,
    which overflows to inf in float32. Returns float32 [B, ...], without grad.
    """
    x, x0_real, x0_fake = x.detach().double(), x0_real.detach().double(), x0_fake.detach().double()
    p_real = x - x0_real
    p_fake = x - x0_fake
    dims = tuple(range(1, x.ndim))
    normalizer = p_real.abs().mean(dim=dims, keepdim=True)
    grad = (p_real - p_fake) / torch.where(normalizer > 0, normalizer, 1.0)
    return torch.where(normalizer > 0, torch.nan_to_num(grad), 0.0).float()


def distribution_matching_loss(x: Tensor, grad: Tensor) -> Tensor:
    """0.5·MSE(x, stopgrad(x − grad)): a scalar whose gradient w.r.t. x is grad / x.numel().

    The target trick lets autograd carry the DM gradient through the generator without a custom
    backward.
    """
    return 0.5 * F.mse_loss(x.float(), (x.detach().float() - grad).detach(), reduction="mean")


def denoising_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """The fake score's diffusion loss: MSE between prediction and target (ε, v or x0)."""
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss softplus(−D(G(z))) averaged over the batch."""
    return F.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator loss softplus(D(fake)) + softplus(−D(real)), each averaged."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()


def pseudo_huber_loss(x: Tensor, target: Tensor) -> Tensor:
    """Pseudo-Huber distance per element, sqrt(mean((x − y)²) + c²) − c with c = 0.00054, per
    sample, averaged over the batch.

    This is Song & Dhariwal's sqrt(‖x − y‖² + c²·d) − c·sqrt(d) ("Improved Techniques for Training
    Consistency Models", §3.3; d elements per sample) divided by sqrt(d): their norm grows with
    sqrt(d) while the DM loss is a mean, so one weight λ would pull 4× harder at SD1.5's 4×64×64
    latents than at 4×16×16. Per element the ratio of the two gradients does not depend on d.
    x, target [B, ...] → scalar.
    """
    c = 0.00054
    squared = (x.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return ((squared + c * c).sqrt() - c).mean()


def mse_regression_loss(x: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over all elements (the DMD paper's ablation uses an L2 regression)."""
    return F.mse_loss(x.float(), target.float(), reduction="mean")


# Regression distances that need no network; "lpips" is built by dmdcli.train.regression.
REGRESSION_DISTANCES = {"pseudo_huber": pseudo_huber_loss, "mse": mse_regression_loss}
