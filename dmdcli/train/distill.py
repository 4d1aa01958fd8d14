"""The `dmd distill` runtime: build the three networks from a teacher, run DMD2, fill the run folder.

The math lives in dmdcli.core and one iteration in dmdcli.train.step; this module is plumbing:
devices and precision (accelerate), data, optimizers, logging, sample grids and the student file.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from dmdcli.core.denoiser import Cond, expand_cond
from dmdcli.core.sampler import uses_cfg
from dmdcli.core.schedule import student_timesteps
from dmdcli.data.images import RealLatents, load_or_build_latents, scan_image_folder
from dmdcli.data.pairs import Pairs
from dmdcli.data.prompt_cache import GIB, PromptCache, build_prompt_cache
from dmdcli.data.prompts import read_prompts
from dmdcli.errors import DmdError, UsageError, describe_os_error, first_line
from dmdcli.models.lora import FAKE_SCORE_ADAPTER, LORA_TARGET_MODULES, load_lora_state_dict, lora_state_dict
from dmdcli.models.teacher import DEFAULT_CONDITIONING_TIMESTEP, Teacher, TeacherSpec, inspect_teacher
from dmdcli.models.unet import UNetDenoiser
from dmdcli.shapes.data import resolve_data
from dmdcli.train import rundir
from dmdcli.train.checkpoint import (
    CHECKPOINTS_DIR,
    checkpoint_keys,
    checkpoint_name,
    is_checkpoint,
    latest_checkpoint,
    optimizer_state,
    optimizer_state_dict,
    read_checkpoint,
    remove_leftovers,
    restore_rng,
    staging_dir,
    write_checkpoint,
    write_rng,
)
from dmdcli.train.config import DistillConfig, init_conflicts, resume_conflicts, write_config
from dmdcli.train.grids import COLLAPSE_RATIO, SampleGrid, diversity
from dmdcli.train.networks import build_networks, build_step
from dmdcli.train.sharding import (
    full_model_state,
    full_optimizer_state,
    load_full_model_state,
    load_full_optimizer_state,
)
from dmdcli.train.step import Batch


class UI(Protocol):
    """How the runtime talks to its user (rich in the CLI, silent in library use)."""

    def message(self, text: str) -> None: ...

    def task(self, description: str, total: int): ...  # context manager yielding update(done, logs)


class SilentUI:
    def message(self, text: str) -> None:
        pass

    def task(self, description: str, total: int):
        import contextlib

        return contextlib.nullcontext(lambda done, logs=None: None)


def read_user_files(config: DistillConfig, accelerator) -> tuple[list[str] | None, str | None]:
    """The prompts and the real-image folder: cheap checks of the user's files, before minutes of
    model loading."""
    prompts = read_prompts(config.prompts) if config.prompts else None
    with accelerator.main_process_first():  # `--data shapes`: the built-in world's images, rendered once
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

    def cache_prompts(self, teacher: Teacher, ui: UI, extra: list[str]) -> PromptCache | None:
        """Encode every prompt of the data and `extra` once, then drop the teacher's text encoders.

        None (and the encoders stay) when the cache would not fit in host memory: prompts are then
        encoded on the fly, as with --no-cache-prompts.
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
        if cache is None:
            ui.message(
                f"prompt cache: {count} prompts would take {size / GIB:.1f} GiB of host memory: encoding them on the "
                "fly "
                f"instead (the text encoders stay on {teacher.device})"
            )
            return None
        self.cache, self._rows = cache, [cache.rows(ps) for ps in lists]
        teacher.release_text_encoders()
        ui.message(f"prompt cache: {count} prompts, {size / GIB:.2f} GiB on the CPU; text encoders released")
        return cache

    def _cond(self, teacher: Teacher, which: int, picks: list[int]) -> Cond:
        """Conditioning of rows `picks` of prompt list `which` (0 prompts, 1 captions, 2 pair prompts)."""
        if self.cache is not None:
            return self.cache.take(self._rows[which][picks])
        prompts = self._lists()[which]
        return teacher.encode_prompts([prompts[i] for i in picks])

    def batch(
        self, teacher: Teacher, seed: int, iteration: int, batch_size: int, uncond: Cond | None, rank: int = 0
    ) -> Batch:
        """This process's batch of one iteration. The picks of prompts, real images and pairs come
        from (seed, iteration, rank) alone and the noise from the process's global generator
        (seeded per rank, saved in checkpoints), so a run is the same whether or not it was
        interrupted, and processes draw different data."""
        g = torch.Generator().manual_seed(seed * 7919 + iteration + rank * 1_000_000_007)
        picks = torch.randint(len(self.prompts), (batch_size,), generator=g).tolist()
        cond = self._cond(teacher, 0, picks)
        latent_shape = (batch_size, teacher.spec.latent_channels, *teacher.latent_size)
        noise = torch.randn(latent_shape, device=teacher.device)
        batch = Batch(noise=noise, cond=cond, uncond=expand_cond(uncond, batch_size) if uncond else None)
        if self.real is not None:
            real = torch.randint(len(self.real), (batch_size,), generator=g).tolist()
            batch.x_real = self.real.latents[real].to(teacher.device)
            batch.real_cond = self._cond(teacher, 1, real)
        if self.pairs is not None:
            pick = torch.randint(len(self.pairs), (batch_size,), generator=g).tolist()
            batch.pair_noise = self.pairs.noise[pick].to(teacher.device)
            batch.pair_latent = self.pairs.latent[pick].to(teacher.device)
            batch.pair_cond = self._cond(teacher, 2, pick)
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


class Distillation:
    """One configured run: teacher, the three networks, the DMD2 step and the run folder.

    With `resume`, the newest complete checkpoint in the run folder is loaded and training
    continues from its iteration: on CPU the result is bit-for-bit that of an uninterrupted run.
    """

    def __init__(self, config: DistillConfig, ui: UI, overwrite: bool = False, resume: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        precision = config.precision()
        # Under torchrun / accelerate launch this joins the process group (gloo on CPU).
        self.accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
        self.config, self.ui = config, ui if self.accelerator.is_main_process else SilentUI()
        ui = self.ui
        self.sharding = self._sharding(config, precision)
        self.spec: TeacherSpec = inspect_teacher(config.teacher)
        self.resolution = self.spec.training_resolution(config.resolution)
        self.out = rundir.run_folder(config.out, config.teacher, config.steps)
        self.checkpoint = self._checkpoint_to_resume() if resume else None
        # A resumed run's own checkpoint already holds what --init-from gave it.
        self.init_checkpoint = self._checkpoint_to_init_from() if config.init_from and not resume else None
        if not resume:
            rundir.check_run_folder(self.out, overwrite)
        prompts, self.data_folder = read_user_files(config, self.accelerator)

        frozen_dtype = config.frozen_dtype()
        device = self.accelerator.device

        ui.message(
            f"teacher: {self.spec.source} ({self.spec.layout}, {self.spec.prediction_type}) at {self.resolution}px "
            f"on {device}"
        )
        self.teacher = Teacher(
            self.spec, device, frozen_dtype, self.resolution, config.allow_pickle, encoder_dtype=torch.float32
        )
        if self.data_folder and not config.gan_term():  # no real latents to encode, no classifier head
            why = "--method dmd has no GAN term" if config.method == "dmd" else "both GAN weights are 0"
            if prompts is None:
                prompts = [caption for _, caption in scan_image_folder(self.data_folder).items]
                ui.message(f"{why}: --data serves only for its {len(prompts)} captions")
            else:
                ui.message(f"{why}: --data is not used")
            self.data = Data(prompts, None)
        else:
            with (
                self.accelerator.main_process_first()
            ):  # one process encodes the real images, the others read the cache
                self.data = load_data(self.data_folder, prompts, self.teacher, ui)
        self.uncond = self.teacher.empty_cond() if uses_cfg(config.guidance_scale) else None
        self.regression_distance, self.regression_distance_name = None, None
        if config.regression_weight > 0:
            self._load_regression(config, device)
        if note := self.teacher.truncation_note(self.data.all_prompts()):
            ui.message(note)
        # Every prompt of the run (the grid's are among the data's; "" for the GAN probe) encoded
        # once, so the text encoders leave the accelerator; no random numbers are drawn.
        cache = self.data.cache_prompts(self.teacher, ui, [""]) if config.cache_prompts else None
        self.encode = cache.encode if cache is not None else self.teacher.encode_prompts

        self.schedule = self.spec.schedule()
        conditioning = config.conditioning_timestep
        if conditioning is None:
            conditioning = DEFAULT_CONDITIONING_TIMESTEP[self.spec.layout]
        self.timesteps = student_timesteps(config.steps, self.schedule.num_train_timesteps, conditioning)
        self.conditioning_timestep = conditioning if config.steps == 1 else None
        # Seeded after loading, so that a run which encodes its real images and one that reads
        # them from the cache start training from the same random state; each process gets its
        # own stream (seed + process index) for its noise.
        set_seed(config.seed, device_specific=True)
        self._build_networks(device, frozen_dtype)
        self.grid = SampleGrid(
            self.data.prompts,
            config.grid_size,
            config.seed,
            self.encode,
            self.teacher.decode,
            (self.spec.latent_channels, *self.teacher.latent_size),
            device,
        )

    def _sharding(self, config: DistillConfig, precision: str):
        """FSDP options when the networks are to be sharded (--fsdp, or an FSDP accelerate config), else None."""
        from accelerate.utils import DistributedType

        from dmdcli.train.sharding import sharding_options

        if not (config.fsdp or self.accelerator.distributed_type == DistributedType.FSDP):
            return None
        if self.accelerator.num_processes < 2:
            raise UsageError(
                "--fsdp shards the networks across processes: launch with torchrun --nproc_per_node N "
                "(or accelerate launch) and N ≥ 2"
            )
        if config.lora_rank:
            raise UsageError(
                f"FSDP shards full-weight runs; --lora-rank {config.lora_rank} fits one GPU and trains "
                "data-parallel: drop --lora-rank or the FSDP launch configuration"
            )
        return sharding_options(self.accelerator, precision)

    def _load_regression(self, config: DistillConfig, device: torch.device) -> None:
        """DMD v1's regression: the distance that runs, and the teacher's pairs (made once, cached)."""
        from dmdcli.core.sampler import ddim_sample
        from dmdcli.data.pairs import default_pairs_dir, load_or_build_pairs, pair_key_inputs, teacher_identity
        from dmdcli.train.regression import build_distance

        self.regression_distance, self.regression_distance_name, note = build_distance(
            config.regression_distance, self.teacher.vae, self.teacher.scaling_factor
        )
        if note:
            self.ui.message(note)
        teacher, schedule = UNetDenoiser(self.teacher.unet.to(device)), self.spec.schedule()
        uncond = self.teacher.empty_cond() if uses_cfg(config.guidance_scale) else None

        def generate(noise: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            cond = self.teacher.encode_prompts(prompts)
            batch_uncond = expand_cond(uncond, len(prompts)) if uncond else None
            with self.accelerator.autocast():
                return ddim_sample(
                    teacher, schedule, noise.to(device), cond, batch_uncond, config.pair_steps, config.guidance_scale
                )

        inputs = pair_key_inputs(
            teacher_identity(self.spec.source, self.spec.layout, self.spec.prediction_type, self.spec.scheduler_config),
            self.data.prompts,
            config.seed,
            config.pair_steps,
            config.guidance_scale,
            self.resolution,
            config.pairs,
            config.precision(),
        )
        root = Path(config.pairs_dir) if config.pairs_dir else default_pairs_dir()
        with (
            self.accelerator.main_process_first(),
            self.ui.task(
                f"regression pairs ({config.pair_steps}-step DDIM of the teacher)", total=config.pairs
            ) as update,
        ):
            self.data.pairs = load_or_build_pairs(
                root,
                inputs,
                self.data.prompts,
                (self.spec.latent_channels, *self.teacher.latent_size),
                generate,
                batch_size=config.batch_size,
                progress=lambda done, total: update(done, None),
            )
        self.ui.message(
            f"regression: {len(self.data.pairs)} pairs {'made and cached' if self.data.pairs.built else 'reused'} in "
            f"{self.data.pairs.folder}; distance {self.regression_distance_name}, weight {config.regression_weight}"
            + (f" for the first {config.regression_iterations} iterations" if config.regression_iterations else "")
        )

    def _checkpoint_to_resume(self) -> Path:
        found = latest_checkpoint(self.out)
        if found is None:
            raise UsageError(f"nothing to resume: {self.out} holds no complete checkpoint")
        _, state = read_checkpoint(found, with_tensors=False)
        if state.get("world_size", 1) != self.accelerator.num_processes:
            raise UsageError(
                f"--resume with {self.accelerator.num_processes} process(es), but checkpoint {found.name} was "
                "written by "
                f"{state.get('world_size', 1)}: resume with the same number of processes"
            )
        conflicts = resume_conflicts(state["config"], self.config)
        if conflicts:
            details = ", ".join(f"{k} {before!r} → {now!r}" for k, before, now in conflicts)
            raise UsageError(f"--resume with a configuration that contradicts the checkpoint {found.name}: {details}")
        done = state["iteration"]
        if done > self.config.iterations:
            raise UsageError(
                f"{self.out} is already at iteration {done}, past --iterations {self.config.iterations}; raise it to "
                "continue"
            )
        if done == self.config.iterations:
            wrote = self._student_from_final_checkpoint(found, state)
            raise RunFinished(f"{self.out} is already at iteration {done}{wrote}; raise --iterations to continue")
        planned = state["config"].get("iterations")
        if self.config.lr_schedule != "constant" and planned != self.config.iterations:
            self.ui.message(
                f"the {self.config.lr_schedule} LR decay now spans {self.config.iterations} iterations instead of "
                f"{planned}: the LR goes up from where the run stopped and decays again"
            )
        return found

    def _student_from_final_checkpoint(self, found: Path, state: dict[str, Any]) -> str:
        """The student of a finished run, written from its last checkpoint when the run stopped
        between the two (a full disk, a kill); a note for the user, or "" when it was there."""
        student = self.out / rundir.STUDENT_FILE
        try:
            if rundir.read_student_info(student).get("iterations") == state["iteration"]:
                return ""
        except DmdError:  # missing or damaged
            pass
        if self.accelerator.is_main_process:
            tensors, _ = read_checkpoint(found)
            rundir.save_student(
                student,
                {k.removeprefix("generator."): v for k, v in tensors.items() if k.startswith("generator.")},
                state["student"],
            )
        self.accelerator.wait_for_everyone()
        return f" (its student was missing: written from checkpoint {found.name})"

    def _checkpoint_to_init_from(self) -> Path:
        source = Path(self.config.init_from)
        found = source if is_checkpoint(source) else latest_checkpoint(source)
        if found is None:
            raise UsageError(
                f"--init-from {source}: neither a checkpoint (RUN/checkpoints/iter-N) nor a run folder holding one"
            )
        _, state = read_checkpoint(found, with_tensors=False)
        conflicts = init_conflicts(state["config"], self.config)
        if conflicts:
            details = ", ".join(f"{k} {there!r} there, {here!r} here" for k, there, here in conflicts)
            raise UsageError(f"--init-from {found}: its networks are not this run's ({details})")
        return found

    def _build_networks(self, device: torch.device, frozen_dtype: torch.dtype) -> None:
        probe = None
        if self.data.real is not None:
            latent, empty = torch.zeros(1, self.spec.latent_channels, *self.teacher.latent_size), self.encode([""])
            probe = lambda fake_score, on: fake_score.bottleneck(  # noqa: E731
                latent.to(on), torch.zeros(1, dtype=torch.long, device=on), {k: v.to(on) for k, v in empty.items()}
            )
        self.nets = build_networks(self.teacher.unet, self.config, device, frozen_dtype, probe, sharding=self.sharding)
        self.step = build_step(
            self.nets,
            self.schedule,
            self.config,
            self.timesteps,
            self.accelerator,
            self.any_process,
            self.regression_distance,
        )
        self.generator = self.step.generator
        self.ui.message(self.nets.describe(self.config, self.timesteps))

    # -- checkpoints ---------------------------------------------------------------------------

    def _weights(self) -> dict[str, torch.Tensor]:
        """The trained weights under their checkpoint names (generator., fake_score., discriminator.):
        a LoRA adapter's or a whole network's. Sharded networks are gathered whole onto process 0
        (every process must call this; the others get {})."""
        nets, prefixed = self.nets, lambda prefix, sd: {prefix + k: v for k, v in sd.items()}  # noqa: E731
        if nets.sharded:
            return {
                **prefixed("generator.", full_model_state(nets.generator_unet)),
                **full_model_state(nets.fake_modules),
            }
        weights = prefixed(
            "generator.",
            lora_state_dict(nets.generator_unet) if self.config.lora_rank else nets.generator_unet.state_dict(),
        )
        fake = lora_state_dict(nets.fake_unet, FAKE_SCORE_ADAPTER) if nets.shared_base else nets.fake_unet.state_dict()
        weights.update(prefixed("fake_score.", fake))
        if nets.head is not None:
            weights.update(prefixed("discriminator.", nets.head.state_dict()))
        return weights

    def _optimizer_states(self) -> tuple[dict, dict]:
        """The two optimizers' state_dicts, keyed by parameter index (sharded: on process 0 only)."""
        nets, step = self.nets, self.step
        if nets.sharded:
            return (
                full_optimizer_state(nets.generator_unet, step.generator_optimizer),
                full_optimizer_state(nets.fake_modules, step.fake_optimizer),
            )
        return step.generator_optimizer.state_dict(), step.fake_optimizer.state_dict()

    def save_checkpoint(self, iteration: int, extra: dict[str, Any]) -> Path:
        """Everything needed to continue exactly: weights, optimizers, LR schedules, RNG states."""
        step = self.step
        tensors = self._weights()
        generator_state, fake_state = self._optimizer_states()
        opt_g, opt_g_json = optimizer_state(generator_state, "optimizer.generator")
        opt_f, opt_f_json = optimizer_state(fake_state, "optimizer.fake")
        student = {k[len("generator.") :]: v for k, v in tensors.items() if k.startswith("generator.")}
        tensors.update({**opt_g, **opt_f})
        state = {
            "config": self.config.to_dict(),
            "world_size": self.accelerator.num_processes,
            "skipped_updates": step.skipped_updates,
            "optimizers": {"generator": opt_g_json, "fake": opt_f_json},
            # LambdaLR's state is JSON-able: its lambdas (rebuilt from the config) appear as None.
            "lr_schedulers": {
                "generator": step.generator_lr_scheduler.state_dict(),
                "fake": step.fake_lr_scheduler.state_dict(),
            },
            # What `--model RUN/checkpoints/iter-N` needs to sample, score or export this generator.
            "student": self.student_info(iteration),
            **extra,
        }
        # Every process leaves its RNG state in a staging folder; the main one assembles the rest.
        acc, staged = self.accelerator, staging_dir(self.out, iteration)
        if acc.is_main_process:
            staged.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        write_rng(staged, acc.process_index)
        acc.wait_for_everyone()
        path = self.out / CHECKPOINTS_DIR / checkpoint_name(iteration)
        if acc.is_main_process:
            path = write_checkpoint(
                self.out, iteration, tensors, state, self.config.keep_checkpoints, staged, acc.num_processes
            )
            self.save_student(iteration, student)
        acc.wait_for_everyone()
        return path

    def restore(self, path: Path) -> dict[str, Any]:
        """Load a checkpoint written by `save_checkpoint`; returns its JSON state.

        Sharded networks: process 0 reads the tensors and FSDP sends each process its shards.
        """
        nets, step, main = self.nets, self.step, self.accelerator.is_main_process
        tensors, state = read_checkpoint(path, with_tensors=main or not nets.sharded)
        optimizers = [
            optimizer_state_dict(f"optimizer.{name}", tensors, state["optimizers"][name]) if tensors else {}
            for name in ("generator", "fake")
        ]
        self._load_weights(tensors, with_head=nets.head is not None)
        if nets.sharded:
            load_full_optimizer_state(nets.generator_unet, step.generator_optimizer, optimizers[0])
            load_full_optimizer_state(nets.fake_modules, step.fake_optimizer, optimizers[1])
        else:
            step.generator_optimizer.load_state_dict(optimizers[0])
            step.fake_optimizer.load_state_dict(optimizers[1])
        step.generator_lr_scheduler.load_state_dict(state["lr_schedulers"]["generator"])
        step.fake_lr_scheduler.load_state_dict(state["lr_schedulers"]["fake"])
        step.skipped_updates = state["skipped_updates"]
        restore_rng(path, self.accelerator.process_index)
        return state

    def initialize_from(self, path: Path) -> None:
        """--init-from: another run's generator, fake score and, when both runs have one, classifier
        head (a first stage without GAN has none: this run's starts fresh)."""
        nets, main = self.nets, self.accelerator.is_main_process
        tensors, _ = read_checkpoint(path, with_tensors=main or not nets.sharded)
        with_head = nets.head is not None and any(k.startswith("discriminator.") for k in checkpoint_keys(path))
        try:
            self._load_weights(tensors, with_head)
        except (RuntimeError, ValueError, KeyError) as e:  # shapes that differ, e.g. a head made at another resolution
            raise UsageError(f"--init-from {path}: its weights do not fit this run's networks ({first_line(e)})") from e
        self.ui.message(f"generator, fake score{' and GAN head' if with_head else ''} from {path}")

    def _load_weights(self, tensors: dict[str, torch.Tensor], with_head: bool) -> None:
        """The weights `_weights` names, back into the networks (the classifier head's if
        `with_head`). Sharded: process 0 holds the tensors and FSDP sends each process its shards."""
        nets = self.nets
        part = lambda prefix: {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        if nets.sharded:
            load_full_model_state(nets.generator_unet, part("generator."))
            if with_head:
                load_full_model_state(
                    nets.fake_modules,
                    {k: v for k, v in tensors.items() if k.startswith(("fake_score.", "discriminator."))},
                )
            else:
                load_full_model_state(nets.fake_unet, part("fake_score."))
            return
        if self.config.lora_rank:
            load_lora_state_dict(nets.generator_unet, part("generator."))
        else:
            nets.generator_unet.load_state_dict(part("generator."))
        if nets.shared_base:
            load_lora_state_dict(nets.fake_unet, part("fake_score."), FAKE_SCORE_ADAPTER)
        else:
            nets.fake_unet.load_state_dict(part("fake_score."))
        if with_head:
            nets.head.load_state_dict(part("discriminator."))

    # -- outputs -------------------------------------------------------------------------------

    def student_info(self, iterations_done: int) -> dict[str, Any]:
        c = self.config
        info = {
            "teacher": self.spec.source,
            "layout": self.spec.layout,
            "prediction_type": self.spec.prediction_type,
            "kind": "lora" if c.lora_rank else "full",
            "steps": c.steps,
            "timesteps": self.timesteps,
            "conditioning_timestep": self.conditioning_timestep,
            "resolution": self.resolution,
            "iterations": iterations_done,
            "guidance_scale": c.guidance_scale,
            "seed": c.seed,
        }
        if c.lora_rank:
            info.update(lora_rank=c.lora_rank, lora_alpha=c.lora_alpha_value(), lora_target_modules=LORA_TARGET_MODULES)
        return info

    def save_student(self, iterations_done: int, weights: dict[str, torch.Tensor]) -> Path:
        path = self.out / rundir.STUDENT_FILE
        rundir.save_student(path, weights, self.student_info(iterations_done))
        return path

    def teacher_diversity(self) -> float:
        """The collapse watch's reference: the teacher's grid (DDIM + CFG), saved as samples/teacher.png."""
        with self.accelerator.autocast():
            images = self.grid.teacher(
                self.step.dmd2.real_score,
                self.schedule,
                self.uncond,
                self.config.teacher_grid_steps,
                self.config.guidance_scale,
            )
        if self.accelerator.is_main_process:
            rundir.save_grid(images, self.out / rundir.SAMPLES_DIR / "teacher.png", columns=self.grid.seeds)
        return diversity(images, self.grid.seeds)

    def save_grid(self, iteration: int, teacher_diversity: float | None) -> tuple[Path, dict[str, float]]:
        """The student's grid at `iteration`, and its diversity (with a warning on collapse)."""
        with self.accelerator.autocast():
            images = self.grid.student(self.generator, self.schedule, self.timesteps)
        path = self.out / rundir.SAMPLES_DIR / f"iter-{iteration:06d}.png"
        if self.accelerator.is_main_process:
            rundir.save_grid(images, path, columns=self.grid.seeds)
        record = {"diversity": diversity(images, self.grid.seeds)}
        if teacher_diversity and math.isfinite(teacher_diversity) and teacher_diversity > 0:
            record["diversity_ratio"] = record["diversity"] / teacher_diversity
            if record["diversity_ratio"] < COLLAPSE_RATIO:
                self.ui.message(
                    f"warning: at iteration {iteration} the student's samples vary {record['diversity_ratio']:.0%} "
                    "as much "
                    "across seeds as the teacher's: possible mode collapse (see samples/)"
                )
        return path, record

    # -- the loop ------------------------------------------------------------------------------

    def any_process(self, flag: bool) -> bool:
        """True on every process if `flag` is true on any (so all processes take the same branch)."""
        return self.max_over_processes(int(flag)) > 0

    def max_over_processes(self, value: int) -> int:
        """The largest `value` of any process, the same on every process (a stop signal: 0 for none)."""
        if self.accelerator.num_processes == 1:
            return value
        return int(self.accelerator.reduce(torch.tensor([value], device=self.accelerator.device), "max").item())

    def run(self) -> dict[str, Any]:
        c, main = self.config, self.accelerator.is_main_process
        # Only the main process writes the run folder (metrics, grids, checkpoints, student). It
        # draws the grids alone, unless the networks are sharded: then every forward needs all.
        grids = main or self.nets.sharded
        metrics = rundir.MetricsLog(self.out / rundir.METRICS_FILE, enabled=main)
        if self.checkpoint is not None:
            if main and (removed := remove_leftovers(self.out)):
                self.ui.message(
                    f"removed {removed} unfinished checkpoint folder(s) that a killed run left in "
                    f"{self.out / CHECKPOINTS_DIR}"
                )
            self.accelerator.wait_for_everyone()
            state = self.restore(self.checkpoint)
            start_iteration, teacher_div = state["iteration"], state.get("teacher_diversity")
            metrics.truncate_after(start_iteration)  # lines a killed run wrote past its checkpoint
            self.ui.message(f"resuming from {self.checkpoint} (iteration {start_iteration})")
        else:
            start_iteration, teacher_div = 0, None
            if self.init_checkpoint is not None:  # before the run folder: weights that do not fit leave none
                self.initialize_from(self.init_checkpoint)
            if main:
                rundir.create_run_folder(self.out)
            if grids:
                teacher_div = self.teacher_diversity() if c.teacher_grid_steps else None
                if teacher_div is not None:
                    metrics.write({"iteration": 0, "diversity_teacher": teacher_div})
        if main:
            write_config(c, self.out / rundir.CONFIG_FILE, self.resolved())
        self.accelerator.wait_for_everyone()
        # The newest value of every logged loss and norm (the generator's come every TTUR-th
        # iteration): kept in checkpoints, so that a resumed run logs the lines a straight one would.
        latest: dict[str, float] = dict(state.get("latest", {})) if self.checkpoint is not None else {}
        extra = {"teacher_diversity": teacher_div, "latest": latest}

        start = last_log = time.perf_counter()
        last_log_iteration = start_iteration
        done = start_iteration
        with _StopOnSignal() as stop, self.ui.task("distilling", total=c.iterations) as update:
            update(done, None)
            for it in range(start_iteration, c.iterations):
                batch = self.data.batch(
                    self.teacher, c.seed, it, c.batch_size, self.uncond, self.accelerator.process_index
                )
                latest.update(self.step(batch, it))
                done = it + 1
                if done % c.log_every == 0 or done == c.iterations:
                    now = time.perf_counter()
                    metrics.write(
                        {
                            "iteration": done,
                            **latest,
                            "lr_generator": self.step.generator_optimizer.param_groups[0]["lr"],
                            "lr_fake": self.step.fake_optimizer.param_groups[0]["lr"],
                            "sec_per_iter": (now - last_log) / (done - last_log_iteration),
                            **(
                                {"regression_distance": self.regression_distance_name}
                                if self.regression_distance_name
                                else {}
                            ),
                        }
                    )
                    last_log, last_log_iteration = now, done
                if grids and c.sample_every and done % c.sample_every == 0 and done != c.iterations:
                    metrics.write({"iteration": done, **self.save_grid(done, teacher_div)[1]})
                if c.checkpoint_every and done % c.checkpoint_every == 0 and done != c.iterations:
                    self.save_checkpoint(done, extra)
                update(done, latest)
                signum = self.max_over_processes(stop.signal or 0)
                if signum and done != c.iterations:  # every process stops at the same iteration (the last: finish it)
                    path = self.save_checkpoint(done, extra)
                    if not main:  # one process says so, and every one exits with its code
                        raise SystemExit(128 + signum)
                    raise Interrupted(signum, done, path, self.out)
            # Still under the handler: a signal now lets the final grid and checkpoint finish.
            summary = {"out": str(self.out), "student": str(self.out / rundir.STUDENT_FILE), "iterations": done}
            if grids:
                grid, grid_record = self.save_grid(done, teacher_div)
                metrics.write({"iteration": done, **grid_record})
                summary.update(grid=str(grid), **grid_record)
            summary["checkpoint"] = str(self.save_checkpoint(done, extra))
        summary.update(
            seconds=round(time.perf_counter() - start, 3),
            losses={k: v for k, v in latest.items() if k.startswith("loss_")},
        )
        return summary

    def resolved(self) -> dict[str, Any]:
        return {
            "teacher": self.spec.source,
            "layout": self.spec.layout,
            "prediction_type": self.spec.prediction_type,
            "resolution": self.resolution,
            "timesteps": self.timesteps,
            "out": str(self.out),
            "gan": self.data.real is not None,
            "num_prompts": len(self.data.prompts),
            "method": self.config.method,
            "cached_prompts": len(self.data.cache) if self.data.cache is not None else None,
            "regression_distance": self.regression_distance_name,
            "regression_pairs": str(self.data.pairs.folder) if self.data.pairs is not None else None,
        }


class Interrupted(DmdError):
    """SIGINT / SIGTERM: the run stopped after a checkpoint; exit 130 / 143 as shells expect."""

    label = "stopped"  # as asked, not failed

    def __init__(self, signum: int, iteration: int, checkpoint: Path, out: Path):
        self.exit_code = 128 + signum
        super().__init__(
            f"interrupted at iteration {iteration}; checkpoint saved to {checkpoint}. "
            f"Continue with: dmd distill --out {out} --resume"
        )


class RunFinished(Exception):
    """--resume of a run that has done its --iterations: nothing to do (found before any model loads)."""


class WriteFailed(DmdError):
    """A write failed mid-run (most often a full disk): say which checkpoint the run continues from."""

    def __init__(self, error: OSError, out: Path):
        found = latest_checkpoint(out)
        hint = (
            f". Checkpoint {found} is complete; continue from it with: dmd distill --out {out} --resume"
            if found
            else ""
        )
        super().__init__(describe_os_error(error) + hint)


class _StopOnSignal:
    """Turn SIGINT/SIGTERM into a flag checked between iterations; a second Ctrl-C (SIGINT) stops
    at once. A signal that comes again within ESCALATE_AFTER seconds is the same one delivered
    twice, not a second request: torchrun forwards what it receives to processes that a
    terminal's Ctrl-C or a scheduler's `kill` of the process group already reached."""

    ESCALATE_AFTER = 0.5

    def __enter__(self) -> "_StopOnSignal":
        self.signal: int | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            self.signal, self.since = signum, time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - self.since >= self.ESCALATE_AFTER:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
