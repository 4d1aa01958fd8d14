"""DMD v1's regression term, plumbing side: which distance runs, and the teacher's pairs.

The distances themselves are pure functions in dmdcli.core.losses; LPIPS needs the optional
`lpips` package and its pretrained backbone (torchvision VGG weights, downloaded on first use),
and compares decoded images, so only it decodes latents (with gradient): with the family's tiny
autoencoder where it loads (the reference's SDXL pre-training decodes with TAESDXL), else the VAE.
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


Decode = Callable[[Tensor], Tensor]  # diffusion-space latents [B, C, h, w] → images [B, 3, H, W] in [-1, 1]


def latent_decoder(autoencoder) -> Decode:
    """Decoding with `autoencoder`'s own scaling and shift, as the diffusers pipelines do: a tiny
    autoencoder (AutoencoderTiny: scaling 1, it reads the pipeline's latents as they are), or an
    AutoencoderKL (the teacher's VAE decodes through the teacher itself: `decode_with_grad`)."""
    scale = float(autoencoder.config.scaling_factor)
    shift = float(getattr(autoencoder.config, "shift_factor", None) or 0.0)
    return lambda z: autoencoder.decode(z.float() / scale + shift).sample.clamp(-1, 1)


def load_tiny_autoencoder(source: str, device):
    """An AutoencoderTiny from a folder or hub id (safetensors only), frozen. Raises OSError /
    ValueError when it cannot be read (offline and not cached, no such folder, another class)."""
    import warnings

    from diffusers import AutoencoderTiny

    with warnings.catch_warnings():  # huggingface_hub's deprecation of an argument diffusers passes
        warnings.simplefilter("ignore", UserWarning)
        autoencoder = AutoencoderTiny.from_pretrained(source, use_safetensors=True)
    return autoencoder.to(device).requires_grad_(False).eval()


def regression_decoder(name: str, family, vae_decode: Decode, device) -> tuple[Decode, str, str | None]:
    """What LPIPS decodes with: (decode, "vae" or the tiny autoencoder's source, a note when "auto" fell
    back to the teacher's VAE, `vae_decode`).

    "auto" is the family's tiny autoencoder (TAESDXL for SDXL, as the reference's 1-step
    pre-training), which decodes a 1024² batch with gradient at a fraction of the VAE's memory;
    "vae" the teacher's own; anything else a folder or hub id of an AutoencoderTiny."""
    if name == "vae" or (name == "auto" and family.tiny_autoencoder is None):
        return vae_decode, "vae", None
    source = family.tiny_autoencoder if name == "auto" else name
    try:
        return latent_decoder(load_tiny_autoencoder(source, device)), source, None
    except Exception as e:  # offline and not cached, not an AutoencoderTiny, ...
        if name != "auto":
            raise UsageError(f"--regression-decoder {name}: not a readable AutoencoderTiny ({_reason(e)})") from e
        note = f"tiny autoencoder {source} unavailable ({_reason(e)}): LPIPS decodes with the teacher's VAE"
        return vae_decode, "vae", note


def _reason(e: Exception) -> str:
    message = first_line(e)  # the type's name alone when the exception has no message
    return message if message == type(e).__name__ else f"{type(e).__name__}: {message}"


def lpips_model():
    """LPIPS(VGG), DMD v1's choice. Raises ImportError / OSError / RuntimeError when lpips or its
    weights are not available."""
    import lpips  # optional dependency

    return lpips.LPIPS(net="vgg", verbose=False).requires_grad_(False).eval()


def lpips_distance(model, decode: Decode) -> Distance:
    """LPIPS `model` (on the decoder's device) between the decodings of two latent batches."""

    def distance(x: Tensor, target: Tensor) -> Tensor:
        with torch.no_grad():
            y = decode(target)
        return model(decode(x), y).mean()  # images in [-1, 1], LPIPS' default input range

    return distance


def build_distance(name: str, decoder: Callable[[], tuple[Decode, str, str | None]], device="cpu"):
    """(distance, the name that runs, notes for the user). `decoder` is called only when LPIPS runs
    (regression_decoder's result, decoding on `device`, where LPIPS is put): mse and pseudo_huber
    compare latents. LPIPS is named with what
    decodes for it: "lpips (vae)", "lpips (madebyollin/taesdxl)"."""
    if name in REGRESSION_DISTANCES:
        return REGRESSION_DISTANCES[name], name, []
    try:
        model = lpips_model().to(device)
    except Exception as e:  # not installed, no network for its weights, ...
        if name == "lpips":
            raise UsageError(
                f"--regression-distance lpips needs the lpips package and its pretrained weights ({_reason(e)}); "
                "pip install lpips, or choose pseudo_huber or mse"
            ) from e
        return (
            REGRESSION_DISTANCES["pseudo_huber"],
            "pseudo_huber",
            [
                f"LPIPS unavailable ({_reason(e)}): regression uses pseudo-Huber on latents, per element; the "
                "paper's λ 0.25 is LPIPS's weight, and pseudo-Huber did better at --regression-weight 2 on the "
                "shapes world (docs/other-methods.md)"
            ],
        )
    decode, what, note = decoder()
    return lpips_distance(model, decode), f"lpips ({what})", [note] if note else []


def load_regression(run, prompts: list[str]) -> tuple[Distance, str, Pairs]:
    """DMD v1's regression for `run` (a dmdcli.train.setup.Run with its teacher loaded): the
    distance that runs, its name, and the teacher's pairs for `prompts` (made once, cached)."""
    from dmdcli.core.sampler import ddim_sample, uses_cfg
    from dmdcli.data.pairs import default_pairs_dir, load_or_build_pairs, pair_key_inputs, teacher_identity

    config, spec, device, ui = run.config, run.spec, run.accelerator.device, run.ui
    distance, name, notes = build_distance(
        config.regression_distance,
        lambda: regression_decoder(config.regression_decoder, run.family, run.teacher.decode_with_grad, device),
        device,
    )
    for note in notes:
        ui.message(note)
    network = run.teacher.network.to(device)
    teacher, schedule = run.denoiser(network), run.schedule
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
        str(next(network.parameters()).dtype).removeprefix("torch."),
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
