"""Drawing a benchmark's images for `dmd eval`: image i from prompt i with seed S + i, written as
it comes, with the seconds per image of the sampler's calls alone (no model loading, no file
writing) and the network evaluations per image (counted by a hook on the denoiser: one call on a
batch of B images is one evaluation for each, a CFG pipeline's doubled batch two)."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dmdcli.eval.report import Progress
from dmdcli.models.samplers import ImageSampler
from dmdcli.sample import run

if TYPE_CHECKING:
    from dmdcli.eval.run import Target

SEED_RULE = "image i (from 0) of the set: prompt i, seed S + i (dmd sample --seed S, one image per prompt)"


@dataclass
class Generation:
    """One model's images of a benchmark and the facts of how they were made."""

    model: str
    seed: int
    paths: list[Path]  # image i from prompt i
    seconds_per_image: float
    nfe_per_image: float | None
    details: dict[str, Any]  # steps, timesteps, guidance, size, batch size, device, ... (report["generation"])


def denoiser_module(sampler: ImageSampler) -> torch.nn.Module | None:
    """The network called once per step: the student's UNet, a pipeline's unet or transformer."""
    if getattr(sampler, "unet", None) is not None:
        return sampler.unet
    pipe = getattr(sampler, "pipe", None)
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


class EvaluationCounter:
    """Counts the rows of every batch a module is called on: rows / images = evaluations per image."""

    def __init__(self, module: torch.nn.Module | None):
        self.rows = self.calls = 0
        self.handle = None if module is None else module.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None:
            first = next(
                (kwargs[k] for k in ("sample", "hidden_states", "x") if isinstance(kwargs.get(k), torch.Tensor)), None
            )
        if first is not None:
            self.rows += int(first.shape[0])
            self.calls += 1

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def generate(
    sampler: ImageSampler, target: Target, steps: int, batch_size: int, seed: int, progress: Progress | None = None
) -> Generation:
    """Draw the target's images (its jobs) with `sampler`, writing each file as it comes."""
    seconds: list[float] = []

    def timed(prompts: list[str], seeds: list[int]) -> np.ndarray:
        started = time.perf_counter()
        images = sampler.generate(prompts, seeds, target.size[0], target.size[1], steps)  # numpy: work is done
        seconds.append(time.perf_counter() - started)
        return images

    counter = EvaluationCounter(denoiser_module(sampler))
    size = None
    try:
        for done, record in enumerate(run(timed, target.jobs, batch_size, steps, target.source.name), start=1):
            size = size or [record["height"], record["width"]]
            if progress is not None:
                progress("generating", done, len(target.jobs))
    finally:
        counter.close()
    n = len(target.jobs)
    nfe = counter.rows / n if counter.rows else _nfe_from_settings(sampler, steps)
    details = {
        "kind": target.source.kind,
        "steps": steps,
        "timesteps": sampler.timesteps(steps) if hasattr(sampler, "timesteps") else None,
        "guidance_scale": _guidance_scale(sampler),
        "image_size": size,
        "batch_size": batch_size,
        "device": str(getattr(sampler, "device", None) or _pipe_device(sampler)),
        "seed_rule": SEED_RULE,
        "images": str(target.images),
        "generation_seconds": round(sum(seconds), 3),
        "first_batch_seconds": round(seconds[0], 3) if seconds else None,
        "denoiser_calls": counter.calls,
    }
    return Generation(
        model=target.source.name,
        seed=seed,
        paths=[job.path for job in target.jobs],
        seconds_per_image=sum(seconds) / n,
        nfe_per_image=nfe,
        details=details,
    )


def _guidance_scale(sampler: ImageSampler) -> float | None:
    """None for a student (no CFG); a pipeline's --guidance-scale, else its own default."""
    pipe = getattr(sampler, "pipe", None)
    if pipe is None:
        return None
    if getattr(sampler, "guidance_scale", None) is not None:
        return float(sampler.guidance_scale)
    default = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
    return float(default.default) if default is not None and isinstance(default.default, (int, float)) else None


def _nfe_from_settings(sampler: ImageSampler, steps: int) -> float | None:
    """When no denoiser could be hooked: steps, doubled when the pipeline ran CFG."""
    pipe = getattr(sampler, "pipe", None)
    if pipe is None:
        return float(steps)
    cfg = getattr(pipe, "do_classifier_free_guidance", None)
    return None if cfg is None else float(steps * (2 if cfg else 1))


def _pipe_device(sampler: ImageSampler) -> Any:
    pipe = getattr(sampler, "pipe", None)
    return getattr(pipe, "device", "?")
