"""DMD v1's regression pairs: (noise z, teacher latent y, prompt) from the teacher's deterministic
many-step sampler, generated once and cached on disk.

Layout: `<cache>/<key>/pairs-00000.safetensors` (tensors "noise" and "latent", float32, the
prompts as JSON in the metadata) and `manifest.json`, written last. The folder is built under a
temporary name and renamed into place (as the latent cache of dmdcli.data.latents), so a cut-short
build is never read. The key hashes what determines the pairs: the teacher (source, layout,
prediction type, scheduler config, and for a local folder the names, sizes and mtimes of its UNet,
text encoder, tokenizer and scheduler files; a hub id is taken at its word), the prompts, seed,
steps, guidance scale, resolution, count and precision; another run with the same values reuses
the pairs without calling the teacher.

Pair i draws its noise from its own generator seeded with (seed, i), and its prompt is
prompts[i mod len(prompts)]: the pairs do not depend on the batch size used to make them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from dmdcli.errors import DmdError, first_line
from dmdcli.files import atomic_folder, cache_dir, save_file
from dmdcli.models.teacher import component_files

MANIFEST_FILE = "manifest.json"
PAIRS_FORMAT = 1


@dataclass
class Pairs:
    """noise [N, C, h, w] and latent [N, C, h, w] (float32, CPU), prompts [N], and where they live."""

    noise: Tensor
    latent: Tensor
    prompts: list[str]
    folder: Path
    built: bool  # False: read from an existing cache

    def __len__(self) -> int:
        return self.noise.shape[0]


def default_pairs_dir() -> Path:
    return cache_dir("pairs")


# The parts of a pipeline folder that decide a pair: the UNet, how prompts are encoded, the schedule.
PAIR_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def teacher_identity(
    source: str, layout: str, prediction_type: str, scheduler_config: dict[str, Any]
) -> dict[str, Any]:
    """What identifies a teacher without reading its weights (`component_files`)."""
    return {
        "source": source,
        "layout": layout,
        "prediction_type": prediction_type,
        "scheduler": {k: v for k, v in scheduler_config.items() if not k.startswith("_")},
        **component_files(source, PAIR_COMPONENTS),
    }


def pair_key_inputs(
    teacher: dict[str, Any],
    prompts: list[str],
    seed: int,
    steps: int,
    guidance_scale: float,
    resolution: int,
    count: int,
    precision: str,
    weights_dtype: str = "float32",
) -> dict[str, Any]:
    """What a set of pairs is made from, hashed into its cache key. weights_dtype: the teacher
    network's weights (bf16 when loaded as a shared LoRA base: its fp32 weights under bf16 autocast
    round elsewhere, so their pairs differ in the last bits)."""
    inputs = {
        "format": PAIRS_FORMAT,
        "teacher": teacher,
        "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
        "seed": seed,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "resolution": resolution,
        "count": count,
        "precision": precision,  # the teacher runs in the frozen dtype: bf16 pairs are not fp32 ones
    }
    # Named only when not fp32, so that the pairs cached before the key had it are still found.
    return inputs | ({"weights_dtype": weights_dtype} if weights_dtype != "float32" else {})


def pair_noise(seed: int, index: int, shape: tuple[int, ...]) -> Tensor:
    """The noise of pair `index`: [*shape] float32 from a generator of its own."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + index), dtype=torch.float32)


def load_or_build_pairs(
    cache_root: Path,
    inputs: dict[str, Any],
    prompts: list[str],
    latent_shape: tuple[int, ...],
    generate: Callable[[Tensor, list[str]], Tensor],
    batch_size: int = 8,
    shard_size: int = 1024,
    progress: Callable[[int, int], None] | None = None,
) -> Pairs:
    """The pairs for `inputs` (see `pair_key_inputs`), from `cache_root/<key>/` or made now.

    `generate(noise [B, C, h, w], prompts [B]) → latents [B, C, h, w]` runs the teacher's sampler
    (the caller moves tensors to its device); it is never called on a cache hit.
    """
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    final = Path(cache_root) / key
    built = False
    if not (final / MANIFEST_FILE).is_file():
        _build(final, key, inputs, prompts, latent_shape, generate, batch_size, shard_size, progress)
        built = True
    noise, latent, pair_prompts = _load(final)
    if progress and not built:  # a cache hit: all of them are there
        progress(len(noise), len(noise))
    return Pairs(noise, latent, pair_prompts, final, built)


def _build(
    final: Path,
    key: str,
    inputs: dict[str, Any],
    prompts: list[str],
    latent_shape: tuple[int, ...],
    generate,
    batch_size: int,
    shard_size: int,
    progress,
) -> None:
    count, seed = int(inputs["count"]), int(inputs["seed"])

    def write(tmp: Path) -> None:
        noises, latents, texts = [], [], []
        for start in range(0, count, batch_size):
            index = range(start, min(start + batch_size, count))
            noise = torch.stack([pair_noise(seed, i, latent_shape) for i in index])
            batch_prompts = [prompts[i % len(prompts)] for i in index]
            latents.append(generate(noise, batch_prompts).detach().float().cpu())
            noises.append(noise)
            texts += batch_prompts
            if progress:
                progress(index.stop, count)
        noise, latent = torch.cat(noises), torch.cat(latents)
        if not torch.isfinite(latent).all():
            raise DmdError("the teacher produced non-finite latents for the regression pairs")
        shards = []
        for n, start in enumerate(range(0, count, shard_size)):
            name = f"pairs-{n:05d}.safetensors"
            part = slice(start, min(start + shard_size, count))
            save_file(
                {"noise": noise[part].contiguous(), "latent": latent[part].contiguous()},
                str(tmp / name),
                metadata={"prompts": json.dumps(texts[part])},
            )
            shards.append({"file": name, "count": part.stop - part.start})
        manifest = {"format": PAIRS_FORMAT, "key": key, "inputs": inputs, "count": count, "shards": shards}
        (tmp / MANIFEST_FILE).write_text(
            json.dumps(manifest, indent=1), encoding="utf-8"
        )  # last: marks the folder complete

    atomic_folder(final, write, MANIFEST_FILE)


def _load(folder: Path) -> tuple[Tensor, Tensor, list[str]]:
    hint = f"delete {folder} and run again"
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        noises, latents, prompts = [], [], []
        for shard in manifest["shards"]:
            path = folder / shard["file"]
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                prompts += json.loads((f.metadata() or {})["prompts"])
            noises.append(tensors["noise"])
            latents.append(tensors["latent"])
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        raise DmdError(f"regression pair cache {folder} is unreadable ({first_line(e)}); {hint}") from None
    if not noises:
        raise DmdError(f"regression pair cache {folder} holds no pairs; {hint}")
    noise, latent = torch.cat(noises), torch.cat(latents)
    if len(prompts) != noise.shape[0] or noise.shape[0] != manifest.get("count"):
        raise DmdError(f"regression pair cache {folder} is inconsistent; {hint}")
    return noise, latent, prompts
