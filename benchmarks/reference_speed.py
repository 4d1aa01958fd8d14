"""Seconds per iteration of the reference trainer (tianweiy/DMD2), beside `benchmarks/speed.py`'s for ours.

Issue 25 asks for our speed measured against the reference's on the same machine, teacher and configuration. This
driver imports the reference's own model (main.sd_unified_model.SDUniModel: generator, real and fake scores, the DM
and denoising losses) from a checkout you give it and runs the step sequence of its main/train_sd.py: the generator
turn (with its gradient every TTUR-th iteration), backward, clipping and AdamW, then the guidance turn and its
update; no logging, images or checkpoints. Nothing of the reference is copied here. SD-layout teachers, fp32, no
GAN, one step, plain distribution matching (its SD1.5 stage 1), on the CPU.

    python benchmarks/cpu_teacher.py runs/cpu-teacher
    pip install matplotlib imageio                  # imported by the reference's main/utils.py
    python benchmarks/reference_speed.py --reference DMD2 --teacher runs/cpu-teacher --resolution 128 --batch-size 2
    python benchmarks/speed.py --teacher runs/cpu-teacher --recipe tiny --prompts prompts.txt --steps 1 \\
        --set resolution=128 --set batch_size=2 --set fake_updates_per_gen=5

Prompts: the reference encodes its tokenized prompts with the text encoder on every iteration; both drivers use a
few fixed prompts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from types import SimpleNamespace

import torch

PROMPTS = ["a red circle", "a blue square on white", "a green triangle"]


def reference_args(teacher: str, resolution: int, guidance: float) -> SimpleNamespace:
    """The options SDUniModel and SDGuidance read, set as the reference's SD1.5 stage 1 (no GAN, t = 999)."""
    return SimpleNamespace(
        model_id=teacher,
        sdxl=False,
        use_fp16=False,
        gan_alone=False,
        cls_on_clean_image=False,
        gen_cls_loss=False,
        diffusion_gan=False,
        diffusion_gan_max_timestep=1000,
        gradient_checkpointing=False,
        min_step_percent=0.02,
        max_step_percent=0.98,
        num_train_timesteps=1000,
        real_guidance_scale=guidance,
        fake_guidance_scale=1.0,
        backward_simulation=False,
        conditioning_timestep=999,
        denoising=False,
        denoising_timestep=1000,
        num_denoising_step=1,
        initialie_generator=True,  # sic: the reference's spelling
        generator_lora=False,
        lora_rank=64,
        lora_alpha=8,
        lora_dropout=0.0,
        resolution=resolution,
        grid_size=1,
        tiny_vae=False,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="a checkout of tianweiy/DMD2 (the folder holding main/)")
    parser.add_argument("--teacher", required=True, help="an SD-layout diffusers pipeline folder")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--ttur", type=int, default=5, help="fake score updates per generator update")
    parser.add_argument("--guidance-scale", type=float, default=1.75)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--iterations", type=int, default=30, help="timed iterations (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, args.reference)

    from accelerate import Accelerator
    from main.sd_unified_model import SDUniModel
    from transformers import CLIPTokenizer

    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = SDUniModel(reference_args(args.teacher, args.resolution, args.guidance_scale), accelerator)
    tokenizer = CLIPTokenizer.from_pretrained(args.teacher, subfolder="tokenizer")

    def token_ids(prompts: list[str]) -> torch.Tensor:
        return tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids

    with torch.no_grad():
        uncond = model.text_encoder(token_ids([""]))[0].float()
    generator_params = [p for p in model.feedforward_model.parameters() if p.requires_grad]
    guidance_params = [p for p in model.guidance_model.parameters() if p.requires_grad]
    # As the reference's train_sd.py: torch's default AdamW, betas (0.9, 0.999), weight decay 0.01, clipping at 10.
    opt_g = torch.optim.AdamW(generator_params, lr=args.lr, betas=(0.9, 0.999), weight_decay=0.01)
    opt_d = torch.optim.AdamW(guidance_params, lr=args.lr, betas=(0.9, 0.999), weight_decay=0.01)
    latent = args.resolution // (2 ** (len(model.vae.config.block_out_channels) - 1))

    times = []
    for step in range(args.warmup + args.iterations):
        start = time.perf_counter()
        ids = token_ids([PROMPTS[(step * args.batch_size + i) % len(PROMPTS)] for i in range(args.batch_size)])
        noise = torch.randn(args.batch_size, 4, latent, latent)
        generator_update = step % args.ttur == 0
        common = dict(
            visual=False, denoising_dict=None, real_train_dict=None, compute_generator_gradient=generator_update
        )
        losses, logs = model(
            noise, ids, uncond.repeat(args.batch_size, 1, 1), generator_turn=True, guidance_turn=False, **common
        )
        if generator_update:
            losses["loss_dm"].backward()
            torch.nn.utils.clip_grad_norm_(generator_params, 10.0)
            opt_g.step()
            opt_g.zero_grad()
            opt_d.zero_grad()
        losses, _ = model(
            noise,
            ids,
            uncond.repeat(args.batch_size, 1, 1),
            generator_turn=False,
            guidance_turn=True,
            guidance_data_dict=logs["guidance_data_dict"],
            **common,
        )
        losses["loss_fake_mean"].backward()
        torch.nn.utils.clip_grad_norm_(guidance_params, 10.0)
        opt_d.step()
        opt_d.zero_grad()
        opt_g.zero_grad()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)

    mean = statistics.mean(times)
    print(
        f"reference (tianweiy/DMD2 SDUniModel), {args.teacher}, 1 step, batch {args.batch_size}, resolution "
        f"{args.resolution}, TTUR {args.ttur}, fp32, cpu ({torch.get_num_threads()} threads)"
    )
    print(
        f"\nseconds per iteration: median {statistics.median(times):.3f}, mean {mean:.3f} ({1 / mean:.2f} it/s) over "
        f"{len(times)} (min {min(times):.3f}, max {max(times):.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
