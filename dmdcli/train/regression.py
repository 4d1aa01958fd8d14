"""DMD v1's regression term, plumbing side: which distance runs, and the teacher's pairs.

The distances themselves are pure functions in dmdcli.core.losses; LPIPS needs the optional
`lpips` package and its pretrained backbone (torchvision VGG weights, downloaded on first use),
and compares decoded images, so only it decodes latents with the VAE (with gradient).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dmdcli.core.losses import REGRESSION_DISTANCES
from dmdcli.errors import UsageError, first_line

Distance = Callable[[Tensor, Tensor], Tensor]


def lpips_distance(vae, scaling_factor: float) -> Distance:
    """LPIPS(VGG) between the VAE decodings of two latent batches (DMD v1's choice). Raises
    ImportError / OSError / RuntimeError when lpips or its weights are not available."""
    import lpips  # optional dependency

    model = lpips.LPIPS(net="vgg", verbose=False).to(next(vae.parameters()).device).requires_grad_(False).eval()

    def distance(x: Tensor, target: Tensor) -> Tensor:
        decode = lambda z: vae.decode(z.float() / scaling_factor).sample.clamp(-1, 1)  # noqa: E731
        with torch.no_grad():
            y = decode(target)
        return model(decode(x), y).mean()  # images in [-1, 1], LPIPS' default input range

    return distance


def build_distance(name: str, vae, scaling_factor: float) -> tuple[Distance, str, str | None]:
    """(distance, the name that runs, a note for the user when "auto" fell back)."""
    if name in REGRESSION_DISTANCES:
        return REGRESSION_DISTANCES[name], name, None
    try:
        return lpips_distance(vae, scaling_factor), "lpips", None
    except Exception as e:  # not installed, no network for its weights, ...
        message = first_line(e)  # the type's name alone when the exception has no message
        reason = message if message == type(e).__name__ else f"{type(e).__name__}: {message}"
        if name == "lpips":
            raise UsageError(
                f"--regression-distance lpips needs the lpips package and its pretrained weights ({reason}); "
                "pip install lpips, or choose pseudo_huber or mse"
            ) from e
        return (
            REGRESSION_DISTANCES["pseudo_huber"],
            "pseudo_huber",
            (
                f"LPIPS unavailable ({reason}): regression uses pseudo-Huber on latents, per element; the paper's λ "
                "0.25 "
                "is LPIPS's weight, and pseudo-Huber did better at --regression-weight 2 on the shapes world "
                "(docs/other-methods.md)"
            ),
        )
