"""Train the built-in shapes teacher: a genuine Stable-Diffusion-layout diffusers pipeline.

    python -m dmdcli.shapes.train_teacher OUT_DIR [--iterations 12000] [--eval-prompts 256] ...

All on the CPU with one thread and fixed seeds: the same command gives the same weights on the
same torch build, and a run that is stopped (Ctrl-C, kill) resumes where its last checkpoint
left off when started again with the same arguments. Training state lives in ``--state``
(default ``OUT_DIR.state``); ``OUT_DIR`` is only written at the end.

1. **VAE** — an AutoencoderKL for 32×32 RGB with two levels (latent 4×16×16, scale factor 2),
   trained by reconstruction MSE plus a small KL term (as SD's autoencoder). The latent scaling
   factor is 1 / std of the training latents, as SD set its own.
2. **Text encoder** — a 2-layer CLIP text encoder over the world's tokenizer (one token per
   caption word, 32 positions), first trained alone to read the scene from its caption (a
   linear head on the pooled output predicts the 13 scene labels). This stands in for the
   pretraining a real teacher's CLIP text tower has: a random encoder hands the UNet features it
   must first untangle, and the diffusion loss alone teaches it to bind "red" to "top left"
   slowly.
3. **UNet** — a UNet2DConditionModel with cross-attention at every level, trained jointly with
   the text encoder on epsilon prediction with SD1.5's schedule (1000 steps, scaled_linear
   0.00085 → 0.012) and min-SNR-5 weights (Hang et al. 2023); 10% of captions are "" so
   classifier-free guidance works, and the noise has an offset (a per-channel constant, std
   ``--offset-noise``) so the background follows the caption. Constant learning rate after a warm-up, so a run can be
   extended by raising ``--iterations``; exponential moving averages are what ships.
4. **Save** — a StableDiffusionPipeline (safety_checker None, EulerDiscreteScheduler) in
   safetensors, plus ``TRAINING.json`` (command, seeds, iterations, wall time, versions, losses,
   and the alignment at 25 steps when ``--eval-prompts`` > 0).

Training scenes come from world stream ``--data-seed`` (default 1000 + seed), rendered once;
tests and benchmarks draw their prompts from other seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dmdcli.shapes import world
from dmdcli.shapes.tokenizer import MAX_TOKEN_LENGTH, make_shapes_tokenizer
from dmdcli.shapes.training import (
    Stage,
    add_common_arguments,
    check_args,
    ema_decay,
    ema_update,
    encode_all,
    log,
    parse,
    progress,
    save_pipeline,
    start,
    to_tensor,
    warmup_lr,
    write_record,
)

TEXT_HIDDEN = 64
LATENT_CHANNELS = 4
# Arguments that change what is trained: a resumed run must agree on all of them (the saved VAE
# only on the first ones).
_VAE_ARGS = ("seed", "data_seed", "num_scenes", "vae_iterations", "vae_batch_size", "vae_lr", "kl_weight")
_STATE_ARGS = _VAE_ARGS + (
    "text_iterations",
    "batch_size",
    "lr",
    "warmup",
    "ema_decay",
    "caption_dropout",
    "offset_noise",
)


def vae_config() -> dict:
    """AutoencoderKL: 32 px → 4×16×16 (block_out_channels (32, 64))."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=32,
        sample_size=world.RESOLUTION,
        mid_block_add_attention=False,  # at 16×16 it costs more than it helps here
    )


def unet_config() -> dict:
    """UNet2DConditionModel on 4×16×16 latents: 3 levels (16, 8, 4), cross-attention at each.

    Attention at 16×16 too, so every latent cell can look up the words about its quadrant.
    """
    return dict(
        sample_size=world.RESOLUTION // 2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        attention_head_dim=(2, 4, 8),
        norm_num_groups=32,
        cross_attention_dim=TEXT_HIDDEN,
    )


def text_config(tokenizer):
    from transformers import CLIPTextConfig

    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKEN_LENGTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.convert_tokens_to_ids(tokenizer.bos_token),
        eos_token_id=eos,
        pad_token_id=eos,
    )


def scheduler():
    """SD1.5's training schedule on an EulerDiscreteScheduler (accepts ``timesteps=``)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        timestep_spacing="leading",
        steps_offset=1,
        use_karras_sigmas=False,
    )


# ----------------------------------------------------------------------------- stage 1: VAE


def train_vae(images: np.ndarray, args, gen: torch.Generator):
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)  # the initial weights
    vae = AutoencoderKL(**vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    vae.train()
    t0, losses = time.time(), []
    for step in range(args.vae_iterations):
        # Warm-up, then cosine decay: the VAE stage has a fixed length.
        lr = warmup_lr(step, args.vae_lr, 100) * 0.5 * (1 + np.cos(np.pi * step / args.vae_iterations))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(images), (args.vae_batch_size,), generator=gen)
        x = to_tensor(images[idx.numpy()])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        mse = F.mse_loss(vae.decode(z).sample, x)
        loss = mse + args.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(mse.item())
        progress("vae", step, args.vae_iterations, t0, 0, mse=np.mean(losses[-100:]))
    vae.eval().requires_grad_(False)
    return vae, float(np.mean(losses[-100:]))


def load_or_train_vae(images: np.ndarray, args, state: Path):
    """The stage-1 VAE (and its record) from ``state/vae`` if a run with the same arguments saved it, else trained."""
    from diffusers import AutoencoderKL

    folder, record = state / "vae", state / "vae.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        check_args({k: saved["args"].get(k) for k in _VAE_ARGS}, args, record)
        log(f"vae: reusing {folder}")
        return AutoencoderKL.from_pretrained(folder).eval().requires_grad_(False), saved
    gen, t0 = torch.Generator().manual_seed(args.seed), time.time()
    vae, mse = train_vae(images, args, gen)
    mean, std = encode_all(vae, images)
    scaling = float(1.0 / mean.add(std * torch.randn(mean.shape, generator=gen)).std())
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(folder, safe_serialization=True)
    record.write_text(
        json.dumps(
            {
                "args": {k: getattr(args, k) for k in _VAE_ARGS},
                "final_mse": mse,
                "threads": args.threads,
                "wall_time_s": round(time.time() - t0, 1),
            },
            indent=2,
        )
        + "\n"
    )
    log(f"vae done: mse {mse:.5f}, scaling factor {scaling:.4f}")
    return vae, json.loads(record.read_text())


# ----------------------------------------------------------------------------- stage 2: text encoder


def pretrain_text_encoder(
    text_encoder, token_ids: torch.Tensor, labels: torch.Tensor, args, gen: torch.Generator
) -> float:
    """Teach the encoder to parse captions: pooled output → the 13 scene labels (cross-entropy)."""
    from dmdcli.shapes.features import HEAD_SIZES, attribute_loss

    head = torch.nn.Linear(TEXT_HIDDEN, sum(HEAD_SIZES))
    params = list(text_encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    t0, losses = time.time(), []
    for step in range(args.text_iterations):
        idx = torch.randint(len(token_ids), (256,), generator=gen)
        loss = attribute_loss(head(text_encoder(token_ids[idx]).pooler_output), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        progress("text", step, args.text_iterations, t0, 0, loss=np.mean(losses[-100:]))
    return float(np.mean(losses[-100:]))


# ----------------------------------------------------------------------------- stage 3: UNet


class Trainer(Stage):
    """The UNet + text encoder stage."""

    state_args = _STATE_ARGS

    def __init__(self, args, state: Path) -> None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        super().__init__(args, state, seed=args.seed + 1)
        self.tokenizer = make_shapes_tokenizer()
        torch.manual_seed(args.seed)  # the initial weights
        self.unet = UNet2DConditionModel(**unet_config()).train()
        self.text_encoder = CLIPTextModel(text_config(self.tokenizer)).train()
        self.ema_unet = copy.deepcopy(self.unet).eval().requires_grad_(False)
        self.ema_text = copy.deepcopy(self.text_encoder).eval().requires_grad_(False)
        self.params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=0.01)
        self.text_loss = float("nan")

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(
            texts, padding="max_length", max_length=MAX_TOKEN_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "text": self.text_encoder, "ema_unet": self.ema_unet, "ema_text": self.ema_text}

    def extra_state(self) -> dict:
        return {"text_loss": self.text_loss}

    def load_extra_state(self, saved: dict) -> None:
        self.text_loss = saved["text_loss"]

    def train(self, latents: tuple[torch.Tensor, torch.Tensor], token_ids: torch.Tensor, scaling: float) -> None:
        args = self.args
        empty_ids = self.tokenize([""])[0]
        alphas_cumprod = scheduler().alphas_cumprod.float()  # [1000]
        snr = alphas_cumprod / (1 - alphas_cumprod)
        weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 weights for epsilon prediction
        self.start_clock()
        while self.step < args.iterations:
            step, gen, started = self.step, self.gen, time.time()
            idx, x0, dropped = self.draw_batch(latents, scaling)
            ids = token_ids[idx].clone()
            ids[dropped] = empty_ids
            t = torch.randint(0, 1000, (args.batch_size,), generator=gen)
            # Offset noise (a per-image, per-channel constant added to the noise): at t = 999 SD's
            # schedule still leaks sqrt(alpha_bar) ≈ 0.07 of the image, so without it the UNet
            # reads the background from the mean of the initial noise instead of the caption.
            eps = torch.randn(x0.shape, generator=gen)
            eps = eps + args.offset_noise * torch.randn(*x0.shape[:2], 1, 1, generator=gen)
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps  # DDPM forward process
            pred = self.unet(x_t, t, encoder_hidden_states=self.text_encoder(ids)[0]).sample
            per = (pred - eps).pow(2).mean(dim=(1, 2, 3))
            self.optimizer_step((weight[t] * per).mean(), self.params, warmup_lr(step, args.lr, args.warmup))
            decay = ema_decay(step, args.ema_decay)
            ema_update(self.ema_unet, self.unet, decay)
            ema_update(self.ema_text, self.text_encoder, decay)
            self.losses.append(per.mean().item())
            self.finish_step(started, "unet", args.checkpoint_every, eps_mse=np.mean(self.losses[-100:]))


# ----------------------------------------------------------------------------- stage 4: save


def build_pipeline(vae, unet, text_encoder, tokenizer):
    from diffusers import StableDiffusionPipeline

    for m in (vae, unet, text_encoder):
        m.eval().requires_grad_(False)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(
        prog="python -m dmdcli.shapes.train_teacher",
        description="Train the shapes-world teacher (CPU, deterministic, resumable).",
    )
    add_common_arguments(p)
    p.add_argument("--vae-iterations", type=int, default=2000)
    p.add_argument("--vae-batch-size", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--text-iterations", type=int, default=1500, help="text encoder pretraining iterations")
    p.add_argument("--iterations", type=int, default=12000, help="UNet + text encoder iterations")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--offset-noise", type=float, default=0.1, help="std of the per-channel constant added to the noise")
    return parse(p, argv)


def main(argv: list[str] | None = None) -> int:
    args, started = parse_args(argv), time.time()
    out, state = start(args)

    log(f"rendering {args.num_scenes} scenes of world seed {args.data_seed}")
    train_scenes = world.scenes(args.data_seed, args.num_scenes)
    images = world.render_array(train_scenes)
    vae, vae_record = load_or_train_vae(images, args, state)
    latents = encode_all(vae, images)
    del images

    trainer = Trainer(args, state)
    token_ids = trainer.tokenize([world.caption(s) for s in train_scenes])
    if not trainer.resume():
        labels = torch.from_numpy(np.stack([world.scene_labels(s) for s in train_scenes]))
        trainer.text_loss = pretrain_text_encoder(trainer.text_encoder, token_ids, labels, args, trainer.gen)
        trainer.ema_text.load_state_dict(trainer.text_encoder.state_dict())
        trainer.save()  # iteration 0: the pretrained text encoder
    trainer.train(latents, token_ids, vae.config.scaling_factor)

    pipe = build_pipeline(vae, trainer.ema_unet, trainer.ema_text, trainer.tokenizer)
    save_pipeline(pipe, out)
    eps_mse = float(np.mean(trainer.losses[-200:])) if trainer.losses else float("nan")
    values = {
        **trainer.saved_args(),
        "iterations": args.iterations,
        "threads": args.threads,
        "unet_stage_wall_time_s": round(trainer.wall_time, 1),
        "vae_stage": {k: v for k, v in vae_record.items() if k != "args"},
        "final_text_loss": round(trainer.text_loss, 5),
        "final_eps_mse": round(eps_mse, 5),
        "scaling_factor": vae.config.scaling_factor,
    }
    write_record(out, "dmdcli.shapes.train_teacher", argv, args, values, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
