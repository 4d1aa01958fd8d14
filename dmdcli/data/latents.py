"""The real images' VAE latents, cached: safetensors shards (float32, captions in the shard
metadata) under a folder whose name is a hash of everything that determines them, so a second run
with the same images, captions, resolution and encoder never encodes again."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import Dataset

from dmdcli.data.images import ImageFolderScan, load_square, relpath, scan_image_folder
from dmdcli.errors import DmdError
from dmdcli.files import atomic_folder, save_file

CACHE_DIRNAME = ".dmd-cache"
MANIFEST_FILE = "manifest.json"
CACHE_FORMAT = 1


# ----------------------------------------------------------------------------- latent dataset


class RealLatents(Dataset):
    """Cached latents of real images with their captions.

    `latents` is float32 [N, C, h, w]; item i is (latents[i] [C, h, w], caption str).
    """

    def __init__(
        self,
        latents: Tensor,
        captions: list[str],
        paths: list[str] | None = None,
        cache_path: Path | None = None,
        upscaled: int = 0,
    ) -> None:
        if latents.ndim != 4 or latents.shape[0] != len(captions):
            raise ValueError(f"latents {tuple(latents.shape)} do not match {len(captions)} captions")
        self.latents = latents
        self._captions = list(captions)
        self.paths = list(paths) if paths is not None else []  # relative to the image folder
        self.cache_path = cache_path  # the cache folder these came from (None if not cached)
        self.upscaled = upscaled  # how many images were smaller than the resolution (0 in caches older than the count)

    def __len__(self) -> int:
        return len(self._captions)

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        return self.latents[index], self._captions[index]

    @property
    def captions(self) -> list[str]:
        """Captions in dataset order."""
        return self._captions


# ----------------------------------------------------------------------------- latent cache


def latent_cache_key(scan: ImageFolderScan, encoder_id: str, resolution: int) -> str:
    """16 hex chars of sha256 over the encoder, the resolution and every item's
    (relative path, file size, mtime_ns, caption), so any change gives a new cache."""
    return _hash_inputs(_key_inputs(scan, encoder_id, resolution))


def _hash_inputs(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _key_inputs(scan: ImageFolderScan, encoder_id: str, resolution: int) -> dict:
    files = []
    for path, caption in scan.items:
        st = path.stat()
        files.append([relpath(scan.root, path), st.st_size, st.st_mtime_ns, caption])
    return {"encoder_id": encoder_id, "resolution": resolution, "files": sorted(files)}


def load_or_build_latents(
    root: str | Path,
    resolution: int,
    encode: Callable[[Tensor], Tensor],
    encoder_id: str,
    cache_dir: Path | None = None,
    batch_size: int = 8,
    shard_size: int = 1024,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[RealLatents, ImageFolderScan]:
    """Latents of the captioned images in `root`, from the cache or encoded now.

    `encode` maps float32 CPU images [B, 3, R, R] in [-1, 1] to latents [B, C, h, w] (the
    caller handles device, dtype, posterior sampling and the scaling factor); results are
    kept as float32 on the CPU. The cache is `cache_dir/<key>/` (default cache_dir:
    `root/.dmd-cache`) and is only used once its manifest exists; a hit never calls `encode`.
    `progress(done, total)` is called after each encoded batch. Images that pass the scan
    but fail to decode are moved to `scan.skipped` (and remembered by the cache).
    """
    scan = scan_image_folder(root)
    cache_root = Path(cache_dir) if cache_dir is not None else scan.root / CACHE_DIRNAME
    inputs = _key_inputs(scan, encoder_id, resolution)
    key = _hash_inputs(inputs)
    final = cache_root / key
    if not (final / MANIFEST_FILE).is_file():
        _build_cache(scan, inputs, key, final, resolution, encode, batch_size, shard_size, progress)
    latents, build_skipped = _load_cache(final)
    _apply_build_skips(scan, build_skipped)
    return latents, scan


def _build_cache(
    scan: ImageFolderScan,
    inputs: dict,
    key: str,
    final: Path,
    resolution: int,
    encode: Callable[[Tensor], Tensor],
    batch_size: int,
    shard_size: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Encode every item and publish the cache atomically at `final`."""
    latents, kept, failed, upscaled = _encode_items(scan, resolution, encode, batch_size, progress)
    if not kept:
        raise DmdError(f"no images with captions in {scan.root} could be decoded")

    # In a unique temporary folder beside the final one: an interrupted build leaves only that,
    # which is never read as a cache, and ranks building at once do not collide.
    def write(tmp: Path) -> None:
        shards = _write_shards(tmp, latents, kept, shard_size)
        manifest = {
            "format": CACHE_FORMAT,
            "key": key,
            "encoder_id": inputs["encoder_id"],
            "resolution": resolution,
            "count": len(kept),
            "latent_shape": list(latents.shape[1:]),
            "shards": shards,
            "key_inputs": inputs,
            "skipped": failed,
            "upscaled": upscaled,
        }
        # The manifest goes last: a folder without one is never a finished cache.
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")

    atomic_folder(final, write, MANIFEST_FILE)


def _encode_items(
    scan: ImageFolderScan,
    resolution: int,
    encode: Callable[[Tensor], Tensor],
    batch_size: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[Tensor, list[tuple[str, str]], list[list[str]], int]:
    """Encode all items in batches: (latents float32 [N, C, h, w], kept (relpath, caption),
    failed [relpath, reason], how many kept images had a short side under `resolution`)."""
    chunks: list[Tensor] = []
    upscaled = 0
    kept: list[tuple[str, str]] = []
    failed: list[list[str]] = []
    total = len(scan.items)
    for start in range(0, total, batch_size):
        images = []
        for path, caption in scan.items[start : start + batch_size]:
            rel = relpath(scan.root, path)
            try:
                image, side = load_square(path, resolution)
            except DmdError as exc:  # passed verify() but does not decode (e.g. truncated)
                failed.append([rel, f"unreadable: {exc}"])
                continue
            images.append(image)
            kept.append((rel, caption))
            upscaled += side < resolution
        if images:
            with torch.no_grad():
                out = encode(torch.stack(images))
            if not isinstance(out, Tensor) or out.ndim != 4 or out.shape[0] != len(images):
                raise ValueError(f"encode returned {getattr(out, 'shape', type(out))} for {len(images)} images")
            chunks.append(out.detach().to("cpu", torch.float32).contiguous())
        if progress is not None:
            progress(min(start + batch_size, total), total)
    latents = torch.cat(chunks) if chunks else torch.empty(0, 0, 0, 0)
    return latents, kept, failed, upscaled


def _write_shards(folder: Path, latents: Tensor, kept: list[tuple[str, str]], shard_size: int) -> list[dict]:
    """Write latents [N, C, h, w] as shards of at most `shard_size`; returns their manifest entries."""
    shards = []
    for index, start in enumerate(range(0, len(kept), shard_size)):
        part = kept[start : start + shard_size]
        name = f"latents-{index:05d}.safetensors"
        metadata = {
            "captions": json.dumps([caption for _, caption in part]),
            "paths": json.dumps([rel for rel, _ in part]),
        }
        save_file({"latents": latents[start : start + len(part)].contiguous()}, str(folder / name), metadata=metadata)
        shards.append({"file": name, "count": len(part)})
    return shards


def _load_cache(folder: Path) -> tuple[RealLatents, dict[str, str]]:
    """Read a finished cache folder (manifest + shards) into memory; also returns the
    images that failed to decode while it was built (relative path -> reason)."""
    hint = f"delete the cache folder {folder} and run again"
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        shards = [(entry["file"], int(entry["count"])) for entry in manifest["shards"]]
        build_skipped = {str(rel): str(reason) for rel, reason in manifest.get("skipped", [])}
        upscaled = int(manifest.get("upscaled", 0))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DmdError(f"latent cache manifest {folder / MANIFEST_FILE} is unreadable ({exc}); {hint}") from None
    tensors, captions, paths = [], [], []
    for name, count in shards:
        latents, shard_captions, shard_paths = _read_shard(folder / name, hint)
        if latents.shape[0] != count or len(shard_captions) != count:
            raise DmdError(
                f"latent cache shard {folder / name} holds {latents.shape[0]} latents, expected {count}; {hint}"
            )
        tensors.append(latents)
        captions += shard_captions
        paths += shard_paths
    if not tensors:
        raise DmdError(f"latent cache {folder} lists no shards; {hint}")
    return RealLatents(torch.cat(tensors), captions, paths, cache_path=folder, upscaled=upscaled), build_skipped


def _read_shard(path: Path, hint: str) -> tuple[Tensor, list[str], list[str]]:
    """One shard: (latents float32 [n, C, h, w], captions, relative paths)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        latents = load_file(str(path))["latents"].to(torch.float32)
        captions = json.loads(metadata["captions"])
        paths = json.loads(metadata.get("paths", "[]")) or [""] * len(captions)
    except Exception as exc:  # safetensors raises its own error type for a corrupt header
        raise DmdError(f"latent cache shard {path} is unreadable ({exc}); {hint}") from None
    if latents.ndim != 4 or not isinstance(captions, list) or len(paths) != len(captions):
        raise DmdError(f"latent cache shard {path} has an unexpected layout; {hint}")
    return latents, [str(c) for c in captions], [str(p) for p in paths]


def _apply_build_skips(scan: ImageFolderScan, failed: dict[str, str]) -> None:
    """Move the images that failed to decode during the build from scan.items to scan.skipped,
    so the scan matches the dataset on a cache hit as well as on a fresh build."""
    if not failed:
        return
    keep = []
    for path, caption in scan.items:
        rel = relpath(scan.root, path)
        if rel in failed:
            scan.skipped.append((path, failed[rel]))
        else:
            keep.append((path, caption))
    scan.items = keep
