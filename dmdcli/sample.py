"""`dmd sample`: prompts × images per prompt → image files that say where they came from.

Seeds: image i (from 0) of prompt p (from 0) gets seed S + p·N + i, with S = --seed and N =
--num-images-per-prompt, i.e. S plus the image's position in the run. Every image has its own
generator (see dmdcli.models.samplers), so `--seed <its seed> --prompt <its prompt>` redraws any
one image alone, whatever batch it was in.

Files: OUT/<seed, 6 digits>-<prompt slug>.<png|jpg|webp>, never replacing an existing file unless
asked; each written through a temporary name and a rename, with prompt, seed, steps and model in
its metadata (PNG text chunks; EXIF ImageDescription as JSON for JPEG and WebP).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dmdcli.errors import UsageError
from dmdcli.files import atomic_write, check_can_make

FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
MAX_SLUG = 60
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range


@dataclass
class Job:
    """One image to make."""

    prompt: str
    seed: int
    path: Path


def image_seed(seed: int, prompt_index: int, image_index: int, per_prompt: int) -> int:
    """The documented seed of image `image_index` of prompt `prompt_index`: S + p·N + i."""
    return seed + prompt_index * per_prompt + image_index


def slug(prompt: str, max_length: int = MAX_SLUG) -> str:
    """A file-name-safe form of a prompt: ASCII letters and digits joined by '-', at most `max_length`."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return words[:max_length].rstrip("-") or "image"


def plan(prompts: list[str], per_prompt: int, seed: int, out: Path, fmt: str) -> list[Job]:
    """Every image of the run, in order, with its seed and file (unique within a run: seeds are)."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown image format {fmt!r}; choose one of {', '.join(FORMATS)}")
    last = image_seed(seed, len(prompts) - 1, per_prompt - 1, per_prompt)
    if seed < 0 or last > MAX_SEED:
        raise UsageError(
            f"seeds must lie in 0..{MAX_SEED}; --seed {seed} with {len(prompts) * per_prompt} images goes past it"
        )
    jobs = []
    for p, prompt in enumerate(prompts):
        for i in range(per_prompt):
            s = image_seed(seed, p, i, per_prompt)
            jobs.append(Job(prompt, s, out / f"{s:06d}-{slug(prompt)}.{fmt}"))
    return jobs


def check_free(jobs: list[Job], overwrite: bool) -> None:
    """Refuse (before any model loads) to replace files that are already there, unless asked,
    or to write into a folder that is a file."""
    for folder in {job.path.parent for job in jobs}:
        check_can_make(folder)
    if overwrite:
        return
    taken = [job.path for job in jobs if job.path.exists()]
    if taken:
        more = f" and {len(taken) - 1} more already exist" if len(taken) > 1 else " already exists"
        raise UsageError(f"{taken[0]}{more}; pass --overwrite to replace, or choose another --out or --seed")


def write_image(pixels: np.ndarray, path: Path, metadata: dict[str, Any]) -> None:
    """[H, W, 3] uint8 → `path` (format from its suffix), atomically, with `metadata`."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    image = Image.fromarray(pixels)
    fmt = FORMATS[path.suffix.lstrip(".")]
    kwargs: dict[str, Any] = {}
    if fmt == "PNG":
        info = PngInfo()
        for key, value in metadata.items():
            info.add_itxt(key, value if isinstance(value, str) else json.dumps(value))
        kwargs["pnginfo"] = info
    else:
        exif = Image.Exif()
        exif[0x010E] = json.dumps(metadata)  # ImageDescription (ASCII: json.dumps escapes the rest)
        kwargs.update(exif=exif, quality=95)
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt, **kwargs))


def image_metadata(job: Job, steps: int, model: str, height: int, width: int) -> dict[str, Any]:
    """What each file carries: our keys, and Automatic1111's "parameters" line so its PNG Info reads it."""
    return {
        "prompt": job.prompt,
        "seed": str(job.seed),
        "steps": str(steps),
        "model": model,
        "parameters": f"{job.prompt}\nSteps: {steps}, Seed: {job.seed}, Size: {width}x{height}, Model: {model}, "
        "Sampler: dmd",
    }


def run(
    generate: Callable[[list[str], list[int]], np.ndarray], jobs: list[Job], batch_size: int, steps: int, model: str
) -> Iterator[dict[str, Any]]:
    """Generate the jobs batch by batch and write each image; yields one record per image written,
    right after its file is in place (so an interrupted run leaves only complete, announced files).

    `generate(prompts, seeds)` → [B, H, W, 3] uint8.
    """
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        images = generate([j.prompt for j in batch], [j.seed for j in batch])
        for job, pixels in zip(batch, images):
            height, width = pixels.shape[:2]
            job.path.parent.mkdir(parents=True, exist_ok=True)
            write_image(pixels, job.path, image_metadata(job, steps, model, height, width))
            yield {
                "path": str(job.path),
                "prompt": job.prompt,
                "seed": job.seed,
                "steps": steps,
                "width": int(width),
                "height": int(height),
                "model": model,
            }
