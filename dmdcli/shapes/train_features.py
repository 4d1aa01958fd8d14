"""Train the shapes world's attribute network (the FD-shapes / alignment feature network).

    python -m dmdcli.shapes.train_features [OUT.safetensors] [--seed 0] [--iterations 800]

Every batch is fresh scenes of world stream ``--data-seed`` (default 2000 + seed), rendered
and then degraded a little (Gaussian blur σ ∈ [0, 0.8] px, per-channel gain ±6%, Gaussian
noise σ ∈ [0, 0.06]) so that the network also reads the slightly soft images a VAE decodes.
Adam, one thread, fixed seeds. Writes the weights and ``OUT.json`` (config, command, accuracy on
2000 fresh scenes of another seed). Default OUT: the shipped ``dmdcli/shapes/weights/features.safetensors``.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from dmdcli.shapes import features_path, world
from dmdcli.shapes.features import AttributeNet, attribute_accuracy, attribute_loss, save_feature_net


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur, x [B, 3, H, W], sigma [B] (0 = none)."""
    r = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-(r[None] ** 2) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    k = k / k.sum(dim=1, keepdim=True)  # [B, 5]
    b, c, h, w = x.shape
    y = x.reshape(1, b * c, h, w)
    kk = k.repeat_interleave(c, dim=0)  # [B*C, 5]
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), kk[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), kk[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def degrade(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random mild blur, color gain and noise on x [B, 3, H, W] in [-1, 1]."""
    b = x.shape[0]
    x = _blur(x, torch.rand(b, generator=gen) * 0.8)
    gain = 1 + (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.12
    x = (x + 1) * gain - 1
    noise = torch.rand(b, 1, 1, 1, generator=gen) * 0.06
    return (x + noise * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


def batch_of(seed: int, step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    scenes = world.scenes(seed, batch, start=step * batch)
    x = torch.from_numpy(world.render_array(scenes)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    y = torch.from_numpy(np.stack([world.scene_labels(s) for s in scenes]))
    return x, y


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dmdcli.shapes.train_features",
        description="Train the shapes attribute network (CPU, deterministic).",
    )
    p.add_argument("out", nargs="?", default=str(features_path()))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=None, help="world stream of training scenes (2000 + seed)")
    p.add_argument("--iterations", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    data_seed = 2000 + args.seed if args.data_seed is None else args.data_seed

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    net = AttributeNet()
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.iterations, pct_start=0.1)
    start, losses = time.time(), []
    net.train()
    for step in range(args.iterations):
        x, y = batch_of(data_seed, step, args.batch_size)
        loss = attribute_loss(net(degrade(x, gen))[0], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            print(
                f"{step + 1}/{args.iterations} loss {np.mean(losses[-100:]):.4f} "
                f"({(time.time() - start) / (step + 1):.3f} s/it)",
                flush=True,
            )
    net.eval()
    test = world.scenes(9000 + args.seed, 2000)
    acc = attribute_accuracy(world.render_array(test), test, net)
    wall = time.time() - start
    extra = {
        "command": (
            "python -m dmdcli.shapes.train_features " + shlex.join(sys.argv[1:] if argv is None else argv)
        ).strip(),
        "seed": args.seed,
        "data_seed": data_seed,
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "wall_time_s": round(wall, 1),
        "accuracy_fresh_2000": acc,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    save_feature_net(net, args.out, extra)
    print(f"accuracy on 2000 fresh scenes: {acc}; {wall / 60:.1f} min; saved {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
