"""DMD v1's regression term, plumbing side: which distance runs, and the teacher's pairs.

The distances themselves are pure functions in dmdcli.core.losses; LPIPS needs the optional
`lpips` package and its pretrained backbone (torchvision VGG weights, downloaded on first use),
and compares decoded images, so only it decodes latents with the VAE (with gradient).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from dmdcli.core.denoiser import expand_cond
from dmdcli.core.losses import REGRESSION_DISTANCES
from dmdcli.data.pairs import Pairs
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


def load_regression(run, prompts: list[str]) -> tuple[Distance, str, Pairs]:
    """DMD v1's regression for `run` (a dmdcli.train.setup.Run with its teacher loaded): the
    distance that runs, its name, and the teacher's pairs for `prompts` (made once, cached)."""
    from dmdcli.core.sampler import ddim_sample, uses_cfg
    from dmdcli.data.pairs import default_pairs_dir, load_or_build_pairs, pair_key_inputs, teacher_identity

    config, spec, device, ui = run.config, run.spec, run.accelerator.device, run.ui
    distance, name, note = build_distance(config.regression_distance, run.teacher.vae, run.teacher.scaling_factor)
    if note:
        ui.message(note)
    teacher, schedule = run.denoiser(run.teacher.network.to(device)), run.schedule
    uncond = run.teacher.empty_cond() if uses_cfg(config.guidance_scale) else None

    def generate(noise: Tensor, batch_prompts: list[str]) -> Tensor:
        cond = run.teacher.encode_prompts(batch_prompts)
        batch_uncond = expand_cond(uncond, len(batch_prompts)) if uncond else None
        with run.accelerator.autocast():
            return ddim_sample(
                teacher, schedule, noise.to(device), cond, batch_uncond, config.pair_steps, config.guidance_scale
            )

    inputs = pair_key_inputs(
        teacher_identity(spec.source, spec.layout, spec.prediction_type, spec.scheduler_config),
        prompts,
        config.seed,
        config.pair_steps,
        config.guidance_scale,
        run.resolution,
        config.pairs,
        config.precision(),
    )
    root = Path(config.pairs_dir) if config.pairs_dir else default_pairs_dir()
    with (
        run.accelerator.main_process_first(),
        ui.task(f"regression pairs ({config.pair_steps}-step DDIM of the teacher)", total=config.pairs) as update,
    ):
        pairs = load_or_build_pairs(
            root,
            inputs,
            prompts,
            (spec.latent_channels, *run.teacher.latent_size),
            generate,
            batch_size=config.batch_size,
            progress=lambda done, total: update(done, None),
        )
    ui.message(
        f"regression: {len(pairs)} pairs {'made and cached' if pairs.built else 'reused'} in "
        f"{pairs.folder}; distance {name}, weight {config.regression_weight}"
        + (f" for the first {config.regression_iterations} iterations" if config.regression_iterations else "")
    )
    return distance, name, pairs
