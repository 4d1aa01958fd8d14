"""The Stable Diffusion families: SD (1.x, 2.x: one CLIP text encoder) and SDXL (two, pooled embeds, time ids).

Both are diffusers UNet2DConditionModel pipelines behind UNetDenoiser; models/teacher.py loads and
conditions either layout. They differ in their reference values (DMD2): SDXL's 1-step generator
is told t = 399 (SD1.5's: 999), and an SDXL teacher without --recipe gets the reference's SDXL
recipe, where an SD teacher's values are the code defaults.
"""

from __future__ import annotations

from typing import Any

from dmdcli.models.families import Family, register
from dmdcli.models.unet import UNetDenoiser

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"


def _unet_pipeline(index: dict[str, Any], encoders: int) -> bool:
    """Whether model_index.json describes a UNet2DConditionModel pipeline with `encoders` CLIP text encoders."""
    has = lambda key: isinstance(index.get(key), list) and index[key][0] is not None
    unet_class = index["unet"][1] if has("unet") else None
    complete = has("vae") and has("text_encoder") and has("scheduler")
    return unet_class == "UNet2DConditionModel" and complete and (2 if has("text_encoder_2") else 1) == encoders


def sdxl_recipe(steps: int, lora_rank: int | None) -> str:
    """The reference's SDXL values: CFG 8, TTUR 5, GAN 5e-3, 1024², the LR of full or LoRA training."""
    if steps == 1:
        return "sdxl-1step"
    return "sdxl-4step-lora" if lora_rank else "sdxl-4step"


SD = register(
    Family(
        name="sd",
        layout="sd",
        denoiser=UNetDenoiser,
        conditioning_timestep=999,
        recognises=lambda index: _unet_pipeline(index, encoders=1),
        aliases={
            "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "sd21": "stabilityai/stable-diffusion-2-1",
        },
    )
)
SDXL = register(
    Family(
        name="sdxl",
        layout="sdxl",
        denoiser=UNetDenoiser,
        conditioning_timestep=399,
        recognises=lambda index: _unet_pipeline(index, encoders=2),
        aliases={"sdxl": SDXL_BASE, "stabilityai/sdxl": SDXL_BASE},  # the second: what users type from our examples
        recipe=sdxl_recipe,
        title="an SDXL teacher, with the reference's values",
    )
)
