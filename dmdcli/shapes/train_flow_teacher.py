"""Train the built-in flow-matching shapes teacher (`--teacher shapes-flow`): an SD3-layout
diffusers pipeline.

    python -m dmdcli.shapes.train_flow_teacher OUT_DIR [--iterations 6000] [--eval-prompts 256] ...

It reuses the shipped UNet teacher's first two stages (dmdcli.shapes.train_teacher): its VAE
(4 × 16 × 16 latents, shifted by 0) and its CLIP text encoder, which serves as both of SD3's
CLIPs (with an identity projection, so its pooled output is what the UNet teacher's was trained to
read scenes from). There is no T5: SD3 without it gets zeros in its place, and this teacher is
trained with none of those positions (max_sequence_length 0, recorded in model_index.json), so a
step costs the 64 image and 32 text tokens and not 256 more of zeros.

What is trained is an SD3Transformer2DModel (patch 2, qk RMS norm as SD3.5) on the flow-matching
objective of SD3 (Esser et al. 2024): x_t = (1 − σ) x0 + σ ε, the network predicts v = ε − x0,
σ drawn logit-normal(0, 1); 10% of captions are "" for classifier-free guidance. It reads its
conditioning through dmd's own SD3 teacher and its timestep through dmd's SD3 adapter, so what it
is trained on is what `dmd distill` gives it. Runs on the CPU with fixed seeds and resumes from
``--state`` (default ``OUT_DIR.state``) as train_teacher does; the EMA of the weights is saved.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dmdcli.shapes import teacher_path, world
from dmdcli.shapes.training import (
    Stage,
    add_common_arguments,
    ema_decay,
    ema_update,
    encode_all,
    log,
    parse,
    save_pipeline,
    start,
    warmup_lr,
    write_record,
)

# Arguments that change what is trained: a resumed run must agree on all of them.
_STATE_ARGS = (
    "seed",
    "data_seed",
    "num_scenes",
    "width",
    "depth",
    "batch_size",
    "lr",
    "warmup",
    "ema_decay",
    "caption_dropout",
)
HEAD_DIM = 32
SHIFT = 1.0  # at 64 image tokens no shift toward noise is needed (SD3 shifts by 3 for 4096)
T5_POSITIONS = 0  # the max_sequence_length its model_index.json records: no zeros in T5's place


def transformer_config(width: int, depth: int, text_width: int) -> dict:
    """SD3Transformer2DModel on the UNet teacher's 4 × 16 × 16 latents, patch 2 (8 × 8 tokens)."""
    latent_side = world.RESOLUTION // 2
    return dict(
        sample_size=latent_side,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=depth,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=width // HEAD_DIM,
        joint_attention_dim=2 * text_width,  # the two CLIPs' states side by side
        caption_projection_dim=width,
        pooled_projection_dim=2 * text_width,
        pos_embed_max_size=latent_side,
        qk_norm="rms_norm",
    )


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)


def clip_with_projection(clip):
    """The UNet teacher's CLIPTextModel as the CLIPTextModelWithProjection SD3 reads, its
    projection the identity (the pooled output unchanged)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    width = clip.config.hidden_size
    model = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(clip.config.to_dict() | {"projection_dim": width}))
    model.text_model.load_state_dict(clip.state_dict())  # transformers 5: CLIPTextModel is the text model itself
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(width))
    return model.eval().requires_grad_(False)


def frozen_parts() -> dict:
    """The StableDiffusion3Pipeline's components but the transformer: the UNet teacher's VAE and
    CLIP (twice), no T5, the flow-matching scheduler."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    from dmdcli.shapes.tokenizer import make_shapes_tokenizer

    source = teacher_path()
    vae = AutoencoderKL.from_pretrained(source / "vae")
    vae.register_to_config(shift_factor=0.0)  # SD3's pipeline shifts its latents; these are not
    clip = clip_with_projection(CLIPTextModel.from_pretrained(source / "text_encoder"))
    return dict(
        scheduler=scheduler(),
        vae=vae.eval().requires_grad_(False),
        text_encoder=clip,
        tokenizer=make_shapes_tokenizer(),
        text_encoder_2=copy.deepcopy(clip),
        tokenizer_2=make_shapes_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def encode_captions(folder: Path, captions: list[str], batch: int = 1000) -> tuple[dict, np.ndarray]:
    """Each distinct caption (and "", last) encoded by dmd's SD3 teacher of the pipeline in
    `folder`, and which row each caption is: the conditioning `dmd distill` gives the teacher."""
    from dmdcli.models.pipeline import load_teacher
    from dmdcli.models.teacher import inspect_teacher

    distinct, rows = np.unique(np.array(captions + [""]), return_inverse=True)
    teacher = load_teacher(inspect_teacher(str(folder)), torch.device("cpu"), torch.float32, world.RESOLUTION)
    parts = [teacher.encode_prompts(list(distinct[i : i + batch])) for i in range(0, len(distinct), batch)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, rows


class FlowTrainer(Stage):
    """The transformer stage."""

    state_args = _STATE_ARGS

    def __init__(self, args, state: Path, text_width: int) -> None:
        from diffusers import SD3Transformer2DModel

        super().__init__(args, state, seed=args.seed + 1)
        torch.manual_seed(args.seed)  # the initial weights
        config = transformer_config(args.width, args.depth, text_width)
        self.transformer = SD3Transformer2DModel(**config).train()
        self.ema = copy.deepcopy(self.transformer).eval().requires_grad_(False)
        self.params = list(self.transformer.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=0.01)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.transformer, "ema": self.ema}

    def train(self, latents: tuple[torch.Tensor, torch.Tensor], cond: dict, rows: np.ndarray, scaling: float) -> None:
        from dmdcli.models.teacher import schedule_from_config
        from dmdcli.models.transformer import SD3Denoiser

        args = self.args
        denoiser = SD3Denoiser(self.transformer, schedule_from_config(dict(scheduler().config)))
        schedule, empty_row = denoiser.schedule, int(rows[-1])
        rows = torch.from_numpy(rows[:-1])
        self.start_clock()
        while self.step < args.iterations:
            step, gen, started = self.step, self.gen, time.time()
            idx, x0, dropped = self.draw_batch(latents, scaling)
            row = rows[idx].clone()
            row[dropped] = empty_row
            # σ logit-normal(0, 1) as SD3 trains, as the index of the schedule's σ the engine uses
            u = torch.sigmoid(torch.randn(args.batch_size, generator=gen))
            t = (u * schedule.num_train_timesteps).long().clamp(max=schedule.num_train_timesteps - 1)
            eps = torch.randn(x0.shape, generator=gen)
            x_t = schedule.add_noise(x0, eps, t)
            pred = denoiser(x_t, t, {k: v[row] for k, v in cond.items()})
            loss = (pred - schedule.target(x0, eps, t)).pow(2).mean()
            self.optimizer_step(loss, self.params, warmup_lr(step, args.lr, args.warmup))
            ema_update(self.ema, self.transformer, ema_decay(step, args.ema_decay))
            self.losses.append(loss.item())
            self.finish_step(started, "transformer", args.checkpoint_every, v_mse=np.mean(self.losses[-100:]))


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(
        prog="python -m dmdcli.shapes.train_flow_teacher",
        description="Train the flow-matching shapes teacher (CPU, deterministic, resumable).",
    )
    add_common_arguments(p)
    p.add_argument("--width", type=int, default=128, help=f"transformer width (a multiple of {HEAD_DIM})")
    p.add_argument("--depth", type=int, default=6, help="transformer blocks")
    p.add_argument("--iterations", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    args = parse(p, argv)
    if args.width % HEAD_DIM:
        p.error(f"--width must be a multiple of {HEAD_DIM}")
    return args


def main(argv: list[str] | None = None) -> int:
    from diffusers import StableDiffusion3Pipeline

    args, started = parse_args(argv), time.time()
    out, state = start(args)

    log(f"rendering {args.num_scenes} scenes of world seed {args.data_seed}")
    train_scenes = world.scenes(args.data_seed, args.num_scenes)
    captions = [world.caption(s) for s in train_scenes]
    parts = frozen_parts()
    trainer = FlowTrainer(args, state, parts["text_encoder"].config.hidden_size)
    latents = encode_all(parts["vae"], world.render_array(train_scenes))
    # The conditioning, read by dmd's SD3 teacher of this very pipeline (its transformer untrained).
    untrained = StableDiffusion3Pipeline(transformer=copy.deepcopy(trainer.transformer), **parts)
    save_pipeline(untrained, state / "parts", T5_POSITIONS)
    cond, rows = encode_captions(state / "parts", captions)
    log(f"{len(cond['pooled_projections'])} distinct captions encoded")
    trainer.resume()
    trainer.train(latents, cond, rows, parts["vae"].config.scaling_factor)

    save_pipeline(StableDiffusion3Pipeline(transformer=trainer.ema, **parts), out, T5_POSITIONS)
    values = {
        **trainer.saved_args(),
        "iterations": args.iterations,
        "threads": args.threads,
        "transformer_stage_wall_time_s": round(trainer.wall_time, 1),
        "parameters": sum(p.numel() for p in trainer.ema.parameters()),
        "final_v_mse": round(float(np.mean(trainer.losses[-200:])), 5) if trainer.losses else None,
        "vae_and_text_encoder_from": "the UNet shapes teacher (dmdcli/shapes/weights/teacher)",
    }
    write_record(out, "dmdcli.shapes.train_flow_teacher", argv, args, values, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
