"""What the shapes teachers' training scripts share: logging, the learning-rate warm-up, EMA,
image and latent conversion, and a denoiser-training stage whose checkpoints resume bit-exactly.

`train_teacher` (the UNet teacher) and `train_flow_teacher` (the flow-matching transformer) each
subclass `Stage` with their own networks and loss.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] → float32 [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def warmup_lr(step: int, peak: float, warmup: int) -> float:
    return peak * min(1.0, (step + 1) / max(1, warmup))


def progress(stage: str, step: int, total: int, t0: float, first: int, **values: float) -> None:
    if (step + 1) % 100 == 0 or step == first:
        rate = (time.time() - t0) / (step + 1 - first)
        shown = " ".join(f"{k} {v:.4f}" for k, v in values.items())
        log(f"{stage} {step + 1}/{total} {shown} ({rate:.3f} s/it, {rate * (total - step - 1) / 60:.0f} min left)")


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)


def ema_decay(step: int, decay: float) -> float:
    """The EMA's decay at `step`: ramped up from 0.1 so early averages do not keep the initial weights."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def encode_all(vae, images: np.ndarray, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image, float32 [N, C, h, w] each."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(to_tensor(images[i : i + batch])).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def check_args(saved: dict, args, where: Path) -> None:
    """Refuse to go on from state trained with other settings (a saved value of None: not saved)."""
    differ = {k: (v, getattr(args, k)) for k, v in saved.items() if getattr(args, k) != v}
    if differ:
        shown = ", ".join(f"--{k.replace('_', '-')} {new} (saved {old})" for k, (old, new) in differ.items())
        raise SystemExit(
            f"error: {where} was trained with other settings: {shown}; use the same ones or another --state"
        )


class Stage(ABC):
    """A training stage of networks, one optimizer and one random generator, with checkpoints in
    ``state`` (tensors in safetensors, the rest in JSON: dmdcli.train.checkpoint) that resume
    bit-exactly. Subclasses build `modules()` and `opt`, and run `train`; `state_args` names the
    arguments a resumed run must agree on."""

    state_args: tuple[str, ...] = ()

    def __init__(self, args, state: Path, seed: int) -> None:
        self.args, self.state = args, state
        self.gen = torch.Generator().manual_seed(seed)
        self.step = 0
        self.losses: list[float] = []
        self.wall_time = 0.0  # seconds spent in this stage, over every run that resumed it
        self.opt: torch.optim.Optimizer

    @abstractmethod
    def modules(self) -> dict[str, torch.nn.Module]:
        """Every network whose weights a checkpoint keeps (trained ones and their EMAs), by name."""

    def extra_state(self) -> dict:
        """JSON-able values a checkpoint keeps besides the weights (subclasses add theirs)."""
        return {}

    def load_extra_state(self, saved: dict) -> None:
        """Take back what `extra_state` saved."""

    def saved_args(self) -> dict:
        return {k: getattr(self.args, k) for k in self.state_args}

    def save(self) -> None:
        from dmdcli.train.checkpoint import optimizer_state, write_checkpoint

        tensors, opt_state = optimizer_state(self.opt.state_dict(), "opt")
        for name, module in self.modules().items():
            tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        tensors["generator"] = self.gen.get_state()
        record = {
            "args": self.saved_args(),
            "optimizer": opt_state,
            "losses": self.losses[-200:],
            "wall_time_s": self.wall_time,
            "threads": torch.get_num_threads(),
        }
        write_checkpoint(self.state, self.step, tensors, record | self.extra_state(), keep=0)

    def resume(self) -> bool:
        """Load the newest checkpoint not past --iterations (every one is kept, so the weights of any
        saved iteration N can be exported again by running with --iterations N); False if none."""
        from dmdcli.runfiles import read_checkpoint
        from dmdcli.train.checkpoint import complete_checkpoints, optimizer_state_dict

        found = [p for p in complete_checkpoints(self.state) if int(p.name.split("-")[1]) <= self.args.iterations]
        if not found:
            return False
        path = found[-1]
        tensors, saved = read_checkpoint(path)
        check_args(saved["args"], self.args, path)
        for name, module in self.modules().items():
            module.load_state_dict({k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
        self.opt.load_state_dict(optimizer_state_dict("opt", tensors, saved["optimizer"]))
        self.gen.set_state(tensors["generator"])
        self.step, self.losses = saved["iteration"], saved["losses"]
        self.wall_time = saved.get("wall_time_s", 0.0)  # absent in checkpoints of the first v2 run
        self.load_extra_state(saved)
        log(f"resumed from {path} (iteration {self.step})")
        return True

    def draw_batch(self, latents: tuple[torch.Tensor, torch.Tensor], scaling: float):
        """A batch: its rows, its latents (posterior samples, scaled) and which captions are
        dropped for classifier-free guidance, all from the stage's generator."""
        mean, std = latents
        idx = torch.randint(len(mean), (self.args.batch_size,), generator=self.gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=self.gen)) * scaling
        dropped = torch.rand(self.args.batch_size, generator=self.gen) < self.args.caption_dropout
        return idx, x0, dropped

    def optimizer_step(self, loss: torch.Tensor, params: list[torch.nn.Parameter], lr: float) -> None:
        """One clipped AdamW step at `lr`."""
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.opt.step()

    def finish_step(self, started: float, stage: str, every: int, **shown: float) -> None:
        """Count the step, report progress, and checkpoint every `every` steps and at the end."""
        self.step += 1
        self.wall_time += time.time() - started
        progress(stage, self.step - 1, self.args.iterations, self._t0, self._first, **shown)
        if self.step % every == 0 or self.step == self.args.iterations:
            self.save()

    def start_clock(self) -> None:
        self._t0, self._first = time.time(), self.step


# -- the scripts' command line, set-up and record ------------------------------------------------


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments both teachers' scripts take: where, which scenes, threads, checkpoints, evaluation."""
    p.add_argument("out_dir")
    p.add_argument("--state", default=None, help="training state folder (default OUT_DIR.state)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=None, help="world stream of the training scenes (1000 + seed)")
    p.add_argument("--num-scenes", type=int, default=40000, help="training images rendered once")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-prompts", type=int, default=0, help="alignment check on this many prompts after saving")


def parse(p: argparse.ArgumentParser, argv: list[str] | None):
    args = p.parse_args(argv)
    if args.data_seed is None:
        args.data_seed = 1000 + args.seed
    return args


def start(args) -> tuple[Path, Path]:
    """Threads and determinism set; (OUT_DIR, the state folder, made)."""
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(args.out_dir)
    state = Path(args.state) if args.state else out.with_name(out.name + ".state")
    state.mkdir(parents=True, exist_ok=True)
    return out, state


def evaluate(pipe_dir: Path, n: int, seed: int, steps: int = 25, guidance: float = 4.0) -> dict:
    """Alignment of a saved teacher on ``n`` prompts of world seed ``seed``, sampled by its diffusers pipeline."""
    from dmdcli.shapes import world
    from dmdcli.shapes.features import alignment_report, sample_teacher

    captions = [world.caption(s) for s in world.scenes(seed, n)]
    images = sample_teacher(pipe_dir, captions, steps=steps, guidance_scale=guidance, seed=0)
    return alignment_report(images, captions)


def save_pipeline(pipe, out: Path, max_sequence_length: int | None = None) -> None:
    """Write a shapes pipeline into a temporary folder beside ``out``, then swap it in; a
    `max_sequence_length` is recorded in its model_index.json (an SD3 pipeline without T5)."""
    from dmdcli.models.teacher import record_max_sequence_length
    from dmdcli.shapes.tokenizer import write_shapes_tokenizer_files

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    # transformers 5 writes only tokenizer.json; keep vocab.json + merges.txt for transformers 4.
    for folder in ("tokenizer", "tokenizer_2"):
        if (tmp / folder).is_dir() and not (tmp / folder / "vocab.json").is_file():
            write_shapes_tokenizer_files(tmp / folder)
    record_max_sequence_length(tmp, max_sequence_length)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def write_record(out: Path, script: str, argv: list[str] | None, args, values: dict, started: float) -> None:
    """OUT_DIR/TRAINING.json: the command, `values`, the versions, and the alignment at 25 steps
    (CFG 4, world seed 7) when --eval-prompts asks for it."""
    import diffusers
    import transformers

    record = {
        "command": f"python -m {script} {shlex.join(sys.argv[1:] if argv is None else argv)}".strip(),
        **values,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    (out / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
    if args.eval_prompts > 0:
        record["eval"] = evaluate(out, args.eval_prompts, seed=7)
        record["eval"].update(steps=25, guidance_scale=4.0, world_seed=7)
        log(f"alignment: {record['eval']}")
        (out / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"saved to {out} in {(time.time() - started) / 60:.1f} min")
