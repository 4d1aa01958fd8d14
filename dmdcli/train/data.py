"""A run's data: the user's prompts and images, the prompt cache, and each iteration's batch."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dmdcli.core.denoiser import Cond, expand_cond
from dmdcli.data import prompt_cache
from dmdcli.data.latents import RealLatents, load_or_build_latents
from dmdcli.data.pairs import Pairs
from dmdcli.data.prompt_cache import (
    DISK_INDEX,
    DISK_LIMIT_VARIABLE,
    GIB,
    DiskPromptCache,
    PromptCache,
    build_prompt_cache,
    disk_cache_key,
    disk_cache_limit,
    evict_disk_caches,
    touch_disk_cache,
    write_disk_prompt_cache,
)
from dmdcli.data.prompts import read_prompts
from dmdcli.errors import UsageError, first_line
from dmdcli.files import atomic_folder, cache_dir
from dmdcli.models.families import resolve_data
from dmdcli.models.pipeline import PipelineTeacher as Teacher
from dmdcli.train.step import Batch
from dmdcli.train.ui import UI


def read_user_files(config, accelerator) -> tuple[list[str] | None, str | None]:
    """The prompts and the real-image folder: cheap checks of the user's files, before minutes of
    model loading."""
    prompts = read_prompts(config.prompts) if config.prompts else None
    with accelerator.main_process_first():  # a registered data set's folder, made once
        folder = resolve_data(config.data)
    if folder and not Path(folder).is_dir():
        raise UsageError(f"image folder not found: {config.data}")
    return prompts, folder


@dataclass
class Data:
    """Prompts for distribution matching and, optionally, real latents + captions for the GAN."""

    prompts: list[str]
    real: RealLatents | None
    pairs: Pairs | None = None  # DMD v1's regression pairs
    cache: PromptCache | None = None  # every prompt above encoded once (`cache_prompts`)
    _rows: list[torch.Tensor] = field(default_factory=list, repr=False)  # cache rows of each of _lists()

    def _lists(self) -> list[list[str]]:
        return [self.prompts, self.real.captions if self.real else [], self.pairs.prompts if self.pairs else []]

    def all_prompts(self) -> list[str]:
        return [p for ps in self._lists() for p in ps]

    def cache_prompts(
        self, teacher: Teacher, ui: UI, extra: list[str], first: Callable[[], AbstractContextManager] = nullcontext
    ) -> PromptCache | None:
        """Encode every prompt of the data and `extra` once, then drop the teacher's text encoders.

        When the cache would not fit in host memory it is kept on disk (`first`: the context in
        which the main process makes it before the others read it). None (and the encoders stay)
        when the disk cannot hold it either: prompts are then encoded on the fly, as with
        --no-cache-prompts.
        """
        lists = self._lists()
        count = len(set().union(*lists, extra))
        with ui.task(f"encoding {count} prompts once (cached on the CPU)", total=count) as update:
            cache, size = build_prompt_cache(
                teacher.encode_prompts,
                self.all_prompts() + extra,
                teacher.dtype,
                teacher.device,
                progress=lambda done: update(done, None),
            )
        said = f"{count} prompts, {size / GIB:.2f} GiB on the CPU"
        if cache is None:
            limit = prompt_cache.HOST_LIMIT / GIB
            over = f"{count} prompts would take {size / GIB:.1f} GiB of host memory (over {limit:.0f})"
            try:
                cache, made = self._disk_cache(teacher, ui, self.all_prompts() + extra, count, first)
            except OSError as e:
                ui.message(
                    f"prompt cache: {over}, and the disk cache could not be written ({first_line(e)}): encoding them "
                    f"on the fly instead (the text encoders stay on {teacher.device})"
                )
                return None
            how = "made" if made else "reused"
            said = f"{over}: on disk instead, {cache.nbytes / GIB:.2f} GiB {how} in {cache.folder}"
        self.cache, self._rows = cache, [cache.rows(ps) for ps in lists]
        teacher.release_text_encoders()
        ui.message(f"prompt cache: {said}; text encoders released")
        return cache

    @staticmethod
    def _disk_cache(
        teacher: Teacher, ui: UI, prompts: list[str], count: int, first: Callable[[], AbstractContextManager]
    ) -> tuple[DiskPromptCache, bool]:
        """The prompts' disk cache in the cache folder, made (by the main process) unless there; a new
        one makes room for itself under the caches' size limit (`evict_disk_caches`)."""
        root, limit = cache_dir("prompts"), disk_cache_limit()  # (a bad limit: said by every process, first)
        folder = root / disk_cache_key(teacher.prompt_cache_id, prompts, teacher.dtype)
        made, failed = False, None
        with first():
            if (folder / DISK_INDEX).is_file():
                touch_disk_cache(folder)
            else:
                try:
                    with ui.task(f"encoding {count} prompts once (cached on disk)", total=count) as update:
                        atomic_folder(
                            folder,
                            lambda tmp: write_disk_prompt_cache(
                                tmp, teacher.encode_prompts, prompts, teacher.dtype, lambda done: update(done, None)
                            ),
                            DISK_INDEX,
                        )
                    made = True
                    removed, freed = evict_disk_caches(root, folder, limit)
                    if removed:
                        ui.message(
                            f"prompt cache: removed the {removed} least recently used disk cache(s) in {root} "
                            f"({freed / GIB:.1f} GiB) to stay within {limit / GIB:g} GiB ({DISK_LIMIT_VARIABLE})"
                        )
                except OSError as e:  # raised after the block, so that the other processes are not left waiting
                    failed = e
        if failed is not None:
            raise failed
        return DiskPromptCache(folder, prompts, teacher.device), made

    def _cond(self, teacher: Teacher, which: int, picks: list[int], on: torch.device) -> Cond:
        """Conditioning of rows `picks` of prompt list `which` (0 prompts, 1 captions, 2 pair prompts)."""
        if self.cache is not None:
            return self.cache.take(self._rows[which][picks], on)
        prompts = self._lists()[which]
        return {k: v.to(on) for k, v in teacher.encode_prompts([prompts[i] for i in picks]).items()}

    def batch(
        self,
        teacher: Teacher,
        seed: int,
        iteration: int,
        batch_size: int,
        uncond: Cond | None,
        rank: int = 0,
        micro_batches: int = 1,
    ) -> Batch:
        """This process's batch of one iteration: `micro_batches` × `batch_size` rows, drawn as one
        batch of them all. The picks of prompts, real images and pairs come from (seed, iteration,
        rank) alone and the noise from the process's global generator (seeded per rank, saved in
        checkpoints), so a run is the same whether or not it was interrupted, and processes draw
        different data. Several micro-batches stay on the host but for their noise: the step moves
        one at a time to the device."""
        on = torch.device("cpu") if micro_batches > 1 else teacher.device
        batch_size *= micro_batches
        g = torch.Generator().manual_seed(seed * 7919 + iteration + rank * 1_000_000_007)
        picks = torch.randint(len(self.prompts), (batch_size,), generator=g).tolist()
        cond = self._cond(teacher, 0, picks, on)
        latent_shape = (batch_size, teacher.spec.latent_channels, *teacher.latent_size)
        noise = torch.randn(latent_shape, device=teacher.device)
        batch = Batch(noise=noise, cond=cond, uncond=expand_cond(uncond, batch_size) if uncond else None)
        if self.real is not None:
            real = torch.randint(len(self.real), (batch_size,), generator=g).tolist()
            batch.x_real = self.real.latents[real].to(on)
            batch.real_cond = self._cond(teacher, 1, real, on)
        if self.pairs is not None:
            pick = torch.randint(len(self.pairs), (batch_size,), generator=g).tolist()
            batch.pair_noise = self.pairs.noise[pick].to(on)
            batch.pair_latent = self.pairs.latent[pick].to(on)
            batch.pair_cond = self._cond(teacher, 2, pick, on)
        return batch


def load_data(folder: str | None, prompts: list[str] | None, teacher: Teacher, ui: UI) -> Data:
    real = None
    if folder:
        with ui.task("real images (VAE-encoded on first use, then cached)", total=0) as update:
            real, scan = load_or_build_latents(
                folder,
                teacher.resolution,
                teacher.encode_images,
                encoder_id=teacher.latent_cache_id,
                progress=lambda done, total: update(done, {"total": total}),
            )
        details = [f"{len(scan.skipped)} skipped"] if scan.skipped else []
        details += [f"{real.upscaled} smaller than {teacher.resolution} px, upscaled"] if real.upscaled else []
        ui.message(f"real images: {len(real)} from {folder}" + (f" ({'; '.join(details)})" if details else ""))
        for path, reason in scan.skipped[:5]:
            ui.message(f"  skipped {path}: {reason}")
    else:
        ui.message("no --data: the GAN term is off (distribution matching only)")
    return Data(prompts or real.captions, real)
