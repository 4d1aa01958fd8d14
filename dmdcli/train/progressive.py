"""`dmd distill --method progressive`: progressive distillation (Salimans & Ho, arXiv 2202.00512).

Rounds halve the sampling steps, --teacher-steps N → N/2 → … → --steps. In each round a student
(initialized from its teacher) learns to match two deterministic DDIM steps of the teacher with
one of its own (dmdcli.core.progressive); the student of one round is the teacher of the next.
The first round's teacher is the pipeline's UNet with classifier-free guidance at
--guidance-scale; later teachers are students, which sample without guidance.

Where z_t comes from: with --data, real latents noised to t (the paper's setting); without it
(data-free), the teacher's own DDIM trajectory from pure noise down to t, which costs up to N
teacher calls per iteration on the first round.

Plumbing only: the math is in dmdcli.core; the run folder is the same as DMD2's (config.toml,
metrics.jsonl, samples/, student.safetensors) plus rounds/round-<r>-<steps>step.safetensors,
the student at the end of each round, each a complete student file that `dmd sample` takes.
Single process; no --resume: a stopped run starts again from round 1.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from dmdcli import runfiles
from dmdcli.core import progressive as pd
from dmdcli.core.denoiser import Cond, Denoiser, expand_cond
from dmdcli.core.sampler import ddim_sample, guided_prediction, uses_cfg
from dmdcli.core.schedule import NoiseSchedule, as_timestep_tensor, ddim_timesteps
from dmdcli.errors import DmdError, UsageError
from dmdcli.train import rundir
from dmdcli.train.config import DistillConfig, write_config
from dmdcli.train.data import Data, load_data
from dmdcli.train.grids import SampleGrid
from dmdcli.train.optim import adamw, lr_scheduler
from dmdcli.train.setup import Run
from dmdcli.train.ui import UI


def round_steps(teacher_steps: int, target: int) -> list[int]:
    """The students' step counts, one per round: N/2, N/4, …, target."""
    steps, out = teacher_steps, []
    while steps > target:
        steps //= 2
        out.append(steps)
    return out


def student_step_index(seed: int, round_index: int, iteration: int, num_steps: int) -> int:
    """Which student step an iteration trains, from (seed, round, iteration) alone."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + round_index * 100_003 + iteration)
    return int(torch.randint(0, num_steps, (1,), generator=g))


class ProgressiveDistillation(Run):
    def __init__(self, config: DistillConfig, ui: UI, overwrite: bool = False):
        super().__init__(config, ui)
        if self.accelerator.num_processes > 1:
            raise UsageError("--method progressive runs in one process; launch it without torchrun / accelerate launch")
        rundir.check_run_folder(self.out, overwrite)
        prompts = self.load_teacher()
        self.device, self.frozen_dtype = self.accelerator.device, config.frozen_dtype()
        # real latents, VAE-encoded once and cached, as for DMD2's GAN
        self.data = load_data(self.data_folder, prompts, self.teacher, ui) if self.data_folder else Data(prompts, None)
        if note := self.teacher.truncation_note(self.data.all_prompts()):
            ui.message(note)
        self.uncond = self.teacher.empty_cond() if uses_cfg(config.guidance_scale) else None
        self.teacher_schedule = self.schedule
        prediction = (
            pd.PARAMETERIZATIONS[config.parameterization] if config.parameterization else self.spec.prediction_type
        )
        if prediction == "v_prediction" and self.schedule.is_flow:
            prediction = "flow"  # on a flow-matching path the velocity ε − x0 is the v of the path
        # The students predict in the chosen parameterization on the teacher's α_t, σ_t.
        self.student_schedule = self.teacher_schedule.with_prediction_type(prediction)
        self.rounds = round_steps(config.teacher_steps, config.steps)
        torch.manual_seed(config.seed)
        self.grid = SampleGrid(
            self.data.prompts,
            config.grid_size,
            config.seed,
            self.teacher.encode_prompts,
            self.teacher.decode,
            (self.spec.latent_channels, *self.teacher.latent_size),
            self.device,
        )
        if config.cache_prompts:  # the grid and the empty prompt are encoded above; the data's prompts once here
            self.data.cache_prompts(self.teacher, ui, [], self.accelerator.main_process_first)
        ui.message(
            f"progressive distillation: {config.teacher_steps} → {' → '.join(map(str, self.rounds))} steps, "
            f"{config.iterations_per_round} iterations a round, {prediction} parameterization, {config.loss_weight} "
            "weight"
            + (
                "; z_t = real latents noised to t"
                if config.data
                else "; data-free (z_t from the teacher's DDIM trajectories)"
            )
        )

    # -- one round -----------------------------------------------------------------------------

    def _teacher_x0(self, teacher: Denoiser, schedule: NoiseSchedule, guided: bool, cond: Cond, uncond: Cond | None):
        scale = self.config.guidance_scale if guided else 1.0

        def x0(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with self.accelerator.autocast():
                return schedule.to_x0(z, guided_prediction(teacher, z, t, cond, uncond if guided else None, scale), t)

        return x0

    def _z_t(
        self, batch, teacher_x0, schedule: NoiseSchedule, teacher_ts: list[int], k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's input at step k and the conditioning it is paired with."""
        b = batch.noise.shape[0]
        t = as_timestep_tensor(teacher_ts[2 * k], b, batch.noise.device)
        if batch.x_real is not None:  # real latents, forward-noised (the paper's setting)
            return schedule.add_noise(batch.x_real, batch.noise, t), t
        z = batch.noise  # data-free: the teacher's own trajectory from pure noise, 2k DDIM steps
        with torch.no_grad():
            for j in range(2 * k):
                tj = as_timestep_tensor(teacher_ts[j], b, z.device)
                z = schedule.ddim_step(z, teacher_x0(z, tj), tj, as_timestep_tensor(teacher_ts[j + 1], b, z.device))
        return z, t

    def _loss(self, batch, teacher, teacher_schedule, guided: bool, student, teacher_ts: list[int], k: int):
        """The progressive loss of one (micro-)batch: the student's one step k against two of the teacher's."""
        c = self.config
        cond = batch.real_cond if batch.x_real is not None else batch.cond
        uncond = expand_cond(self.uncond, batch.noise.shape[0]) if self.uncond else None
        teacher_x0 = self._teacher_x0(teacher, teacher_schedule, guided, cond, uncond)
        _, t1_, t2_ = pd.student_step_pair(teacher_ts, k)
        z_t, t = self._z_t(batch, teacher_x0, teacher_schedule, teacher_ts, k)
        b, dev = z_t.shape[0], z_t.device
        t1, t2 = as_timestep_tensor(t1_, b, dev), as_timestep_tensor(t2_, b, dev)
        z_t2 = pd.teacher_two_steps(teacher_x0, teacher_schedule, z_t, t, t1, t2)
        alpha_t, sigma_t = self.student_schedule.alpha_sigma(t, z_t)
        alpha_t2, sigma_t2 = self.student_schedule.alpha_sigma(t2, z_t)
        target = pd.distillation_target(z_t, z_t2, alpha_t, sigma_t, alpha_t2, sigma_t2)
        with self.accelerator.autocast():
            x_hat = self.student_schedule.to_x0(z_t, student(z_t, t, cond), t)
        return pd.progressive_loss(x_hat, target, pd.loss_weight(self.student_schedule, t, c.loss_weight))

    def train_round(
        self, r: int, steps: int, teacher_unet, guided: bool, metrics: rundir.MetricsLog, iteration0: int
    ) -> tuple[torch.nn.Module, dict[str, float]]:
        """Train one round's student, copied from `teacher_unet` (fp32), which then becomes its frozen teacher
        in the frozen dtype: copied first, so that the student starts from unrounded weights."""
        c = self.config
        student_unet = copy.deepcopy(teacher_unet).to(self.device, torch.float32).requires_grad_(True).train()
        teacher = self.denoiser(teacher_unet.to(self.device, self.frozen_dtype).requires_grad_(False).eval())
        teacher_schedule = self.teacher_schedule if guided else self.student_schedule
        student = self.denoiser(student_unet)
        params = list(student_unet.parameters())
        optimizer = adamw(params, c.lr, c)
        lr_schedule = lr_scheduler(optimizer, c, c.iterations_per_round)  # each round warms up and decays anew
        teacher_ts = ddim_timesteps(2 * steps)
        logs: dict[str, float] = {}
        last, last_done = time.perf_counter(), 0
        with self.ui.task(
            f"round {r + 1}/{len(self.rounds)}: {2 * steps} → {steps} steps", total=c.iterations_per_round
        ) as update:
            for it in range(c.iterations_per_round):
                k = student_step_index(c.seed, r, it, steps)
                micro = self.accumulation_steps  # micro-batches whose gradients one update adds up
                batch = self.data.batch(self.teacher, c.seed + r, it, c.batch_size, self.uncond, micro_batches=micro)
                loss_sum = 0.0
                for m in batch.split(micro):
                    loss = self._loss(m.to(self.device), teacher, teacher_schedule, guided, student, teacher_ts, k)
                    if not torch.isfinite(loss):
                        raise DmdError(
                            f"non-finite progressive loss in round {r + 1} at iteration {it + 1}; lower --lr"
                        )
                    self.accelerator.backward(loss / micro)
                    loss_sum += loss.item()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
                if not torch.isfinite(grad_norm):
                    raise DmdError(f"non-finite gradient in round {r + 1} at iteration {it + 1}; lower --lr")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                lr_schedule.step()
                logs = {
                    "loss_progressive": loss_sum / micro,
                    "grad_norm_student": float(grad_norm),
                    "lr_student": optimizer.param_groups[0]["lr"],
                }
                done = it + 1
                if done % c.log_every == 0 or done == c.iterations_per_round:
                    now = time.perf_counter()
                    metrics.write(
                        {
                            "iteration": iteration0 + done,
                            "round": r + 1,
                            "steps": steps,
                            "student_step": k,
                            **logs,
                            "sec_per_iter": (now - last) / (done - last_done),
                        }
                    )
                    last, last_done = now, done
                update(done, logs)
        return student_unet.requires_grad_(False).eval(), logs

    # -- outputs -------------------------------------------------------------------------------

    def student_info(self, steps: int, rounds_done: int, iterations: int) -> dict[str, Any]:
        c = self.config
        return {
            "teacher": self.spec.source,
            "layout": self.spec.layout,
            "prediction_type": self.student_schedule.prediction_type,
            "kind": "full",
            "steps": steps,
            "timesteps": ddim_timesteps(steps),
            "conditioning_timestep": None,
            "sampler": "ddim",
            "method": "progressive",
            "resolution": self.resolution,
            "iterations": iterations,
            "rounds": rounds_done,
            "teacher_steps": c.teacher_steps,
            "guidance_scale": c.guidance_scale,
            "seed": c.seed,
            **({"denoiser": self.denoiser_options} if self.denoiser_options else {}),
        }

    def save_grid(self, student_unet, steps: int, name: str) -> Path:
        with torch.no_grad(), self.accelerator.autocast():
            latents = ddim_sample(
                self.denoiser(student_unet),
                self.student_schedule,
                self.grid.noise,
                self.grid.cond,
                None,
                steps,
                1.0,
                timesteps=ddim_timesteps(steps),
            )
        path = self.out / rundir.SAMPLES_DIR / f"{name}.png"
        rundir.save_grid(self.grid.decode(latents), path, columns=self.grid.seeds)
        return path

    def run(self) -> dict[str, Any]:
        c = self.config
        start = time.perf_counter()
        rundir.create_run_folder(self.out)
        self.keep_prompts()
        write_config(self.config_to_record(), self.out / runfiles.CONFIG_FILE, self.resolved())
        metrics = rundir.MetricsLog(self.out / runfiles.METRICS_FILE)
        teacher_unet = self.teacher.network  # fp32: each round copies its student from it before casting it
        logs: dict[str, float] = {}
        grid = None
        for r, steps in enumerate(self.rounds):
            student_unet, logs = self.train_round(r, steps, teacher_unet, r == 0, metrics, r * c.iterations_per_round)
            info = self.student_info(steps, r + 1, (r + 1) * c.iterations_per_round)
            weights = student_unet.state_dict()
            rundir.save_student(self.out / rundir.ROUNDS_DIR / f"round-{r + 1}-{steps}step.safetensors", weights, info)
            rundir.save_student(self.out / runfiles.STUDENT_FILE, weights, info)
            grid = self.save_grid(student_unet, steps, f"round-{r + 1}-{steps}step")
            self.ui.message(
                f"round {r + 1}: {steps}-step student saved (loss {logs.get('loss_progressive', float('nan')):.4g})"
            )
            if r > 0:
                del teacher_unet  # the previous student: its file is on disk
            teacher_unet = student_unet
        return {
            "out": str(self.out),
            "student": str(self.out / runfiles.STUDENT_FILE),
            "grid": str(grid),
            "method": "progressive",
            "rounds": len(self.rounds),
            "steps": c.steps,
            "iterations": len(self.rounds) * c.iterations_per_round,
            "seconds": round(time.perf_counter() - start, 3),
            "losses": {k: v for k, v in logs.items() if k.startswith("loss_")},
        }

    def resolved(self) -> dict[str, Any]:
        return {
            **self.teacher_identity(),
            "student_prediction_type": self.student_schedule.prediction_type,
            "resolution": self.resolution,
            "rounds": self.rounds,
            "timesteps": ddim_timesteps(self.config.steps),
            "out": str(self.out),
            "method": "progressive",
            "data_free": self.config.data is None,
            "num_prompts": len(self.data.prompts),
        }
