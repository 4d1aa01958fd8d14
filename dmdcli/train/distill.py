"""The `dmd distill` runtime for DMD2 (and DMD v1): the run's networks, its loop, its outputs.

The math lives in dmdcli.core and one iteration in dmdcli.train.step. Around the loop: the shared
run start (setup), the data (data), the network layout (layouts), checkpoints and the student
(state), signals and the errors they raise (stop), the user interface (ui).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from dmdcli import runfiles
from dmdcli.core.sampler import uses_cfg
from dmdcli.core.schedule import student_timesteps
from dmdcli.data.images import scan_image_folder
from dmdcli.errors import UsageError
from dmdcli.runfiles import CHECKPOINTS_DIR
from dmdcli.train import rundir
from dmdcli.train.checkpoint import remove_leftovers
from dmdcli.train.config import DistillConfig, write_config
from dmdcli.train.data import Data, load_data
from dmdcli.train.grids import COLLAPSE_RATIO, SampleGrid, diversity
from dmdcli.train.layouts import layout_for
from dmdcli.train.memory import over_memory_note
from dmdcli.train.networks import build_step
from dmdcli.train.setup import Run
from dmdcli.train.state import Checkpoints, checkpoint_to_init_from, checkpoint_to_resume, student_info
from dmdcli.train.step import Batch
from dmdcli.train.stop import Interrupted, StopOnSignal
from dmdcli.train.ui import UI


class Distillation(Run):
    """One configured run: teacher, the three networks, the DMD2 step and the run folder.

    With `resume`, the newest complete checkpoint in the run folder is loaded and training
    continues from its iteration: on CPU the result is bit-for-bit that of an uninterrupted run.
    """

    def __init__(self, config: DistillConfig, ui: UI, overwrite: bool = False, resume: bool = False):
        from accelerate.utils import set_seed

        super().__init__(config, ui)
        ui = self.ui
        self.layout = layout_for(
            config, self.family.lora_targets, self._sharding(config), self.accelerator.num_processes
        )
        self.checkpoint = checkpoint_to_resume(self.out, config, self.accelerator, ui) if resume else None
        # A resumed run's own checkpoint already holds what --init-from gave it.
        self.init_checkpoint = checkpoint_to_init_from(config) if config.init_from and not resume else None
        if not resume:
            rundir.check_run_folder(self.out, overwrite)
        prompts = self.load_teacher(self.layout.frozen_network)
        self.data = self._load_data(prompts)
        self.uncond = self.teacher.empty_cond() if uses_cfg(config.guidance_scale) else None
        self.regression_distance, self.regression_distance_name = None, None
        if config.regression_weight > 0:
            from dmdcli.train.regression import load_regression

            self.regression_distance, self.regression_distance_name, self.data.pairs = load_regression(
                self, self.data.prompts
            )
        if note := self.teacher.truncation_note(self.data.all_prompts()):
            ui.message(note)
        # Every prompt of the run (the grid's are among the data's; "" for the GAN probe) encoded
        # once, so the text encoders leave the accelerator; no random numbers are drawn.
        first = self.accelerator.main_process_first
        cache = self.data.cache_prompts(self.teacher, ui, [""], first) if config.cache_prompts else None
        self.encode = cache.encode if cache is not None else self.teacher.encode_prompts

        conditioning = config.conditioning_timestep
        if conditioning is None:
            conditioning = self.family.conditioning_timestep
        self.timesteps = config.student_timestep_list() or student_timesteps(
            config.steps, self.schedule.num_train_timesteps, conditioning
        )
        self.conditioning_timestep = self.timesteps[0] if config.steps == 1 else None
        # Seeded after loading, so that a run which encodes its real images and one that reads
        # them from the cache start training from the same random state; each process gets its
        # own stream (seed + process index) for its noise.
        set_seed(config.seed, device_specific=True)
        self._build_networks()
        self.checkpoints = Checkpoints(
            self.out,
            self.config_to_record(),
            self.accelerator,
            self.layout,
            self.nets,
            self.step,
            ui,
            self.student_info,
        )
        self.grid = SampleGrid(
            self.data.prompts,
            config.grid_size,
            config.seed,
            self.encode,
            self.teacher.decode,
            (self.spec.latent_channels, *self.teacher.latent_size),
            self.accelerator.device,
        )

    def memory_note(self) -> str | None:
        if not self.accelerator.is_main_process:
            return None
        accelerator = self.accelerator
        return over_memory_note(self.spec, self.config, self.resolution, accelerator.device, accelerator.num_processes)

    def _sharding(self, config: DistillConfig):
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
        return sharding_options(self.accelerator, config.precision())

    def _load_data(self, prompts: list[str] | None) -> Data:
        """The prompts and, when the GAN term is on, the real images' latents."""
        if self.config.regression_only() and not self.data_folder:
            return Data(prompts, None)  # no "GAN off" note: the start line says what trains
        if self.data_folder and not self.config.gan_term():  # no real latents to encode, no classifier head
            why = "--method dmd has no GAN term" if self.config.method == "dmd" else "both GAN weights are 0"
            hint = (
                ""
                if self.config.method == "dmd"
                else " (for a GAN: --gan-generator-weight 1e-3 --gan-discriminator-weight 1e-2, the reference's "
                "SD1.5 stage 2, or a recipe that sets them)"
            )
            if prompts is None:
                prompts = [caption for _, caption in scan_image_folder(self.data_folder).items]
                self.ui.message(f"{why}: --data serves only for its {len(prompts)} captions{hint}")
            else:
                self.ui.message(f"{why}: --data is not used{hint}")
            return Data(prompts, None)
        with self.accelerator.main_process_first():  # one process encodes the real images, the others read the cache
            data = load_data(self.data_folder, prompts, self.teacher, self.ui)
        if prompts is not None and data.real is not None and self.config.prompts_from_captions:
            self.ui.message(
                f"prompts: the {len(data.real.captions)} captions of --data, not --prompts ({len(prompts)}), as the "
                "reference's SDXL 4-step runs (prompts_from_captions; --no-prompts-from-captions for --prompts)"
            )
            data = Data(data.real.captions, data.real)
        return data

    def _build_networks(self) -> None:
        probe = None
        if self.data.real is not None:
            latent, empty = torch.zeros(1, self.spec.latent_channels, *self.teacher.latent_size), self.encode([""])
            probe = lambda fake_score, on: self.denoiser(fake_score).bottleneck(  # noqa: E731
                latent.to(on), torch.zeros(1, dtype=torch.long, device=on), {k: v.to(on) for k, v in empty.items()}
            )
        device, frozen_dtype = self.accelerator.device, self.config.frozen_dtype()
        self.nets = self.layout.build(self.teacher.network, device, frozen_dtype, probe)
        self.step = build_step(
            self.nets,
            self.denoiser,
            self.layout.data_parallel(self.accelerator),
            self.schedule,
            self.config,
            self.timesteps,
            self.accelerator,
            self.any_process,
            self.regression_distance,
            self.accumulation_steps,
        )
        self.generator = self.step.generator
        at = f"t = {self.timesteps}"
        if self.schedule.is_flow:  # the indices of the shifted table, and what they stand for
            at += f" (σ = {', '.join(f'{float(self.schedule.sigmas[t]):.3g}' for t in self.timesteps)})"
        self.ui.message(self.layout.describe(self.nets, at))
        processes, micro = self.accelerator.num_processes, self.accumulation_steps
        if processes > 1 or micro > 1:
            self.ui.message(
                f"batch of each update: {self.config.batch_size * processes * micro} ({self.config.batch_size} a "
                f"micro-batch × {micro} micro-batch{'es' * (micro > 1)} × {processes} process{'es' * (processes > 1)})"
            )

    # -- outputs -------------------------------------------------------------------------------

    def student_info(self, iterations_done: int) -> dict[str, Any]:
        return student_info(
            self.config, self.spec, self.resolution, self.timesteps, self.conditioning_timestep, iterations_done
        )

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

    def _begin(self, metrics: rundir.MetricsLog, grids: bool) -> tuple[int, float | None, dict[str, float]]:
        """Resume from the checkpoint, or start the run folder (from --init-from's weights, with
        the teacher's grid); returns (first iteration, the teacher's diversity, the newest logs)."""
        c, main = self.config, self.accelerator.is_main_process
        latest: dict[str, float] = {}
        if self.checkpoint is not None:
            if main and (removed := remove_leftovers(self.out)):
                self.ui.message(
                    f"removed {removed} unfinished checkpoint folder(s) that a killed run left in "
                    f"{self.out / CHECKPOINTS_DIR}"
                )
            self.accelerator.wait_for_everyone()
            state = self.checkpoints.restore(self.checkpoint)
            start_iteration, teacher_div = state["iteration"], state.get("teacher_diversity")
            # The newest value of every logged loss and norm (the generator's come every TTUR-th
            # iteration): kept in checkpoints, so that a resumed run logs the lines a straight one would.
            latest = dict(state.get("latest", {}))
            metrics.truncate_after(start_iteration)  # lines a killed run wrote past its checkpoint
            self.ui.message(f"resuming from {self.checkpoint} (iteration {start_iteration})")
        else:
            start_iteration, teacher_div = 0, None
            if self.init_checkpoint is not None:  # before the run folder: weights that do not fit leave none
                self.checkpoints.initialize_from(self.init_checkpoint)
            if main:
                rundir.create_run_folder(self.out)
            if grids:
                teacher_div = self.teacher_diversity() if c.teacher_grid_steps else None
                if teacher_div is not None:
                    metrics.write({"iteration": 0, "diversity_teacher": teacher_div})
        if main:
            self.keep_prompts()
            write_config(self.config_to_record(), self.out / runfiles.CONFIG_FILE, self.resolved())
        self.accelerator.wait_for_everyone()
        return start_iteration, teacher_div, latest

    def _log_record(self, done: int, latest: dict[str, float], seconds_per_iteration: float) -> dict[str, Any]:
        return {
            "iteration": done,
            **latest,
            "lr_generator": self.step.generator_optimizer.param_groups[0]["lr"],
            "lr_fake": self.step.fake_optimizer.param_groups[0]["lr"],
            "sec_per_iter": seconds_per_iteration,
            **({"regression_distance": self.regression_distance_name} if self.regression_distance_name else {}),
        }

    def batch(self, iteration: int) -> Batch:
        """This process's batch of `iteration`: --batch-size × its micro-batches."""
        c = self.config
        rank, micro = self.accelerator.process_index, self.accumulation_steps
        return self.data.batch(self.teacher, c.seed, iteration, c.batch_size, self.uncond, rank, micro)

    def run(self) -> dict[str, Any]:
        c, main = self.config, self.accelerator.is_main_process
        # Only the main process writes the run folder (metrics, grids, checkpoints, student); the
        # layout says which processes draw the grids (all, when every forward needs every process).
        grids = self.layout.draws_grids(main)
        metrics = rundir.MetricsLog(self.out / runfiles.METRICS_FILE, enabled=main)
        start_iteration, teacher_div, latest = self._begin(metrics, grids)
        extra = {"teacher_diversity": teacher_div, "latest": latest}  # what checkpoints keep beside the weights

        start = last_log = time.perf_counter()
        last_log_iteration = done = start_iteration
        with StopOnSignal() as stop, self.ui.task("distilling", total=c.iterations) as update:
            update(done, None)
            for it in range(start_iteration, c.iterations):
                latest.update(self.step(self.batch(it), it))
                done = it + 1
                if done % c.log_every == 0 or done == c.iterations:
                    now = time.perf_counter()
                    metrics.write(self._log_record(done, latest, (now - last_log) / (done - last_log_iteration)))
                    last_log, last_log_iteration = now, done
                if grids and c.sample_every and done % c.sample_every == 0 and done != c.iterations:
                    metrics.write({"iteration": done, **self.save_grid(done, teacher_div)[1]})
                if c.checkpoint_every and done % c.checkpoint_every == 0 and done != c.iterations:
                    self.checkpoints.save(done, extra)
                update(done, latest)
                signum = self.max_over_processes(stop.signal or 0)
                if signum and done != c.iterations:  # every process stops at the same iteration (the last: finish it)
                    path = self.checkpoints.save(done, extra)
                    if not main:  # one process says so, and every one exits with its code
                        raise SystemExit(128 + signum)
                    raise Interrupted(signum, done, path, self.out)
            # Still under the handler: a signal now lets the final grid and checkpoint finish.
            summary = {"out": str(self.out), "student": str(self.out / runfiles.STUDENT_FILE), "iterations": done}
            if grids:
                grid, grid_record = self.save_grid(done, teacher_div)
                metrics.write({"iteration": done, **grid_record})
                summary.update(grid=str(grid), **grid_record)
            summary["checkpoint"] = str(self.checkpoints.save(done, extra))
        summary.update(
            seconds=round(time.perf_counter() - start, 3),
            losses={k: v for k, v in latest.items() if k.startswith("loss_")},
        )
        return summary

    def resolved(self) -> dict[str, Any]:
        return {
            **self.teacher_identity(),
            "resolution": self.resolution,
            "timesteps": self.timesteps,
            "out": str(self.out),
            "gan": self.data.real is not None,
            "num_prompts": len(self.data.prompts),
            "method": self.config.method,
            "gradient_accumulation_steps": self.accumulation_steps,
            "global_batch": self.config.batch_size * self.accelerator.num_processes * self.accumulation_steps,
            "cached_prompts": len(self.data.cache) if self.data.cache is not None else None,
            "regression_distance": self.regression_distance_name,
            "regression_pairs": str(self.data.pairs.folder) if self.data.pairs is not None else None,
        }
