"""Train the built-in shapes teacher: a genuine Stable-Diffusion-layout diffusers pipeline.

    python -m dmdcli.shapes.train_teacher OUT_DIR [--seed 0] [--iterations 4000] ...

Three stages, all on the CPU with one thread and fixed seeds (the same command gives the same
weights on the same torch build):

1. **VAE** — an AutoencoderKL for 32×32 RGB with two levels (latent 4×16×16, scale factor 2),
   trained on shapes-world images by reconstruction MSE plus a small KL term (weight
   ``--kl-weight`` on the per-image KL sum, as in SD's autoencoder). The latent scaling factor is
   then set to 1 / std of the training latents, as SD did for its own VAE.
2. **Text encoder + UNet** — a 2-layer CLIP text encoder over the world's tokenizer (every
   caption word is one token; other text falls back to bytes) and a UNet2DConditionModel on the
   latents, trained *jointly* on epsilon prediction with the SD1.5 schedule (1000 steps,
   scaled_linear 0.00085 → 0.012) and min-SNR-5 loss weights (Hang et al. 2023). Joint training,
   because a random frozen encoder would hand the UNet features it must first untangle, and the
   encoder is tiny; once saved it is frozen like any teacher's. 10% of captions are replaced by
   "" so classifier-free guidance works. Exponential moving averages of both are what ships.
3. **Save** — a StableDiffusionPipeline (safety_checker None, EulerDiscreteScheduler) in
   safetensors, plus ``TRAINING.json`` with the command, seed, iterations, wall time, versions
   and losses (and the alignment at 25 steps when ``--eval-prompts`` > 0).

Training data are scenes of the world's stream ``--data-seed`` (default 1000 + seed), rendered
once; the tests and benchmarks draw their prompts from other seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dmdcli.shapes import world
from dmdcli.shapes.tokenizer import make_shapes_tokenizer

TEXT_HIDDEN = 64
MAX_TOKEN_LENGTH = 77
LATENT_CHANNELS = 4


def vae_config() -> dict:
    """AutoencoderKL: 32 px → 4×16×16 (block_out_channels (32, 64))."""
    return dict(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=LATENT_CHANNELS,
        norm_num_groups=32, sample_size=world.RESOLUTION,
        mid_block_add_attention=False,  # at 16×16 it costs more than it helps here
    )


def unet_config() -> dict:
    """UNet2DConditionModel on 4×16×16 latents: 3 levels (16, 8, 4), cross-attention at 8 and 4."""
    return dict(
        sample_size=world.RESOLUTION // 2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128), layers_per_block=1, attention_head_dim=(2, 4, 8),
        norm_num_groups=32, cross_attention_dim=TEXT_HIDDEN,
    )


def text_config(tokenizer):
    from transformers import CLIPTextConfig

    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKEN_LENGTH,
        hidden_act="quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=tokenizer.convert_tokens_to_ids(tokenizer.bos_token),
        eos_token_id=eos, pad_token_id=eos,
    )


def scheduler():
    """SD1.5's training schedule on an EulerDiscreteScheduler (accepts ``timesteps=``)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", interpolation_type="linear", timestep_spacing="leading",
        steps_offset=1, use_karras_sigmas=False,
    )


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] → float32 [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ----------------------------------------------------------------------------- stage 1: VAE


def train_vae(images: np.ndarray, args, gen: torch.Generator):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    vae.train()
    t0, losses = time.time(), []
    for step in range(args.vae_iterations):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, args.vae_iterations, args.vae_lr, 50)
        idx = torch.randint(len(images), (args.vae_batch_size,), generator=gen)
        x = _to_tensor(images[idx.numpy()])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        loss = mse + args.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(mse.item())
        if (step + 1) % 50 == 0 or step == 0:
            _log(f"vae {step + 1}/{args.vae_iterations} mse {np.mean(losses[-50:]):.5f} "
                 f"({(time.time() - t0) / (step + 1):.3f} s/it)")
    vae.eval().requires_grad_(False)
    return vae, float(np.mean(losses[-50:]))


@torch.no_grad()
def encode_all(vae, images: np.ndarray, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, float32 [N, 4, 16, 16] each."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(_to_tensor(images[i:i + batch])).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


# ----------------------------------------------------------------------------- stage 2: UNet


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)


def train_unet(latents: tuple[torch.Tensor, torch.Tensor], token_ids: torch.Tensor,
               empty_ids: torch.Tensor, args, gen: torch.Generator):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = make_shapes_tokenizer()
    unet = UNet2DConditionModel(**unet_config())
    text_encoder = CLIPTextModel(text_config(tokenizer))
    unet.train()
    text_encoder.train()
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = scheduler()
    alphas_cumprod = sched.alphas_cumprod.float()  # [1000]
    snr = alphas_cumprod / (1 - alphas_cumprod)
    weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 weights for epsilon prediction
    mean, std = latents
    n = len(mean)
    t0, losses = time.time(), []
    for step in range(args.iterations):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, args.iterations, args.lr, args.warmup)
        idx = torch.randint(n, (args.batch_size,), generator=gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * args.scaling_factor
        ids = token_ids[idx].clone()
        drop = torch.rand(args.batch_size, generator=gen) < args.caption_dropout
        ids[drop] = empty_ids
        t = torch.randint(0, 1000, (args.batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps  # DDPM forward process
        cond = text_encoder(ids)[0]
        pred = unet(x_t, t, encoder_hidden_states=cond).sample
        per = (pred - eps).pow(2).mean(dim=(1, 2, 3))
        loss = (weight[t] * per).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        losses.append(per.mean().item())
        if (step + 1) % 50 == 0 or step == 0:
            _log(f"unet {step + 1}/{args.iterations} eps-mse {np.mean(losses[-50:]):.4f} "
                 f"lr {opt.param_groups[0]['lr']:.2e} ({(time.time() - t0) / (step + 1):.3f} s/it)")
    return ema_unet, ema_text, tokenizer, float(np.mean(losses[-200:]))


# ----------------------------------------------------------------------------- stage 3: save


def build_pipeline(vae, unet, text_encoder, tokenizer):
    from diffusers import StableDiffusionPipeline

    for m in (vae, unet, text_encoder):
        m.eval().requires_grad_(False)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler(),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )


def save_pipeline(pipe, out: Path) -> None:
    from dmdcli.shapes.tokenizer import write_shapes_tokenizer_files

    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    # transformers 5 writes only tokenizer.json; keep vocab.json + merges.txt for transformers 4.
    if not (out / "tokenizer" / "vocab.json").is_file():
        write_shapes_tokenizer_files(out / "tokenizer")


def evaluate(pipe_dir: Path, n: int, seed: int, steps: int = 25, guidance: float = 4.0) -> dict:
    """Alignment of the saved teacher on ``n`` prompts of world seed ``seed``."""
    from dmdcli.shapes.features import alignment_report, sample_teacher

    captions = [world.caption(s) for s in world.scenes(seed, n)]
    images = sample_teacher(pipe_dir, captions, steps=steps, guidance_scale=guidance, seed=0)
    return alignment_report(images, captions)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dmdcli.shapes.train_teacher",
                                description="Train the shapes-world teacher (CPU, deterministic).")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=None, help="world stream of the training scenes (1000 + seed)")
    p.add_argument("--num-scenes", type=int, default=40000, help="training images rendered once")
    p.add_argument("--vae-iterations", type=int, default=800)
    p.add_argument("--vae-batch-size", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--iterations", type=int, default=2600, help="UNet + text encoder iterations")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.998)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-prompts", type=int, default=0, help="alignment check on this many prompts after saving")
    args = p.parse_args(argv)
    data_seed = 1000 + args.seed if args.data_seed is None else args.data_seed

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    out = Path(args.out_dir)

    _log(f"rendering {args.num_scenes} scenes of world seed {data_seed}")
    train_scenes = world.scenes(data_seed, args.num_scenes)
    images = world.render_array(train_scenes)
    captions = [world.caption(s) for s in train_scenes]

    vae, vae_mse = train_vae(images, args, gen)
    mean, std = encode_all(vae, images)
    args.scaling_factor = float(1.0 / mean.add(std * torch.randn(mean.shape, generator=gen)).std())
    vae.register_to_config(scaling_factor=args.scaling_factor)
    _log(f"vae done: mse {vae_mse:.5f}, scaling factor {args.scaling_factor:.4f}")

    tokenizer = make_shapes_tokenizer()
    tok = lambda texts: tokenizer(texts, padding="max_length", max_length=MAX_TOKEN_LENGTH,  # noqa: E731
                                  truncation=True, return_tensors="pt").input_ids
    token_ids, empty_ids = tok(captions), tok([""])[0]
    unet, text_encoder, tokenizer, eps_mse = train_unet((mean, std), token_ids, empty_ids, args, gen)

    pipe = build_pipeline(vae, unet, text_encoder, tokenizer)
    save_pipeline(pipe, out)
    wall = time.time() - start
    record = {
        "command": ("python -m dmdcli.shapes.train_teacher " + shlex.join(sys.argv[1:] if argv is None else argv)).strip(),
        "seed": args.seed, "data_seed": data_seed, "num_scenes": args.num_scenes,
        "vae_iterations": args.vae_iterations, "iterations": args.iterations,
        "batch_size": args.batch_size, "lr": args.lr, "threads": args.threads,
        "wall_time_s": round(wall, 1),
        "final_vae_mse": round(vae_mse, 6), "final_eps_mse": round(eps_mse, 5),
        "scaling_factor": args.scaling_factor,
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
    }
    import diffusers
    import transformers
    record.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    (out / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
    if args.eval_prompts > 0:
        try:
            record["eval"] = evaluate(out, args.eval_prompts, seed=7)
            record["eval"].update(steps=25, guidance_scale=4.0, world_seed=7)
            _log(f"alignment: {record['eval']}")
        except Exception as e:  # the weights are saved; the check is extra
            _log(f"evaluation failed: {type(e).__name__}: {e}")
        (out / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
    _log(f"saved to {out} in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
