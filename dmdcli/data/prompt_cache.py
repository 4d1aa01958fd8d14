"""Every prompt a run uses, encoded once at start-up and kept on the CPU (`--cache-prompts`).

Training, the GAN's real captions, the regression pairs, the sample grid and the empty prompt are
encoded in batches before the first iteration; afterwards a batch of conditionings is a row
lookup in CPU tensors moved to the device, and the text encoders can leave the accelerator.

The cached rows are exactly what `Teacher.encode_prompts` returned for the batches they were
encoded in. They are stored in the teacher's frozen dtype where that loses nothing (`encode_prompts`
rounds the encoders' output to it, so caching in bf16 halves host memory), else in float32 (time ids
a bf16 would round), and come back as float32, as `encode_prompts` returns them. Encoding consumes
no random numbers.

A conditioning K that comes with a mask K_mask (Qwen-Image's text) is kept only up to the last
position any cached prompt uses: the teacher pads each prompt to its pipeline's 512 positions,
zeros its mask leaves out, so this keeps the same values and a fraction of the memory.

More prompts than the host limit holds (FLUX's T5 text is 4 MiB a prompt in bf16: ~2,000 fill
8 GiB) are cached on disk instead (`DiskPromptCache`): safetensors shards in the cache folder,
keyed by the teacher's text encoders and the prompts, read a row at a time through safetensors'
memory map; made once by the main process, read by every process and by later runs (a resume).
The disk caches together are kept under a size limit (`$DMD_PROMPT_CACHE_GIB`, default 100): when
a new one takes them over it, the least recently used others are removed (`evict_disk_caches`).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor

from dmdcli.core.denoiser import MASK, Cond, cat_cond, is_masked, pad_positions, used_positions

GIB = 2**30
HOST_LIMIT = 8 * GIB  # per process: above this the cache goes to disk (or, without one, prompts are encoded on the fly)
ENCODE_BATCH = 64
SHARD_BYTES = GIB  # a disk cache's rows per safetensors file, about
DISK_FORMAT = 1
DISK_INDEX = "index.json"  # written last: a folder without it is incomplete
DISK_LIMIT_VARIABLE, DISK_LIMIT_GIB = "DMD_PROMPT_CACHE_GIB", 100.0  # all disk prompt caches together


class PromptCache:
    """Conditioning rows [N, ...] on the CPU, one per distinct prompt, fetched by row index."""

    def __init__(self, table: Cond, rows: dict[str, int], device: torch.device):
        self.table, self.row_of, self.device = table, rows, device

    def __len__(self) -> int:
        return len(self.row_of)

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.table.values())

    def rows(self, prompts: list[str]) -> Tensor:
        """The cache rows of `prompts` (a dictionary lookup, once per prompt list; KeyError if not cached)."""
        return torch.tensor([self.row_of[p] for p in prompts], dtype=torch.long)

    def take(self, rows: Tensor, device: torch.device | None = None) -> Cond:
        """The conditioning of cache rows `rows`, float32 on `device` (default: the cache's)."""
        return {k: v[rows].to(device or self.device, torch.float32) for k, v in self.table.items()}

    def encode(self, prompts: list[str]) -> Cond:
        """A stand-in for `Teacher.encode_prompts` on prompts that were cached."""
        return self.take(self.rows(prompts))


def build_prompt_cache(
    encode: Callable[[list[str]], Cond],
    prompts: Iterable[str],
    dtype: torch.dtype,
    device: torch.device,
    progress: Callable[[int], None] = lambda done: None,
    batch_size: int = ENCODE_BATCH,
    limit: int | None = None,
) -> tuple[PromptCache | None, int]:
    """Encode every distinct prompt once, `batch_size` at a time.

    Returns (cache, bytes): bytes is the host memory the cache takes, or, when that would exceed
    `limit` (default HOST_LIMIT), would take; then the cache is None (known after one batch).
    """
    limit = HOST_LIMIT if limit is None else limit
    distinct = list(dict.fromkeys(prompts))
    table: Cond = {}
    for start in range(0, len(distinct), batch_size):
        cond = _cut_padding(encode(distinct[start : start + batch_size]))
        if not table:
            table = {k: torch.empty((len(distinct), *v.shape[1:]), dtype=dtype) for k, v in cond.items()}
        needed = sum(_row_bytes(table[k], v) * len(distinct) for k, v in cond.items())  # with this batch's widths
        if needed > limit:
            return None, needed
        for k, v in cond.items():
            v = v.detach().cpu()
            if is_masked(k, cond):  # a longer prompt widens the table; a shorter batch is padded to it
                table[k], v = pad_positions(table[k], v.shape[1]), pad_positions(v, table[k].shape[1])
            if not _holds(table[k].dtype, v):
                table[k] = table[k].to(v.dtype)  # the narrower dtype would round these values: keep them whole
            table[k][start : start + len(v)] = v
        progress(min(start + batch_size, len(distinct)))
    cache = PromptCache(table, {p: i for i, p in enumerate(distinct)}, device)
    return cache, cache.nbytes


class DiskPromptCache(PromptCache):
    """A PromptCache whose rows are in the safetensors shards of `folder` (`write_disk_prompt_cache`)."""

    def __init__(self, folder: Path, prompts: list[str], device: torch.device):
        from safetensors import safe_open

        from dmdcli.files import read_json

        self.folder = Path(folder)
        shards = read_json(self.folder / DISK_INDEX)["shards"]  # [[file, first row], ...]
        self.files = [safe_open(str(self.folder / name), framework="pt") for name, _ in shards]
        self.starts = [first for _, first in shards]
        super().__init__({}, {p: i for i, p in enumerate(dict.fromkeys(prompts))}, device)

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("*.safetensors"))

    def take(self, rows: Tensor, device: torch.device | None = None) -> Cond:
        parts = []
        for row in rows.tolist():
            shard = bisect.bisect_right(self.starts, row) - 1
            file, i = self.files[shard], row - self.starts[shard]
            parts.append({k: file.get_slice(k)[i : i + 1] for k in file.keys()})
        return {k: v.to(device or self.device, torch.float32) for k, v in cat_cond(*parts).items()}


def disk_cache_limit() -> int:
    """Bytes the disk prompt caches may hold together: $DMD_PROMPT_CACHE_GIB, else 100 GiB."""
    from dmdcli.errors import UsageError

    value = os.environ.get(DISK_LIMIT_VARIABLE, "").strip() or str(DISK_LIMIT_GIB)
    try:
        gib = float(value)
    except ValueError:
        gib = -1.0
    if not gib >= 0:
        raise UsageError(f"{DISK_LIMIT_VARIABLE}={value!r} is not a size in GiB (a number, 0 or more)")
    return int(gib * GIB)


def touch_disk_cache(folder: Path) -> None:
    """Mark a disk cache as just used (its index's mtime orders the eviction); best effort."""
    try:
        os.utime(folder / DISK_INDEX)
    except OSError:
        pass


def evict_disk_caches(root: Path, keep: Path, limit: int) -> tuple[int, int]:
    """Remove the least recently used complete disk caches under `root`, never `keep`, until they
    hold at most `limit` bytes together; (caches removed, their bytes). Folders without an index
    (being written, or debris of an interrupted write) are left alone. A run reading a removed
    cache keeps its open files (POSIX); a later resume encodes its prompts again."""
    caches = []
    for folder in Path(root).iterdir() if Path(root).is_dir() else ():
        index = folder / DISK_INDEX
        if folder.is_dir() and index.is_file():
            size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            caches.append((index.stat().st_mtime, folder, size))
    total, removed, freed = sum(size for _, _, size in caches), 0, 0
    for _, folder, size in sorted(caches, key=lambda c: c[0]):  # oldest use first
        if total <= limit:
            break
        if folder.resolve() == Path(keep).resolve():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        total, removed, freed = total - size, removed + 1, freed + size
    return removed, freed


def disk_cache_key(encoder_id: dict, prompts: list[str], dtype: torch.dtype) -> str:
    """The folder name of a disk prompt cache: what the encoders are (`Teacher.prompt_cache_id`),
    the distinct prompts in order, the storage dtype."""
    distinct = list(dict.fromkeys(prompts))
    inputs = {"format": DISK_FORMAT, "encoder": encoder_id, "dtype": str(dtype), "prompts": distinct}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def write_disk_prompt_cache(
    folder: Path,
    encode: Callable[[list[str]], Cond],
    prompts: Iterable[str],
    dtype: torch.dtype,
    progress: Callable[[int], None] = lambda done: None,
    batch_size: int = ENCODE_BATCH,
    shard_bytes: int = SHARD_BYTES,
) -> None:
    """Encode every distinct prompt once into safetensors shards of about `shard_bytes` in `folder`,
    each key in `dtype` where that loses nothing (as the in-memory cache), then the index."""
    from dmdcli.files import save_file

    distinct = list(dict.fromkeys(prompts))
    shards, pending, first, pending_bytes = [], [], 0, 0

    def flush() -> None:
        nonlocal first, pending_bytes
        rows = _cut_padding(cat_cond(*pending))
        stored = {k: v.to(dtype) if _holds(dtype, v) else v for k, v in rows.items()}
        name = f"rows-{len(shards):05d}.safetensors"
        save_file(stored, folder / name)
        shards.append([name, first])
        first += len(next(iter(rows.values())))
        pending.clear()
        pending_bytes = 0

    for start in range(0, len(distinct), batch_size):
        pending.append({k: v.detach().cpu() for k, v in encode(distinct[start : start + batch_size]).items()})
        pending_bytes += sum(v.numel() * v.element_size() for v in pending[-1].values())
        if pending_bytes >= shard_bytes:
            flush()
        progress(min(start + batch_size, len(distinct)))
    if pending:
        flush()
    (folder / DISK_INDEX).write_text(json.dumps({"format": DISK_FORMAT, "rows": len(distinct), "shards": shards}))


def _holds(dtype: torch.dtype, v: Tensor) -> bool:
    """Whether `dtype` holds `v`'s values exactly (the storage dtype where that loses nothing)."""
    return v.dtype == dtype or torch.equal(v.to(dtype).to(v.dtype), v)


def _row_bytes(stored: Tensor, batch: Tensor) -> int:
    """Bytes of one row of `stored` once it holds `batch`'s rows (a masked conditioning may widen it)."""
    row = stored[0].numel() * stored.element_size()
    if stored.ndim > 1 and batch.shape[1] > stored.shape[1]:
        row = row // stored.shape[1] * batch.shape[1]
    return row


def _cut_padding(cond: Cond) -> Cond:
    """Each masked conditioning and its mask cut after the last position any row's mask keeps."""
    cut = dict(cond)
    for key in [k for k in cond if f"{k}{MASK}" in cond]:
        n = used_positions(cond[f"{key}{MASK}"])
        cut[key], cut[f"{key}{MASK}"] = cond[key][:, :n], cond[f"{key}{MASK}"][:, :n]
    return cut
