"""A mid-size SD-layout pipeline with random weights, for CPU speed comparisons (issue 25's configuration).

A 34M-parameter UNet2DConditionModel (SD1.5's layout at a quarter of its width: 64/128/256/256
channels, two ResNets per level, cross-attention on the three upper levels), an SD-style VAE
(factor 8: 128² images are 16² latents) and the tiny CLIP text encoder and tokenizer of
dmdcli.models.tiny. Nothing is downloaded.

    python benchmarks/cpu_teacher.py runs/cpu-teacher
    python benchmarks/speed.py --teacher runs/cpu-teacher --recipe tiny --prompts prompts.txt --steps 1 \\
        --set resolution=128 --set batch_size=2 --set fake_updates_per_gen=5
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write the pipeline into")
    args = parser.parse_args(argv)

    from diffusers import AutoencoderKL, UNet2DConditionModel

    from dmdcli.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        layers_per_block=2,
        block_out_channels=(64, 128, 256, 256),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=pipe.text_encoder.config.hidden_size,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=128,
    )
    pipe.register_modules(unet=unet, vae=vae)
    pipe.save_pretrained(args.out)
    print(f"{args.out}: UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters, 128² native")
    return 0


if __name__ == "__main__":
    sys.exit(main())
